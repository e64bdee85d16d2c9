"""BroadcastGroup and BroadcastHub over real sockets.

Clients are ``tornado_longconn.testing.WebSocketTestClient`` (raw asyncio sockets:
cheap enough for 1,000 at once, and able to stop reading at the socket level or
vanish with a TCP reset) and, where an independent implementation matters
(permessage-deflate, close codes), the ``websockets`` library.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.web
import tornado.websocket
import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from tests.helpers import close_all, wait_until
from tornado_longconn import broadcast as broadcast_module
from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.backpressure import BackpressureWriter, OverflowPolicy
from tornado_longconn.broadcast import (
    BroadcastGroup,
    BroadcastHub,
    GapPolicy,
    GroupOptions,
    cursor_envelope,
)
from tornado_longconn.codes import CloseCode
from tornado_longconn.exceptions import BackendUnavailableError, CursorError
from tornado_longconn.log import Cursor, HistoryLimit, parse_cursor
from tornado_longconn.testing import AppServer, WebSocketTestClient, connect_many, scaled

# --------------------------------------------------------------------------- server


class Member(tornado.websocket.WebSocketHandler):
    """Joins ``group`` in open(); options from the query string; echoes to the room."""

    def initialize(
        self,
        group: BroadcastGroup,
        joined: asyncio.Queue[Member] | None = None,
        sndbuf: int | None = None,
        compression: dict[str, Any] | None = None,
        fail_open: bool = False,
    ) -> None:
        self.group = group
        self.joined = joined
        self.sndbuf = sndbuf
        self.compression = compression
        self.fail_open = fail_open

    def get_compression_options(self) -> dict[str, Any] | None:
        return self.compression

    async def open(self) -> None:
        if self.sndbuf is not None:
            assert self.ws_connection is not None
            sock = self.ws_connection.stream.socket  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        policy = self.get_argument("policy", None)
        cursor = self.get_argument("cursor", None)
        membership = self.group.join(
            self, policy=OverflowPolicy(policy) if policy else None, cursor=cursor
        )
        if self.fail_open:
            raise RuntimeError("open() failed after joining")
        await membership
        if self.joined is not None:
            self.joined.put_nowait(self)

    async def on_message(self, message: str | bytes) -> None:
        await self.group.publish(message, exclude=self)


@contextlib.asynccontextmanager
async def serve(group: BroadcastGroup, **options: Any) -> AsyncIterator[AppServer]:
    app = tornado.web.Application([(r"/ws", Member, dict(group=group, **options))])
    async with AppServer(app) as server:
        yield server


async def joined_members(queue: asyncio.Queue[Member], n: int) -> list[Member]:
    return [await asyncio.wait_for(queue.get(), scaled(10)) for _ in range(n)]


def payloads(n: int, size: int = 0) -> list[str]:
    return [f"{i:08d}".ljust(size, "x") for i in range(n)]


# --------------------------------------------------------------------------- tests


async def test_thousand_clients_receive_every_message_in_order() -> None:
    group = BroadcastGroup("room")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        clients = await connect_many(server.ws_url("/ws"), 1000)
        await joined_members(joined, 1000)
        assert len(group) == 1000
        sent = payloads(100)
        for i, text in enumerate(sent):
            result = await group.publish(text)
            assert result.delivered == 1000 and result.local
            if i % 10 == 0:
                await asyncio.sleep(0)  # mix bursts with loop iterations
        received = await asyncio.gather(*(c.recv_many(100, scaled(30)) for c in clients))
        assert all(got == sent for got in received)
        assert all(c.pending_messages == 0 for c in clients)
        stats = group.stats()
        assert stats.members == 1000
        assert stats.published == 100
        assert stats.delivered == stats.frames == 100_000
        assert stats.dropped == stats.closed == 0
        await close_all(clients)


async def test_paced_publish_writes_each_frame_straight_out_and_counts_exactly() -> None:
    # One message per loop iteration: every member's frame goes straight to its socket
    # (one write per message); a burst in one iteration: the first frame straight out,
    # the rest in one corked write. Stats stay exact either way.
    group = BroadcastGroup("paced")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        clients = await connect_many(server.ws_url("/ws"), 20)
        members = await joined_members(joined, 20)
        writers = [BackpressureWriter.of(m) for m in members]
        sent = payloads(30, 100)
        for text in sent[:10]:
            result = await group.publish(text)
            assert result.delivered == 20
            assert all(w.stats().writes == w.stats().messages_sent for w in writers)
            await asyncio.sleep(0)
        for text in sent[10:]:
            assert (await group.publish(text)).delivered == 20
        received = await asyncio.gather(*(c.recv_many(30) for c in clients))
        assert all(got == sent for got in received)
        assert all(c.pending_messages == 0 for c in clients)
        for w in writers:
            stats = w.stats()
            assert stats.messages_sent == 30 and stats.bytes_sent == 30 * (100 + 2)
            assert stats.writes == 12 and stats.buffered == 0
        stats_ = group.stats()
        assert stats_.delivered == 600 and stats_.bytes == 600 * 102
        await close_all(clients)


async def test_drop_oldest_member_drains_then_gets_direct_writes_in_order() -> None:
    # A member whose writer queued (DROP_OLDEST) must not get direct writes ahead of
    # its queue; once drained, frames go straight to its socket again, in order.
    group = BroadcastGroup(
        "oldest", policy=OverflowPolicy.DROP_OLDEST, high_water=16 * 1024, max_queue=5
    )
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined, sndbuf=4096) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"), reading=False, rcvbuf=4096)
        (member,) = await joined_members(joined, 1)
        writer = BackpressureWriter.of(member)
        sent: list[str] = []

        async def publish_one() -> None:
            sent.append(f"{len(sent):08d}".ljust(4000, "x"))
            await group.publish(sent[-1])
            await asyncio.sleep(0)

        while writer.stats().dropped == 0:
            await publish_one()
            assert len(sent) < 5000, "the member's queue never overflowed"
        for _ in range(3):
            await publish_one()  # queued behind the others, never ahead of them
        assert writer.stats().queued > 0
        assert writer._fast_sock is None  # the fan-out's inline direct path is off
        client.resume_reading()
        await wait_until(lambda: writer.stats().queued == 0 and writer.buffered == 0)
        assert writer._fast_sock is not None  # and on again once the queue drained
        before = writer.stats().writes
        for _ in range(10):
            await publish_one()
        assert writer.stats().writes == before + 10  # one direct write per message again
        expected = len(sent) - group.stats().dropped
        got = await client.recv_many(expected)
        assert client.pending_messages == 0
        assert got == sorted(got) and len(set(got)) == len(got)  # in order, no duplicate
        assert got[-13:] == sent[-13:]
        await close_all([client])


async def test_publish_encodes_types() -> None:
    group = BroadcastGroup("types")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        await joined_members(joined, 1)
        await group.publish("héllo")
        await group.publish(b"\x00\xff")
        await group.publish({"a": [1, "é"]})
        await group.publish([1, 2])
        with pytest.raises(TypeError):
            await group.publish(42)
        with pytest.raises(TypeError):
            await group.publish(None)
        # str: a text frame, bytes: a binary frame
        assert await client.recv_many(4) == ["héllo", b"\x00\xff", '{"a":[1,"é"]}', "[1,2]"]
        assert client.pending_messages == 0
        assert group.stats().published == 4
        await close_all([client])


@pytest.mark.parametrize("policy", list(OverflowPolicy))
async def test_slow_clients_never_hurt_fast_ones(policy: OverflowPolicy) -> None:
    high_water = 16 * 1024
    max_queue = 8
    size = 2048
    group = BroadcastGroup("slow", policy=policy, high_water=high_water, max_queue=max_queue)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined, sndbuf=4096) as server:
        fast = await connect_many(server.ws_url("/ws"), 38)
        slow = [
            await WebSocketTestClient.connect(server.ws_url("/ws"), reading=False, rcvbuf=4096)
            for _ in range(2)
        ]
        members = await joined_members(joined, 40)
        sent = payloads(400, size)
        results = []
        for text in sent:
            results.append(await group.publish(text))
            # Pace on the fast clients: they read as fast as they can.
            got = await asyncio.gather(*(c.recv() for c in fast))
            assert got == [text] * 38, "a fast client lost or reordered messages"
        assert all(c.pending_messages == 0 for c in fast)
        stats = group.stats()
        frame = size + 4
        if policy is OverflowPolicy.CLOSE:
            assert stats.closed == stats.closed_slow == 2
            assert len(group) == 38
            assert all(r.delivered + r.closed <= 40 for r in results)
            assert sum(r.closed for r in results) == 2
            for c in slow:
                assert c.pending_messages < 400
            assert stats.peak_buffered <= high_water + frame  # the members still there
        else:
            assert len(group) == 40
            assert stats.closed == 0
            assert stats.dropped > 0
            assert sum(r.dropped for r in results) == stats.dropped
            limit = high_water + frame
            if policy is OverflowPolicy.DROP_OLDEST:
                limit += max_queue * frame
            for m in members:
                writer = BackpressureWriter.of(m)
                assert writer.stats().peak_buffered <= limit
            assert stats.peak_buffered <= limit
        assert stats.delivered >= 38 * 400
        await close_all(fast + slow)


async def test_member_vanishes_mid_publish() -> None:
    group = BroadcastGroup("vanish")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        clients = await connect_many(server.ws_url("/ws"), 20)
        ghost = await WebSocketTestClient.connect(server.ws_url("/ws"))
        ghost.vanish_after = 5
        await joined_members(joined, 21)
        sent = payloads(200, 512)
        for text in sent:
            result = await group.publish(text)  # never raises
            assert result.delivered >= 20
            await asyncio.sleep(0)
        received = await asyncio.gather(*(c.recv_many(200) for c in clients))
        assert all(got == sent for got in received)
        await wait_until(lambda: len(group) == 20)
        assert ghost.closed and ghost.messages_received == 5
        await close_all(clients)


async def test_exclude_skips_only_the_excluded_members() -> None:
    backend = MemoryBackend()
    group = BroadcastGroup("chat", backend=backend)
    other_process = BroadcastGroup("chat", backend=backend)  # same topic, same backend
    joined: asyncio.Queue[Member] = asyncio.Queue()
    joined2: asyncio.Queue[Member] = asyncio.Queue()
    app = tornado.web.Application(
        [
            (r"/ws", Member, {"group": group, "joined": joined}),
            (r"/ws2", Member, {"group": other_process, "joined": joined2}),
        ]
    )
    async with AppServer(app) as server:
        a, b, c = [await WebSocketTestClient.connect(server.ws_url("/ws")) for _ in range(3)]
        d = await WebSocketTestClient.connect(server.ws_url("/ws2"))
        ma, mb, _ = await joined_members(joined, 3)
        await joined_members(joined2, 1)
        await a.send("from a")  # the handler publishes with exclude=self
        assert [await x.recv() for x in (b, c, d)] == ["from a"] * 3
        result = await group.publish("not to a or b", exclude=[ma, mb])
        assert result.delivered == 1
        assert [await x.recv() for x in (c, d)] == ["not to a or b"] * 2
        await group.publish("all")
        # "all" is the next message of each: a got nothing before, b not the excluded one.
        assert [await x.recv() for x in (a, b, c, d)] == ["all"] * 4
        assert a.messages_received == 1 and b.messages_received == 2
        await close_all([a, b, c, d])


async def test_joining_twice_is_harmless() -> None:
    group = BroadcastGroup("twice")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        (member,) = await joined_members(joined, 1)
        first = group.membership(member)
        again = await group.join(member, policy=OverflowPolicy.DROP_NEWEST)
        assert again is first
        assert len(group) == 1 and list(group) == [member]
        assert group.stats().joined == 1
        await group.publish("once")
        await group.publish("twice")
        assert await client.recv_many(2) == ["once", "twice"]
        assert group.leave(member) is True
        assert group.leave(member) is False
        assert len(group) == 0
        await close_all([client])


@pytest.mark.parametrize("how", ["close", "vanish", "server_close", "open_raises"])
async def test_leave_on_close_always_happens(how: str) -> None:
    group = BroadcastGroup("bye")
    other = BroadcastGroup("bye2")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined, fail_open=how == "open_raises") as server:
        if how == "open_raises":
            client = await WebSocketTestClient.connect(server.ws_url("/ws"))
            await client.wait_closed(scaled(5))
            await wait_until(lambda: len(group) == 0)
            assert group.stats().joined == 1 and group.stats().left == 1
            return
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        (member,) = await joined_members(joined, 1)
        other.join(member)
        assert len(group) == len(other) == 1
        if how == "close":
            await client.close(timeout=scaled(10))
        elif how == "vanish":
            client.vanish()
        else:
            member.close(1000, "bye")
        await client.wait_closed(scaled(10))
        await wait_until(lambda: len(group) == 0 and len(other) == 0)
        # The group unsubscribes from the backend with its last member.
        backend = group.backend
        assert isinstance(backend, MemoryBackend)
        await wait_until(lambda: backend.subscriber_count("bye") == 0)


@pytest.mark.parametrize("how", ["client_close", "server_close", "leave_then_close"])
async def test_closed_member_is_freed_without_the_cycle_collector(how: str) -> None:
    # Nothing the group or the writer attach to a handler may keep it in a reference
    # cycle: with the cycle collector off, a closed member is freed by refcounting.
    group = BroadcastGroup("freed")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        (member,) = await joined_members(joined, 1)
        await group.publish("hello")
        assert await client.recv() == "hello"
        ref = weakref.ref(member)
        gc.collect()
        gc.disable()
        try:
            if how == "leave_then_close":
                group.leave(member)
                member.close(1000, "bye")
            elif how == "server_close":
                member.close(1000, "bye")
            del member
            if how == "client_close":
                await client.close(timeout=scaled(10))
            await client.wait_closed(scaled(10))
            await wait_until(lambda: ref() is None)
        finally:
            gc.enable()
        stats = group.stats()
        assert stats.members == 0 and stats.left == 1 and stats.delivered == 1


async def test_subscribes_with_first_member_and_unsubscribes_with_last() -> None:
    backend = MemoryBackend()
    group = BroadcastGroup("sub", backend=backend)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        assert backend.subscriber_count("sub") == 0
        a = await WebSocketTestClient.connect(server.ws_url("/ws"))
        await joined_members(joined, 1)
        assert backend.subscriber_count("sub") == 1
        b = await WebSocketTestClient.connect(server.ws_url("/ws"))
        await joined_members(joined, 1)
        assert backend.subscriber_count("sub") == 1
        await a.close()
        await wait_until(lambda: len(group) == 1)
        assert backend.subscriber_count("sub") == 1
        await b.close()
        await wait_until(lambda: backend.subscriber_count("sub") == 0)
        # Publishing with no local member still records history / reaches others.
        result = await group.publish("nobody here")
        assert result.delivered == 0


async def test_publish_nowait_and_threadsafe_keep_order() -> None:
    group = BroadcastGroup("threads")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        await joined_members(joined, 1)
        group.publish_nowait("first")
        futures = []

        def producer() -> None:
            for i in range(200):
                futures.append(group.publish_threadsafe({"n": i}))

        thread = threading.Thread(target=producer)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        results = [await asyncio.wrap_future(f) for f in futures]
        assert all(r.delivered == 1 for r in results)
        texts = await client.recv_many(201)
        assert texts[0] == "first"
        assert [json.loads(t)["n"] for t in texts[1:]] == list(range(200))
        await close_all([client])


async def test_publish_nowait_right_after_first_join() -> None:
    """The first member is delivered to even before the backend subscription completes."""
    group = BroadcastGroup("early")

    class Early(tornado.websocket.WebSocketHandler):
        def open(self) -> None:
            group.join(self)
            group.publish_nowait("welcome")

    app = tornado.web.Application([(r"/ws", Early)])
    async with AppServer(app) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        assert await client.recv() == "welcome"
        await group.publish("second")
        assert await client.recv() == "second"
        await close_all([client])


async def test_permessage_deflate_members_get_correct_frames() -> None:
    group = BroadcastGroup("deflate")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined, compression={}) as server:
        url = server.ws_url("/ws")
        # Tornado 6.6 drops valueless extension parameters, so it never agrees to
        # server_no_context_takeover: every compressing client gets its own context.
        takeover = await websockets.connect(url, compression="deflate")
        takeover2 = await websockets.connect(
            url,
            compression=None,
            extensions=[ClientPerMessageDeflateFactory(client_max_window_bits=10)],
        )
        plain = await websockets.connect(url, compression=None)
        raw = await WebSocketTestClient.connect(url)
        await joined_members(joined, 4)
        assert takeover.protocol.extensions and takeover2.protocol.extensions
        assert not plain.protocol.extensions
        sent: list[Any] = []
        for i in range(50):
            msg: Any = f"message {i} " + "repetitive text " * (i % 7)
            if i % 5 == 0:
                msg = bytes(range(256)) * (i % 3 + 1)
            sent.append(msg)
            await group.publish(msg)
        for ws in (takeover, takeover2, plain):
            got = [await asyncio.wait_for(ws.recv(), scaled(5)) for _ in range(50)]
            assert got == sent
        assert await raw.recv_many(50) == sent
        for ws in (takeover, takeover2, plain):
            await ws.close()
        await close_all([raw])


async def test_group_close_sends_going_away_in_batches() -> None:
    group = BroadcastGroup("shutdown", close_batch=7, close_spread=0.05)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        url = server.ws_url("/ws")
        clients = [await websockets.connect(url) for _ in range(30)]
        await joined_members(joined, 30)
        await group.publish("last words")
        await group.close()
        assert group.closed and len(group) == 0
        for ws in clients:
            assert await asyncio.wait_for(ws.recv(), scaled(5)) == "last words"
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(5))
            assert ws.close_code == CloseCode.GOING_AWAY
        # A late joiner is told to go away too.
        late = await websockets.connect(url)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(late.recv(), scaled(5))
        assert late.close_code == CloseCode.GOING_AWAY
        await group.close()  # idempotent


async def test_hub_registry_settings_and_close() -> None:
    hub = BroadcastHub(history=10, close_spread=0.0)
    room = hub.group("room:1")
    assert hub.group("room:1") is room
    assert room.history == HistoryLimit(max_messages=10)
    assert hub.group("room:1", history=10) is room
    with pytest.raises(ValueError, match="exists"):
        hub.group("room:1", policy=OverflowPolicy.DROP_NEWEST)
    with pytest.raises(ValueError, match="already"):
        BroadcastGroup("room:1", hub=hub)
    assert "room:1" in hub and len(hub) == 1 and hub.get("nope") is None
    lobby = hub.group("lobby", history=None)

    class Both(tornado.websocket.WebSocketHandler):
        async def open(self) -> None:
            the_hub = BroadcastHub.of(self)
            await the_hub.group("room:1").join(self)
            await the_hub.group("lobby").join(self)
            self.write_message("ready")

    app = tornado.web.Application([(r"/ws", Both)], longconn_hub=hub)
    assert BroadcastHub.of(app) is hub
    with pytest.raises(LookupError):
        BroadcastHub.of(tornado.web.Application())
    async with AppServer(app) as server:
        clients = [await websockets.connect(server.ws_url("/ws")) for _ in range(5)]
        for ws in clients:
            assert await asyncio.wait_for(ws.recv(), scaled(5)) == "ready"
        await lobby.publish("hi lobby")
        r = await room.publish("hi room")
        assert r.cursor is not None and r.cursor.offset == 1
        stats = hub.stats()
        assert stats.groups == 2 and stats.members == 10 and stats.delivered == 10
        await hub.close()
        for ws in clients:
            assert await asyncio.wait_for(ws.recv(), scaled(5)) == "hi lobby"
            assert await asyncio.wait_for(ws.recv(), scaled(5)) == "hi room"
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(5))
            assert ws.close_code == CloseCode.GOING_AWAY
        assert hub.stats().members == 0
        assert hub.backend.closed  # type: ignore[attr-defined]


async def test_hub_forgets_idle_groups_beyond_its_limit() -> None:
    hub = BroadcastHub(max_idle_groups=3)
    for i in range(10):
        await hub.group(f"g{i}").publish("x")
    assert len(hub) == 3
    assert [g.name for g in hub] == ["g7", "g8", "g9"]
    assert hub.stats().published == 10


def test_group_options_are_resolved_once_from_the_hub_defaults() -> None:
    hub = BroadcastHub(history=5, high_water=10_000, gap_policy=GapPolicy.NOTICE)
    assert hub.defaults == GroupOptions(
        history=HistoryLimit(max_messages=5), high_water=10_000, gap_policy=GapPolicy.NOTICE
    )
    room = hub.group("room", high_water=20_000, policy="drop_oldest", close_spread=0)
    assert room.options == GroupOptions(
        history=HistoryLimit(max_messages=5),
        policy=OverflowPolicy.DROP_OLDEST,
        high_water=20_000,
        gap_policy=GapPolicy.NOTICE,
        close_spread=0.0,
    )
    assert (room.high_water, room.policy, room.gap_policy) == (
        20_000,
        OverflowPolicy.DROP_OLDEST,
        GapPolicy.NOTICE,
    )
    assert hub.defaults.high_water == 10_000  # the hub's defaults are not touched
    with pytest.raises(AttributeError):
        room.options.high_water = 1  # type: ignore[misc]
    # Asking again with the same options is fine; with another one, a clear error.
    assert hub.group("room", high_water=20_000, history=5) is room
    with pytest.raises(ValueError, match="exists with high_water=20000, not 30000"):
        hub.group("room", high_water=30_000)
    with pytest.raises(TypeError, match="unknown group option 'colour'"):
        hub.group("room", colour="red")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"high_water": 0}, ValueError, "high_water must be >= 1"),
        ({"high_water": 100, "low_water": 200}, ValueError, "low_water must be between"),
        ({"max_queue": 0}, ValueError, "max_queue must be >= 1"),
        ({"close_batch": 0}, ValueError, "close_batch must be >= 1"),
        ({"close_spread": -1.0}, ValueError, "close_spread must be >= 0"),
        ({"policy": "sometimes"}, ValueError, "policy must be one of"),
        ({"gap_policy": "ignore"}, ValueError, "gap_policy must be one of"),
        ({"history": "lots"}, TypeError, "history must be"),
        ({"high_water": "big"}, TypeError, "high_water must be an int"),
        ({"envelope": 42}, TypeError, "envelope must be callable"),
    ],
)
def test_invalid_group_options_are_refused_once_with_a_clear_error(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        BroadcastHub(**options)
    with pytest.raises(error, match=match):
        BroadcastGroup("bad", **options)
    hub = BroadcastHub()
    with pytest.raises(error, match=match):
        hub.group("bad", **options)
    assert "bad" not in hub


async def test_hub_close_closes_each_group_through_its_close() -> None:
    # The hub closes every group (joins refused with the hub's code afterwards) and
    # closes a connection that is in two groups with the same code.
    hub = BroadcastHub(close_spread=0.0)
    rooms = [hub.group("a"), hub.group("b")]

    class Two(tornado.websocket.WebSocketHandler):
        async def open(self) -> None:
            for room in rooms:
                await room.join(self)
            self.write_message("ready")

    app = tornado.web.Application([(r"/ws", Two)])
    async with AppServer(app) as server:
        url = server.ws_url("/ws")
        clients = [await websockets.connect(url) for _ in range(3)]
        for ws in clients:
            assert await asyncio.wait_for(ws.recv(), scaled(5)) == "ready"
        await hub.close(4010, "maintenance")
        assert all(room.closed and len(room) == 0 for room in rooms)
        for ws in clients:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(5))
            assert (ws.close_code, ws.close_reason) == (4010, "maintenance")
        late = await websockets.connect(url)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(late.recv(), scaled(5))
        assert (late.close_code, late.close_reason) == (4010, "maintenance")
        stats = hub.stats()
        assert stats.members == 0 and stats.joined == 6 and stats.left == 6
        with pytest.raises(AttributeError):
            stats.members = 1  # type: ignore[misc]


async def test_group_close_can_leave_connections_open() -> None:
    group = BroadcastGroup("keep", close_spread=0.0)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        client = await websockets.connect(server.ws_url("/ws"))
        (member,) = await joined_members(joined, 1)
        await group.close(close_connections=False)
        assert group.closed and len(group) == 0
        member.write_message("still open")
        assert await asyncio.wait_for(client.recv(), scaled(5)) == "still open"
        await client.close()


# --------------------------------------------------------------------------- resume


class SlowSinceBackend(MemoryBackend):
    """An in-memory backend whose history reads take a few loop iterations (like Redis)."""

    async def since(self, topic: str, cursor: Cursor | None, *, limit: int | None = None) -> Any:
        for _ in range(5):
            await asyncio.sleep(0)
        result = self.since_nowait(topic, cursor, limit=limit)
        for _ in range(5):
            await asyncio.sleep(0)
        return result


async def test_resume_from_cursor_then_live() -> None:
    group = BroadcastGroup("resume", history=100, envelope=cursor_envelope)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        cursors = [(await group.publish({"n": i})).cursor for i in range(10)]
        assert cursors[0] is not None and cursors[3] is not None
        client = await WebSocketTestClient.connect(server.ws_url(f"/ws?cursor={cursors[3]}"))
        (member,) = await joined_members(joined, 1)
        membership = group.membership(member)
        assert membership is not None and membership.live and membership.replayed == 6
        await group.publish({"n": 10})
        got = [json.loads(t) for t in await client.recv_many(7)]
        assert [g["data"]["n"] for g in got] == list(range(4, 11))
        assert [parse_cursor(g["cursor"]).offset for g in got] == list(range(5, 12))
        await close_all([client])


@pytest.mark.parametrize("page", [10, 500])
async def test_resume_seam_has_no_gap_and_no_duplicate(
    page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages published all through the join arrive exactly once, in order."""
    monkeypatch.setattr("tornado_longconn.broadcast._RESUME_PAGE", page)
    # History far larger than what the publisher can send while three clients
    # connect on a slow machine, so no cursor is ever evicted (that would be a gap).
    limit = 50_000
    group = BroadcastGroup("seam", backend=SlowSinceBackend(), history=limit)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        for i in range(20):
            await group.publish(str(i))
        stop = asyncio.Event()
        published = 20

        async def publisher() -> None:
            nonlocal published
            while not stop.is_set() and published < limit:
                await group.publish(str(published))
                published += 1
                await asyncio.sleep(0)
                await asyncio.sleep(0)

        task = asyncio.create_task(publisher())
        clients = []
        for start in (0, 5, 19):
            head = await group.backend.head("seam")
            url = server.ws_url(f"/ws?cursor={head.epoch}-{start}")
            clients.append((start, await WebSocketTestClient.connect(url)))
        await joined_members(joined, 3)
        for _ in range(20):
            await asyncio.sleep(0)
        stop.set()
        await task
        for start, client in clients:
            got = await client.recv_many(published - start)
            assert client.close_code is None
            assert got == [str(i) for i in range(start, published)]
            assert client.pending_messages == 0
        await close_all([c for _, c in clients])


