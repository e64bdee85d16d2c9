"""The Python client against real library servers on 127.0.0.1 (no mocks).

A small TCP proxy (:class:`Proxy`) stands between the client and the server, so a
test can cut the network (at once, or in the middle of a frame), make the server
fall silent, or restart the server behind the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.web

from tests.helpers import free_port, wait_until
from tests.test_subscriptions import Live
from tornado_longconn import (
    BroadcastHub,
    HeartbeatMixin,
    LongPollWaiter,
    MemoryBackend,
    SubscriptionPollHandler,
    SubscriptionPublishHandler,
    SubscriptionSSEHandler,
    subscription_group,
)
from tornado_longconn.client import (
    BufferPolicy,
    Client,
    ClientError,
    Event,
    Resync,
    Subscription,
    TopicMessage,
    connect,
)
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------- the proxy


class _Pair:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.writers = (client, upstream)
        self.cut_next = False
        self.silent = False

    def abort(self) -> None:
        for writer in self.writers:
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``target`` (a port), with faults on demand.

    * :meth:`cut` -- abort every connection (RST, no close frame).
    * :meth:`cut_mid_frame` -- the next bytes the server sends reach the client
      only halfway, then the connection is aborted.
    * :meth:`silence` -- existing connections carry nothing more either way
      (a server that stopped answering); new connections work.
    * ``target`` may change (a restarted server); while the target refuses, the
      proxy closes what it accepts.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()  # every pump then ends
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                writer.transport.abort()
                return
            pair = _Pair(writer, up_writer)
            self.pairs.add(pair)
            try:
                await asyncio.gather(
                    self._pump(reader, up_writer, pair, down=False),
                    self._pump(up_reader, writer, pair, down=True),
                )
            finally:
                self.pairs.discard(pair)
                pair.abort()
        finally:
            self._tasks.discard(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: _Pair, *, down: bool
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    pair.abort()
                    return
                if pair.silent:
                    continue
                if down and pair.cut_next:
                    dst.write(data[: max(1, len(data) // 2)])
                    with contextlib.suppress(ConnectionError):
                        await dst.drain()
                    pair.abort()
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pair.abort()

    def cut(self) -> None:
        for pair in list(self.pairs):
            pair.abort()

    def cut_mid_frame(self) -> None:
        for pair in self.pairs:
            pair.cut_next = True

    def silence(self) -> None:
        for pair in self.pairs:
            pair.silent = True


# ---------------------------------------------------------------------- servers


class Refuse(tornado.web.RequestHandler):
    """Answers the WebSocket upgrade (any GET) with 403."""

    def get(self) -> None:
        raise tornado.web.HTTPError(403)


class Publish(SubscriptionPublishHandler):
    def authorize_publish(self, topic: str, data: Any) -> bool:
        return not topic.startswith("ro:")


class Beating(HeartbeatMixin, Live):
    """The protocol with application heartbeats (``{"type":"ping"}``) every 50 ms (scaled)."""

    heartbeat_mode = "application"
    heartbeat_interval = scaled(0.05)
    heartbeat_timeout = scaled(60)  # the client, not the server, notices the silence


def make_app(
    hub: BroadcastHub,
    waiter: LongPollWaiter | None = None,
    *,
    ws: type[tornado.web.RequestHandler] = Live,
    sse: bool = True,
) -> tornado.web.Application:
    routes: list[Any] = [(r"/ws", ws, {"hub": hub})]
    if ws is Refuse:
        routes = [(r"/ws", Refuse)]
    if waiter is not None:
        if sse:
            routes.append((r"/events", SubscriptionSSEHandler, {"hub": hub, "waiter": waiter}))
        routes.append((r"/poll", SubscriptionPollHandler, {"hub": hub, "waiter": waiter}))
    routes.append((r"/publish", Publish, {"hub": hub}))
    return tornado.web.Application(routes)


@pytest.fixture
async def hub() -> AsyncIterator[BroadcastHub]:
    hub = BroadcastHub(MemoryBackend(epoch="ep1"), history=2000)
    yield hub
    await hub.close(spread=0)


#: Client options for tests: quick reconnects, no idle timeout unless asked.
FAST: dict[str, Any] = {
    "backoff_base": scaled(0.02),
    "backoff_cap": scaled(0.2),
    "idle_timeout": None,
    "open_timeout": scaled(20),
    "request_timeout": scaled(10),
}


async def publish(hub: BroadcastHub, topic: str, value: Any) -> None:
    await subscription_group(hub, topic).publish(json.dumps(value))


async def take(sub: Subscription, count: int) -> list[Event]:
    return [await sub.get(scaled(10)) for _ in range(count)]


def values(events: list[Event]) -> list[Any]:
    return [e.data if isinstance(e, TopicMessage) else e for e in events]


# ---------------------------------------------------------------------- tests


async def test_subscribe_publish_call_unsubscribe(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub)) as server:
        async with connect(server.ws_url("/ws"), **FAST) as client:
            assert client.transport == "websocket"
            room = await client.subscribe("room:1")
            assert room.cursor == "ep1-0"  # the head: a reconnect resumes from here
            cursor = await client.publish("room:1", {"text": "hi"})
            assert cursor == "ep1-1"
            assert await room.get(scaled(10)) == TopicMessage("room:1", "ep1-1", {"text": "hi"})
            await client.publish("room:1", b"\x00\xff")
            assert await room.get(scaled(10)) == TopicMessage("room:1", "ep1-2", b"\x00\xff", True)
            assert await client.call("echo", [1, 2]) == {"params": [1, 2], "user": None}
            with pytest.raises(ClientError) as refused:
                await client.call("nope")
            assert refused.value.code == "not_found" and refused.value.status == 404
            with pytest.raises(ClientError) as timed_out:
                await client.call("sleep", timeout=scaled(0.05))
            assert timed_out.value.code == "timeout"
            with pytest.raises(ClientError) as forbidden:
                await client.subscribe("secret:x")
            assert forbidden.value.code == "forbidden" and forbidden.value.topic == "secret:x"
            with pytest.raises(ClientError) as ro:
                await client.publish("ro:1", 1)
            assert ro.value.code == "forbidden"
            with pytest.raises(ClientError) as twice:
                await client.subscribe("room:1")
            assert twice.value.code == "conflict"
            # From a cursor: the history after it, then live.
            again = await client.subscribe("room:2")
            await publish(hub, "room:2", 1)
            await publish(hub, "room:2", 2)
            assert values(await take(again, 2)) == [1, 2]
            await client.unsubscribe("room:2")
            with pytest.raises(StopAsyncIteration):
                await again.get(scaled(10))
            replay = await client.subscribe("room:2", cursor="ep1-1")
            assert await replay.get(scaled(10)) == TopicMessage("room:2", "ep1-2", 2)
            assert client.stats().subscriptions == 2
        assert client.closed
        with pytest.raises(StopAsyncIteration):
            await room.get(scaled(10))


async def test_memory_server_restart_gives_an_explicit_resync() -> None:
    hub1 = BroadcastHub(MemoryBackend(epoch="old"), history=100)
    server1 = AppServer(make_app(hub1)).start()
    async with Proxy(server1.port) as proxy, connect(proxy.ws_url("/ws"), **FAST) as client:
        room = await client.subscribe("room:1")
        await publish(hub1, "room:1", 1)
        assert values(await take(room, 1)) == [1]
        await server1.stop()
        await hub1.close(spread=0)
        await wait_until(lambda: client.transport is None)
        # A new process: its history starts over (a new epoch) and it accepted
        # two messages before the client came back.
        hub2 = BroadcastHub(MemoryBackend(epoch="new"), history=100)
        await publish(hub2, "room:1", 2)
        await publish(hub2, "room:1", 3)
        async with AppServer(make_app(hub2)) as server2:
            proxy.target = server2.port
            events = await take(room, 3)
            assert events[0] == Resync("room:1", "new-0", "epoch")
            assert values(events[1:]) == [2, 3]
            await publish(hub2, "room:1", 4)
            assert await room.get(scaled(10)) == TopicMessage("room:1", "new-3", 4)
            assert client.stats().resyncs == 1
        await hub2.close(spread=0)


async def test_network_cut_mid_frame_loses_and_repeats_nothing(hub: BroadcastHub) -> None:
    async with (
        AppServer(make_app(hub)) as server,
        Proxy(server.port) as proxy,
        connect(proxy.ws_url("/ws"), **FAST) as client,
    ):
        room = await client.subscribe("room:1")
        await publish(hub, "room:1", {"n": 0, "pad": "x" * 200})
        assert (await room.get(scaled(10))).data["n"] == 0  # type: ignore[union-attr]
        proxy.cut_mid_frame()
        await publish(hub, "room:1", {"n": 1, "pad": "x" * 200})
        await publish(hub, "room:1", {"n": 2, "pad": "x" * 200})
        events = await take(room, 2)
        assert [e.data["n"] for e in events] == [1, 2]  # type: ignore[union-attr]
        assert client.stats().connects == 2
        assert room.buffered == 0


async def test_a_silent_server_is_detected_and_left(hub: BroadcastHub) -> None:
    app = make_app(hub, ws=Beating)
    async with AppServer(app) as server, Proxy(server.port) as proxy:
        options = dict(FAST, idle_timeout=scaled(1.0))
        async with connect(proxy.ws_url("/ws"), **options) as client:
            room = await client.subscribe("room:1")
            # The server's {"type":"ping"} is answered: it keeps the connection.
            await wait_until(lambda: client.stats().pings >= 3)
            assert client.stats().connects == 1
            proxy.silence()
            await wait_until(lambda: client.stats().idle_timeouts == 1, timeout=20)
            await wait_until(lambda: client.stats().connects == 2)
            await publish(hub, "room:1", 7)
            assert values(await take(room, 1)) == [7]


async def test_falls_back_to_sse_when_the_upgrade_is_refused(hub: BroadcastHub) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    async with AppServer(make_app(hub, waiter, ws=Refuse)) as server:
        client = connect(
            server.ws_url("/ws"),
            sse_url=server.url("/events"),
            poll_url=server.url("/poll"),
            publish_url=server.url("/publish"),
            **FAST,
        )
        async with client:
            assert client.transport == "sse"
            assert client.stats().fallbacks == 1
            room = await client.subscribe("room:1")
            assert await client.publish("room:1", {"a": 1}) == "ep1-1"
            assert await room.get(scaled(10)) == TopicMessage("room:1", "ep1-1", {"a": 1})
            other = await client.subscribe("room:2", cursor="ep1-0")
            await publish(hub, "room:2", "b")
            assert await other.get(scaled(10)) == TopicMessage("room:2", "ep1-1", "b")
            with pytest.raises(ClientError) as unsupported:
                await client.call("echo")
            assert unsupported.value.code == "unsupported"
            with pytest.raises(ClientError) as forbidden:
                await client.publish("ro:1", 1)
            assert forbidden.value.code == "forbidden" and forbidden.value.status == 403
    await waiter.close()


async def test_falls_back_to_long_poll_after_sse(hub: BroadcastHub) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    async with AppServer(make_app(hub, waiter, ws=Refuse, sse=False)) as server:
        client = connect(
            server.ws_url("/ws"),
            sse_url=server.url("/events"),  # not routed: 404
            poll_url=server.url("/poll"),
            publish_url=server.url("/publish"),
            poll_timeout=scaled(5),
            **FAST,
        )
        async with client:
            room = await client.subscribe("room:1")
            assert client.transport == "longpoll"
            assert client.stats().fallbacks == 2
            await publish(hub, "room:1", 1)
            await publish(hub, "room:1", 2)
            got = values(await take(room, 2))
            assert got == [1, 2]
            await client.unsubscribe("room:1")
            assert client.stats().subscriptions == 0
    await waiter.close()


async def test_thousand_messages_across_five_reconnects_arrive_once_in_order(
    hub: BroadcastHub,
) -> None:
    async with (
        AppServer(make_app(hub)) as server,
        Proxy(server.port) as proxy,
        connect(proxy.ws_url("/ws"), **FAST) as client,
    ):
        room = await client.subscribe("room:1")
        received: list[Any] = []

        async def consume() -> None:
            async for event in room:
                assert isinstance(event, TopicMessage), event
                received.append(event.data)
                if len(received) == 1000:
                    return

        consumer = asyncio.ensure_future(consume())
        for batch in range(6):
            for n in range(batch * 200 if batch < 5 else 1000, (batch + 1) * 200):
                await publish(hub, "room:1", n)
            if batch < 5:
                proxy.cut()
                await wait_until(lambda b=batch: client.stats().connects >= b + 2)
        await asyncio.wait_for(consumer, scaled(30))
        assert received == list(range(1000))
        stats = client.stats()
        assert stats.connects == 6 and stats.resyncs == 0 and stats.dropped == 0


async def test_drop_oldest_signals_an_overflow_resync(hub: BroadcastHub) -> None:
    async with (
        AppServer(make_app(hub)) as server,
        connect(server.ws_url("/ws"), buffer_size=3, **FAST) as client,
    ):
        room = await client.subscribe("room:1")
        for n in range(6):
            await publish(hub, "room:1", n)
        await wait_until(lambda: client.stats().messages == 6)
        events = await take(room, 3)
        assert events[0] == Resync("room:1", "ep1-4", "overflow")
        assert values(events[1:]) == [4, 5]
        stats = client.stats()
        assert stats.overflows == 3 and stats.dropped == 4


async def test_block_policy_holds_reading_and_loses_nothing(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub)) as server:
        options = dict(FAST, buffer_size=2, buffer_policy=BufferPolicy.BLOCK)
        async with connect(server.ws_url("/ws"), **options) as client:
            room = await client.subscribe("room:1")
            for n in range(20):
                await publish(hub, "room:1", n)
            await wait_until(lambda: client.stats().blocked >= 1)
            got = values(await take(room, 20))
            assert got == list(range(20))
            assert client.stats().dropped == 0


async def test_fatal_close_ends_the_client(hub: BroadcastHub) -> None:
    class Kick(Live):
        require_user = True

    async with AppServer(make_app(hub, ws=Kick)) as server:
        with pytest.raises(ClientError) as refused:
            async with connect(server.ws_url("/ws"), **FAST):
                pass
        assert refused.value.code == "unauthorized"


async def test_unreachable_server_raises_unavailable() -> None:
    port = free_port()  # nothing listens there
    client = Client(f"ws://127.0.0.1:{port}/ws", **dict(FAST, open_timeout=scaled(0.3)))
    with pytest.raises(ClientError) as error:
        await client.start()
    assert error.value.code == "unavailable"
    assert client.closed


class Revoking(Live):
    async def on_call(self, method: str, params: Any) -> Any:
        if method == "revoke":
            return self.end_subscription(params, "access revoked")
        if method == "start-over":
            self.close(4001, "resync required")
            return None
        return await super().on_call(method, params)


async def test_a_subscription_ended_by_the_server_raises(hub: BroadcastHub) -> None:
    async with (
        AppServer(make_app(hub, ws=Revoking)) as server,
        connect(server.ws_url("/ws"), **FAST) as client,
    ):
        room = await client.subscribe("room:1")
        other = await client.subscribe("room:2")
        assert await client.call("revoke", "room:1") is True
        with pytest.raises(ClientError) as ended:
            await room.get(scaled(10))
        assert ended.value.code == "closed" and ended.value.reason == "access revoked"
        await publish(hub, "room:2", 1)
        assert values(await take(other, 1)) == [1]
        assert client.stats().subscriptions == 1


async def test_block_policy_over_sse_reopens_the_stream_and_loses_nothing(
    hub: BroadcastHub,
) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    async with AppServer(make_app(hub, waiter, ws=Refuse)) as server:
        options = dict(FAST, buffer_size=2, buffer_policy=BufferPolicy.BLOCK)
        client = connect(server.ws_url("/ws"), sse_url=server.url("/events"), **options)
        async with client:
            room = await client.subscribe("room:1")
            assert client.transport == "sse"
            for n in range(20):
                await publish(hub, "room:1", n)
            await wait_until(lambda: client.stats().blocked >= 1)
            assert values(await take(room, 20)) == list(range(20))
            stats = client.stats()
            assert stats.dropped == 0 and stats.duplicates == 0 and stats.resyncs == 0
    await waiter.close()


class ChattySSE(SubscriptionSSEHandler):
    sse_keepalive = scaled(0.05)  # keep-alive comments every 50 ms (scaled)


async def test_a_silent_sse_stream_is_detected_and_reopened(hub: BroadcastHub) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/ws", Refuse),
            (r"/events", ChattySSE, {"hub": hub, "waiter": waiter}),
        ]
    )
    async with AppServer(app) as server, Proxy(server.port) as proxy:
        options = dict(FAST, idle_timeout=scaled(1.0))
        client = connect(proxy.ws_url("/ws"), sse_url=proxy.url("/events"), **options)
        async with client:
            room = await client.subscribe("room:1")
            await publish(hub, "room:1", 1)
            assert values(await take(room, 1)) == [1]
            opened = client.stats().connects
            proxy.silence()
            await publish(hub, "room:1", 2)  # lost in the silence, then resumed
            await wait_until(lambda: client.stats().idle_timeouts == 1, timeout=20)
            assert values(await take(room, 1)) == [2]
            assert client.stats().connects == opened + 1
    await waiter.close()


class Pinging(HeartbeatMixin, Live):
    """WebSocket pings every 50 ms (scaled); a client that does not answer is dropped."""

    heartbeat_mode = "protocol"
    heartbeat_interval = scaled(0.05)
    heartbeat_timeout = scaled(2)


async def test_websocket_pings_are_answered(hub: BroadcastHub) -> None:
    from tornado_longconn import heartbeat_stats

    async with (
        AppServer(make_app(hub, ws=Pinging)) as server,
        connect(server.ws_url("/ws"), **FAST) as client,
    ):
        room = await client.subscribe("room:1")
        await wait_until(lambda: heartbeat_stats(server.app).count >= 5)
        assert heartbeat_stats(server.app).timeouts == 0
        await publish(hub, "room:1", 1)
        assert values(await take(room, 1)) == [1]
        assert client.stats().connects == 1


async def test_close_code_4001_resyncs_every_topic(hub: BroadcastHub) -> None:
    async with (
        AppServer(make_app(hub, ws=Revoking)) as server,
        connect(server.ws_url("/ws"), **FAST) as client,
    ):
        rooms = [await client.subscribe("room:1"), await client.subscribe("room:2")]
        with pytest.raises(ClientError):  # the answer is lost with the connection
            await client.call("start-over")
        for room in rooms:
            assert await room.get(scaled(10)) == Resync(room.topic, None, "resync required")
        await wait_until(lambda: client.stats().connects == 2 and all(r.active for r in rooms))
        await publish(hub, "room:2", 5)
        assert await rooms[1].get(scaled(10)) == TopicMessage("room:2", "ep1-1", 5)
