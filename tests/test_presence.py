"""Presence in one process: the model, the protocol's ``presence`` request and events,
and members over WebSocket, SSE and long-poll (in-memory store, real sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import tornado.web
import tornado.websocket
import websockets

from tests.helpers import wait_until
from tests.test_subscriptions import Client, connect
from tests.test_subscriptions_http import read_events
from tornado_longconn import BroadcastHub, LongPollWaiter, MemoryBackend, UserRegistry
from tornado_longconn._subproto import ProtocolError, parse_frame
from tornado_longconn.presence import (
    Member,
    MemoryPresence,
    PresenceEvent,
    PresenceState,
    PresenceStats,
    presence_for,
)
from tornado_longconn.subscriptions import SubscriptionMixin
from tornado_longconn.subscriptions_http import SubscriptionPollHandler, SubscriptionSSEHandler
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------- the model


def test_state_join_leave_counts_and_pages() -> None:
    state = PresenceState()
    assert state.join("t", Member("b", "ann", process="p")) is not None
    assert state.join("t", Member("b", "bob", process="p")) is None  # already there
    state.join("t", Member("a", "ann", process="p"))
    state.join("t", Member("c", None, process="q"))
    assert state.stats("t") == PresenceStats(3, 1)
    first = state.members("t", limit=2)
    assert [m.client for m in first.members] == ["a", "b"] and first.cursor == "b"
    second = state.members("t", first.cursor, 2)
    assert [m.client for m in second.members] == ["c"] and second.cursor is None
    # only the holding process may remove a member
    assert state.leave("t", "c", "p") is None
    event = state.leave("t", "b", "p")
    assert event is not None and event.kind == "leave" and event.reason == "left"
    assert state.stats("t") == PresenceStats(2, 1)
    assert [e.member.client for e in state.expire("q") if e.member] == ["c"]
    assert state.expire("q") == []
    assert state.held("p") == 1 and state.stats("t") == PresenceStats(1, 1)


def test_member_round_trip_and_event_frames() -> None:
    member = Member("c1", "ann", {"name": "Ann", "n": [1]}, 12.5, "sse", "proc")
    assert Member.decode(member.encode()) == member
    with pytest.raises(ValueError, match="not a member"):
        Member.decode("[1]")
    join = PresenceEvent("room", "join", member).to_json()
    assert join == {"type": "join", "topic": "room", "member": member.to_json()}
    assert "p" not in join["member"]  # no process id on the wire
    leave = PresenceEvent("room", "leave", member, "expired").to_json()
    assert leave["reason"] == "expired"
    gap = PresenceEvent("room", "gap", reason="reconnect").to_json()
    assert gap == {"type": "presence_gap", "topic": "room", "reason": "reconnect"}


def test_parse_presence_request() -> None:
    request = parse_frame(
        '{"type":"presence","id":3,"topic":"room:1","cursor":"17","limit":5}', max_size=1000
    )
    assert request.type == "presence" and request.topic == "room:1"
    assert request.params == {"cursor": "17", "limit": 5}
    plain = parse_frame('{"type":"presence","id":4,"topic":"room:1"}', max_size=1000)
    assert plain.params == {"cursor": None, "limit": None}
    for bad in ('"limit":0', '"limit":true', '"limit":1001', '"cursor":5', '"cursor":""'):
        with pytest.raises(ProtocolError):
            parse_frame('{"type":"presence","id":5,"topic":"t",' + bad + "}", max_size=1000)


async def test_memory_store_events_in_order() -> None:
    store = presence_for(MemoryBackend())
    assert isinstance(store, MemoryPresence)
    seen: list[tuple[str, str]] = []

    def listener(event: PresenceEvent) -> None:
        assert event.member is not None
        seen.append((event.kind, event.member.client))

    await store.watch("t", listener)
    assert store.join_nowait("t", Member("a"))
    assert not store.join_nowait("t", Member("a"))
    assert store.join_nowait("t", Member("b"))
    assert store.leave_nowait("t", "a")
    assert not store.leave_nowait("t", "a")
    store.unwatch("t", listener)
    store.join_nowait("t", Member("c"))
    await store.close()
    assert seen == [("join", "a"), ("join", "b"), ("leave", "a")]
    assert await store.presence_stats("t") == PresenceStats(0, 0)


# ---------------------------------------------------------------------- WebSocket


class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub, presence: MemoryPresence) -> None:
        self.subscription_hub = hub
        self.subscription_presence = presence

    def get_current_user(self) -> str | None:
        return self.get_query_argument("user", None)

    def presence_info(self, topic: str) -> Any:
        return {"name": (self.current_user or "anon").title()}


class SSE(SubscriptionSSEHandler):
    pass


class Poll(SubscriptionPollHandler):
    presence_grace = 0.05

    def get_current_user(self) -> str | None:
        return self.get_query_argument("user", None)


@pytest.fixture
async def served() -> AsyncIterator[tuple[MemoryPresence, AppServer]]:
    hub = BroadcastHub(MemoryBackend(epoch="ep1"), history=100)
    presence = MemoryPresence()
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/ws", Live, {"hub": hub, "presence": presence}),
            (r"/events", SSE, {"hub": hub, "waiter": waiter}),
            (r"/poll", Poll, {"hub": hub, "waiter": waiter}),
        ],
        longconn_presence=presence,
    )
    async with AppServer(app) as server:
        yield presence, server
    await waiter.close()
    await hub.close(spread=0)


async def members(client: Client, topic: str, **fields: Any) -> Any:
    rid = await client.request("presence", topic=topic, **fields)
    while True:
        frame = await client.recv()
        if frame.get("id") == rid:
            return frame


async def test_websocket_members_events_and_request(
    served: tuple[MemoryPresence, AppServer],
) -> None:
    _, server = served
    ann = await connect(server, "?user=ann")
    await ann.request("subscribe", topic="room", params={"presence": True})
    assert (await ann.recv())["type"] == "subscribed"
    own = await ann.recv()
    assert own["type"] == "join" and own["member"]["user"] == "ann"
    assert own["member"]["info"] == {"name": "Ann"} and own["member"]["transport"] == "websocket"
    bob = await connect(server, "?user=bob")
    await bob.request("subscribe", topic="room")  # present, but watches no events
    assert (await bob.recv())["type"] == "subscribed"
    joined = await ann.recv()
    assert joined["type"] == "join" and joined["member"]["user"] == "bob"
    bob2 = await connect(server, "?user=bob")
    await bob2.request("subscribe", topic="room")
    await ann.until("join")
    answer = await members(bob, "room")
    assert answer["type"] == "presence" and answer["cursor"] is None
    assert (answer["connections"], answer["users"]) == (3, 2)
    assert sorted(m["user"] for m in answer["members"]) == ["ann", "bob", "bob"]
    page = await members(bob, "room", limit=2)
    assert len(page["members"]) == 2 and page["cursor"] is not None
    rest = await members(bob, "room", limit=2, cursor=page["cursor"])
    assert len(rest["members"]) == 1 and rest["cursor"] is None
    # not held: refused; unknown topic without presence
    refused = await members(bob, "other")
    assert refused["type"] == "error" and refused["code"] == "forbidden"
    await bob.request("unsubscribe", topic="room")
    left = await ann.until("leave")
    assert left["member"]["user"] == "bob" and left["reason"] == "left"
    await bob2.ws.close()
    left = await ann.until("leave")
    assert left["member"]["user"] == "bob"
    answer = await members(ann, "room")
    assert (answer["connections"], answer["users"]) == (1, 1)
    await ann.ws.close()
    await bob.ws.close()


async def test_sse_and_long_poll_members(served: tuple[MemoryPresence, AppServer]) -> None:
    presence, server = served
    events: list[PresenceEvent] = []
    changed = asyncio.Event()

    def listener(event: PresenceEvent) -> None:
        events.append(event)
        changed.set()

    await presence.watch("room", listener)

    async def next_event() -> PresenceEvent:
        while not events:
            changed.clear()
            await asyncio.wait_for(changed.wait(), scaled(10))
        return events.pop(0)

    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        params = {"topics": "room", "client": "tab-1"}
        async with client.stream("GET", server.url("/events"), params=params) as response:
            await read_events(response.aiter_lines(), 1)  # ready
            joined = await next_event()
            assert joined.kind == "join" and joined.member is not None
            assert joined.member.client == "tab-1" and joined.member.transport == "sse"
            assert await presence.presence_stats("room") == PresenceStats(1, 0)
        left = await next_event()  # the stream closed
        assert left.kind == "leave" and left.member is not None and left.member.client == "tab-1"
        # a long-poll client is present while it polls and for presence_grace after
        params = {"topics": "room", "client": "lp-1", "timeout": "0", "user": "cy"}
        response = await client.get(server.url("/poll"), params=params)
        assert response.status_code == 200
        joined = await next_event()
        assert joined.kind == "join" and joined.member is not None
        assert (joined.member.transport, joined.member.user) == ("longpoll", "cy")
        left = await next_event()  # the grace timer ran out
        assert left.kind == "leave" and left.reason == "left"
        # without a client id a poll is not a member
        await client.get(server.url("/poll"), params={"topics": "room", "timeout": "0"})
        assert await presence.presence_stats("room") == PresenceStats(0, 0)
    assert events == []


# ---------------------------------------------------------------------- users


async def test_user_registry_in_one_process() -> None:
    hub = BroadcastHub(MemoryBackend(epoch="ep1"), history=100)
    presence = MemoryPresence()
    users = UserRegistry(hub.backend, presence)
    app = tornado.web.Application(
        [(r"/ws", Live, {"hub": hub, "presence": presence})], longconn_users=users
    )
    async with AppServer(app) as server:
        ann1 = await connect(server, "?user=ann")
        ann2 = await connect(server, "?user=ann")
        bob = await connect(server, "?user=bob")
        anonymous = await connect(server)
        found = await users.connections_of("ann")
        assert len(found) == 2 and {m.user for m in found} == {"ann"}
        assert {m.transport for m in found} == {"websocket"}
        assert await users.connections_of("nobody") == []
        await users.send_to_user("ann", {"text": "hi"})
        for client in (ann1, ann2):
            assert await client.recv() == {"type": "direct", "data": {"text": "hi"}}
        await users.disconnect_user("ann", 4403, "revoked")
        for client in (ann1, ann2):
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "revoked")
        await wait_until(lambda: not users.local_connections("ann"))
        assert await users.connections_of("ann") == []
        # bob heard nothing: his next frame is the answer to his own request
        await bob.request("subscribe", topic="room")
        assert (await bob.recv())["type"] == "subscribed"
        await bob.ws.close()
        await anonymous.ws.close()
    await users.close()
    await hub.close(spread=0)


async def test_sse_stream_receives_presence_events(
    served: tuple[MemoryPresence, AppServer],
) -> None:
    _, server = served
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        params = {"topics": "room", "client": "watcher", "presence": "1"}
        async with client.stream("GET", server.url("/events"), params=params) as response:
            lines = response.aiter_lines()
            (ready, own) = await read_events(lines, 2)
            assert ready["event"] == "ready"
            # its own join first: the stream watches its topics before it joins them
            assert own["event"] == "join"
            assert json.loads(own["data"])["member"]["client"] == "watcher"
            ann = await connect(server, "?user=ann")
            await ann.request("subscribe", topic="room")
            (joined,) = await read_events(lines, 1)
            assert joined["event"] == "join" and "id" not in joined
            body = json.loads(joined["data"])
            assert body["topic"] == "room" and body["member"]["user"] == "ann"
            await ann.ws.close()
            (left,) = await read_events(lines, 1)
            assert left["event"] == "leave" and json.loads(left["data"])["reason"] == "left"


def test_presence_for_refuses_backends_without_a_store() -> None:
    with pytest.raises(TypeError, match="no presence store"):
        presence_for(object())


async def test_presence_for_names_the_supported_backends_for_cluster_and_nats() -> None:
    pytest.importorskip("redis")
    pytest.importorskip("nats")
    from tornado_longconn.backends.nats import NatsBackend
    from tornado_longconn.backends.redis_cluster import ClusterRedisBackend
    from tornado_longconn.presence_redis import RedisPresence

    cluster = ClusterRedisBackend("redis+cluster://127.0.0.1:7000")
    nats = NatsBackend()
    try:
        for backend in (cluster, nats):
            with pytest.raises(
                TypeError, match=r"MemoryBackend .* RedisBackend .* not Redis Cluster or NATS"
            ):
                presence_for(backend)
        with pytest.raises(TypeError, match="not ClusterRedisBackend"):
            RedisPresence(cluster)
    finally:
        await cluster.close()
        await nats.close()


async def test_info_that_is_not_json_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryPresence()
    assert store.join_nowait("t", Member("a", "ann", {"bad": object()}))
    (member,) = (await store.presence("t")).members
    assert member.info is None and member.user == "ann"
    assert "not JSON" in caplog.text