@pytest.mark.parametrize("gap_policy", list(GapPolicy))
async def test_resume_gap_tells_client_to_resync(gap_policy: GapPolicy) -> None:
    group = BroadcastGroup("gap", history=5, gap_policy=gap_policy)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        for i in range(20):
            await group.publish(str(i))
        head = await group.backend.head("gap")
        url = server.ws_url(f"/ws?cursor={head.epoch}-2")  # evicted long ago
        ws = await websockets.connect(url)
        if gap_policy is GapPolicy.CLOSE:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(5))
            assert ws.close_code == CloseCode.RESYNC_REQUIRED
            assert ws.close_reason == "resync required: evicted"
            assert len(group) == 0
        else:
            notice = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
            assert notice == {
                "type": "resync",
                "topic": "gap",
                "cursor": str(head),
                "reason": "evicted",
            }
            await joined_members(joined, 1)
            await group.publish("after")
            assert await asyncio.wait_for(ws.recv(), scaled(5)) == "after"
            await ws.close()
        assert group.stats().resyncs == 1
        # A foreign-epoch cursor is a gap too; a malformed one an error.
        with pytest.raises(CursorError):
            group.join(None, cursor="garbage")  # type: ignore[arg-type]
        plain = BroadcastGroup("no-history")
        with pytest.raises(ValueError, match="no history"):
            plain.join(None, cursor="abc-1")  # type: ignore[arg-type]


@pytest.mark.parametrize("gap_policy", list(GapPolicy))
async def test_backend_gap_makes_members_resync(gap_policy: GapPolicy) -> None:
    group = BroadcastGroup("bgap", gap_policy=gap_policy, close_spread=0.01)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        clients = [await websockets.connect(server.ws_url("/ws")) for _ in range(3)]
        await joined_members(joined, 3)
        group.on_gap("bgap", "reconnected")
        for ws in clients:
            if gap_policy is GapPolicy.CLOSE:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), scaled(5))
                assert ws.close_code == CloseCode.RESYNC_REQUIRED
            else:
                notice = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
                assert notice["type"] == "resync" and notice["reason"] == "reconnected"
                await ws.close()
        stats = group.stats()
        assert stats.gaps == 1 and stats.resyncs == 3


def test_cursor_envelope_shapes() -> None:
    from tornado_longconn.log import Message

    c = Cursor("e1", 7)
    assert json.loads(cursor_envelope(Message("t", '{"a":1}', c))) == {
        "cursor": "e1-7",
        "data": {"a": 1},
    }
    assert json.loads(cursor_envelope(Message("t", "plain text", c))) == {
        "cursor": "e1-7",
        "data": "plain text",
    }
    assert json.loads(cursor_envelope(Message("t", "x", None))) == {"cursor": None, "data": "x"}
    assert cursor_envelope(Message("t", b"\x00", c)) == b"\x00"


class FlakyBackend(MemoryBackend):
    """An in-memory backend that is "down" until ``up`` is set."""

    up = False

    async def subscribe(self, topic: str, subscriber: Any) -> None:
        if not self.up:
            raise BackendUnavailableError("backend down")
        await super().subscribe(topic, subscriber)

    async def publish(self, topic: str, data: str | bytes, **kwargs: Any) -> Any:
        if not self.up:
            raise BackendUnavailableError("backend down")
        return await super().publish(topic, data, **kwargs)


async def test_backend_outage_raises_to_the_caller_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = FlakyBackend()
    group = BroadcastGroup("flaky", backend=backend)

    class Joiner(tornado.websocket.WebSocketHandler):
        async def open(self) -> None:
            try:
                await group.join(self)
            except BackendUnavailableError:
                self.write_message("join: backend unavailable")

    app = tornado.web.Application([(r"/ws", Joiner)])
    async with AppServer(app) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        assert await client.recv() == "join: backend unavailable"
        assert len(group) == 1  # still a member; the subscription is retried
        with pytest.raises(BackendUnavailableError):
            await group.publish("lost")
        assert group.stats().published == 0
        backend.up = True
        result = await group.publish("back")
        assert result.delivered == 1 and group.stats().published == 1
        assert await client.recv() == "back"
        await close_all([client])
    assert "backend subscribe failed" in caplog.text


class UnavailableReads(MemoryBackend):
    """An in-memory backend whose history reads fail as unavailable ``failures`` times."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.reads = 0

    async def since(self, topic: str, cursor: Any, *, limit: int | None = None) -> Any:
        self.reads += 1
        if cursor is not None and self.failures > 0:
            self.failures -= 1
            raise BackendUnavailableError("pool exhausted")
        return await super().since(topic, cursor, limit=limit)


async def test_a_resume_read_that_is_unavailable_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broadcast_module, "_RESUME_RETRY_BASE", 0.001)
    backend = UnavailableReads(failures=3)
    group = BroadcastGroup("retried", backend=backend, history=100, envelope=cursor_envelope)
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        cursors = [(await group.publish({"n": i})).cursor for i in range(5)]
        client = await WebSocketTestClient.connect(server.ws_url(f"/ws?cursor={cursors[1]}"))
        (member,) = await joined_members(joined, 1)
        membership = group.membership(member)
        assert membership is not None and membership.live and membership.replayed == 3
        got = [json.loads(t) for t in await client.recv_many(3)]
        assert [g["data"]["n"] for g in got] == [2, 3, 4]
        assert backend.failures == 0 and backend.reads >= 4  # three failed, then read
        assert client.close_code is None and len(group) == 1
        await close_all([client])


async def test_a_resume_read_unavailable_past_the_retries_closes_with_1011(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broadcast_module, "_RESUME_RETRY_BASE", 0.001)
    monkeypatch.setattr(broadcast_module, "_RESUME_RETRY_CAP", 0.001)
    backend = UnavailableReads(failures=broadcast_module._RESUME_RETRIES + 1)
    group = BroadcastGroup("given-up", backend=backend, history=100)
    async with serve(group) as server:
        cursor = (await group.publish("x")).cursor
        await group.publish("y")
        client = await WebSocketTestClient.connect(server.ws_url(f"/ws?cursor={cursor}"))
        await client.wait_closed(scaled(10))
        assert client.close_code == CloseCode.INTERNAL_ERROR
        assert backend.failures == 0  # every retry was made before giving up
        assert len(group) == 0


async def test_a_failing_writer_is_isolated_and_closed(caplog: pytest.LogCaptureFixture) -> None:
    group = BroadcastGroup("broken")
    joined: asyncio.Queue[Member] = asyncio.Queue()
    async with serve(group, joined=joined) as server:
        clients = [await WebSocketTestClient.connect(server.ws_url("/ws")) for _ in range(3)]
        members = await joined_members(joined, 3)

        class Exploding(BackpressureWriter):
            __slots__ = ()

            def _offer(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("writer bug")

        writer = BackpressureWriter.of(members[1])
        writer._fast_sock = None  # through the writer's own path, which raises
        writer.__class__ = Exploding  # a slotted writer: one instance's method via its class
        result = await group.publish("still delivered")  # does not raise
        assert result.delivered == 2 and result.closed == 1
        assert members[1] not in group and len(group) == 2
        assert [await clients[i].recv() for i in (0, 2)] == ["still delivered"] * 2
        await clients[1].wait_closed(scaled(5))
        assert clients[1].close_code == CloseCode.INTERNAL_ERROR
        assert "writer bug" in caplog.text
        await close_all(clients)


def test_publish_threadsafe_needs_a_live_loop() -> None:
    group = BroadcastGroup("no-loop")  # created outside any event loop
    with pytest.raises(RuntimeError, match="no event loop"):
        group.publish_threadsafe("x")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(group.publish("bind"))
    loop.close()
    with pytest.raises(RuntimeError):  # closed loop: no never-awaited coroutine is left
        group.publish_threadsafe("x")
