"""The subscriptions protocol over a real WebSocket, driven by a raw ``websockets`` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.web
import tornado.websocket
import websockets
from websockets.asyncio.client import ClientConnection

from tests.helpers import wait_until
from tornado_longconn import BroadcastHub, CloseCode, HeartbeatMixin, MemoryBackend
from tornado_longconn import subscriptions as subscriptions_module
from tornado_longconn._subproto import binary_frame, parse_binary_frame
from tornado_longconn.exceptions import BackendUnavailableError
from tornado_longconn.subscriptions import (
    SubscriptionError,
    SubscriptionMixin,
    subscription_group,
    subscription_stats,
)
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(60)


class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    """A handler with hooks that the tests steer through the URL and a gate."""

    gate: asyncio.Event | None = None

    def initialize(self, hub: BroadcastHub, **settings: Any) -> None:
        self.subscription_hub = hub
        for key, value in settings.items():
            setattr(self, key, value)

    def get_current_user(self) -> str | None:
        return self.get_query_argument("user", None)

    async def authorize_subscribe(self, topic: str, params: Any) -> bool:
        if topic.startswith("slow:") and self.gate is not None:
            await self.gate.wait()
        if topic == "boom":
            raise RuntimeError("hook bug")
        if topic == "kick":
            raise SubscriptionError("forbidden", "go away", close=True)
        return not topic.startswith("secret:")

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return not topic.startswith("ro:")

    async def on_call(self, method: str, params: Any) -> Any:
        if method == "echo":
            return {"params": params, "user": self.current_user}
        if method == "sleep":
            await asyncio.sleep(3600)
        if method == "nojson":
            return object()
        return super().on_call(method, params)


@pytest.fixture
async def hub() -> AsyncIterator[BroadcastHub]:
    hub = BroadcastHub(MemoryBackend(epoch="ep1"), history=100)
    yield hub
    await hub.close(spread=0)


def make_app(hub: BroadcastHub, **settings: Any) -> tornado.web.Application:
    return tornado.web.Application([(r"/ws", Live, {"hub": hub, **settings})])


class Client:
    """A raw protocol client: sends frames, reads frames in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, obj: Any) -> None:
        await self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    async def recv(self) -> Any:
        raw = await asyncio.wait_for(self.ws.recv(), scaled(10))
        if isinstance(raw, bytes):
            header, payload = parse_binary_frame(raw)
            return {**header, "bytes": payload}
        return json.loads(raw)

    async def request(self, kind: str, **fields: Any) -> Any:
        self.next_id += 1
        await self.send({"type": kind, "id": self.next_id, **fields})
        return self.next_id

    async def until(self, kind: str) -> Any:
        while True:
            frame = await self.recv()
            if frame.get("type") == kind:
                return frame


async def connect(server: AppServer, query: str = "") -> Client:
    ws = await websockets.connect(server.ws_url("/ws" + query), max_size=None)
    client = Client(ws)
    welcome = await client.recv()
    assert welcome["type"] == "welcome" and welcome["v"] == 1 and welcome["client"]
    return client


async def test_subscribe_publish_unsubscribe(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub)) as server:
        a = await connect(server)
        b = await connect(server)
        await a.request("subscribe", topic="room:1")
        sub = await a.recv()
        assert sub == {"type": "subscribed", "id": 1, "topic": "room:1", "cursor": "ep1-0"}
        await b.request("publish", topic="room:1", data={"text": "hi"})
        assert await b.recv() == {
            "type": "published",
            "id": 1,
            "topic": "room:1",
            "cursor": "ep1-1",
        }
        assert await a.recv() == {"topic": "room:1", "cursor": "ep1-1", "data": {"text": "hi"}}
        # plain text published by the server arrives as a JSON string
        await subscription_group(hub, "room:1").publish("plain")
        assert await a.recv() == {"topic": "room:1", "cursor": "ep1-2", "data": "plain"}
        await a.request("unsubscribe", topic="room:1")
        assert await a.recv() == {"type": "unsubscribed", "id": 2, "topic": "room:1"}
        await a.request("unsubscribe", topic="room:1")
        error = await a.recv()
        assert error["code"] == "not_found" and error["status"] == 404 and error["id"] == 3
        await a.ws.close()
        await b.ws.close()


async def test_resume_from_cursor_replays_then_live(hub: BroadcastHub) -> None:
    group = subscription_group(hub, "room:2")
    for i in range(5):
        await group.publish(json.dumps(i))
    async with AppServer(make_app(hub)) as server:
        a = await connect(server)
        await a.request("subscribe", topic="room:2", cursor="ep1-2")
        assert (await a.recv())["cursor"] == "ep1-5"
        await group.publish(json.dumps(5))
        got = [await a.recv() for _ in range(3 + 1)]
        assert [m["data"] for m in got] == [2, 3, 4, 5]
        assert [m["cursor"] for m in got] == ["ep1-3", "ep1-4", "ep1-5", "ep1-6"]
        await a.ws.close()


async def test_new_epoch_resyncs_from_its_start(hub: BroadcastHub) -> None:
    """A cursor of an older epoch: resync (epoch), then all the new epoch holds, then live."""
    group = subscription_group(hub, "room:3")
    for i in range(3):
        await group.publish(json.dumps(i))
    async with AppServer(make_app(hub)) as server:
        a = await connect(server)
        await a.request("subscribe", topic="room:3", cursor="old0-41")
        assert (await a.recv())["type"] == "subscribed"
        assert await a.recv() == {
            "type": "resync",
            "topic": "room:3",
            "cursor": "ep1-0",
            "reason": "epoch",
        }
        await group.publish(json.dumps(3))
        got = [await a.recv() for _ in range(4)]
        assert [m["data"] for m in got] == [0, 1, 2, 3]
        await a.ws.close()


async def test_trimmed_history_resyncs(hub: BroadcastHub) -> None:
    group = subscription_group(hub, "room:4")
    for i in range(150):
        await group.publish(json.dumps(i))
    async with AppServer(make_app(hub)) as server:
        a = await connect(server)
        await a.request("subscribe", topic="room:4", cursor="ep1-3")
        assert (await a.recv())["type"] == "subscribed"
        resync = await a.recv()
        assert resync == {
            "type": "resync",
            "topic": "room:4",
            "cursor": "ep1-150",
            "reason": "trimmed",
        }
        await group.publish(json.dumps("next"))
        assert (await a.recv())["data"] == "next"
        await a.ws.close()


async def test_binary_publish_and_delivery(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub)) as server:
        a = await connect(server)
        await a.request("subscribe", topic="bin")
        await a.recv()
        payload = bytes(range(256))
        await a.send(binary_frame({"type": "publish", "id": 9, "topic": "bin"}, payload))
        frames = [await a.recv(), await a.recv()]
        message = next(f for f in frames if "bytes" in f)
        published = next(f for f in frames if f.get("type") == "published")
        assert message == {"topic": "bin", "cursor": "ep1-1", "bytes": payload}
        assert published["id"] == 9 and published["cursor"] == "ep1-1"
        await a.ws.close()


async def test_authorization_and_errors(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub)) as server:
        a = await connect(server, "?user=ann")
        await a.request("subscribe", topic="secret:x")
        error = await a.recv()
        assert error["code"] == "forbidden" and error["status"] == 403
        assert error["topic"] == "secret:x"
        await a.request("subscribe", topic="boom")
        assert (await a.recv())["code"] == "internal"
        await a.request("publish", topic="ro:1", data=1)
        assert (await a.recv())["code"] == "forbidden"
        await a.request("subscribe", topic="ok")
        assert (await a.recv())["type"] == "subscribed"
        await a.request("subscribe", topic="ok")
        assert (await a.recv())["code"] == "conflict"
        await a.request("call", method="echo", params=[1, "x"])
        assert await a.recv() == {
            "type": "result",
            "id": 6,
            "result": {"params": [1, "x"], "user": "ann"},
        }
        await a.request("call", method="nope")
        assert (await a.recv())["code"] == "not_found"
        await a.request("call", method="nojson")
        assert (await a.recv())["code"] == "internal"
        assert ["secret:x", "boom", "ok"] and a.ws.state.name == "OPEN"
        await a.ws.close()
        stats = subscription_stats(server.app)
        assert dict(stats.errors)["forbidden"] == 2 and stats.subscribed == 1


async def test_call_timeout_and_pending_limit(hub: BroadcastHub) -> None:
    app = make_app(hub, call_timeout=scaled(0.2), max_pending_calls=2)
    async with AppServer(app) as server:
        a = await connect(server)
        for _ in range(3):
            await a.request("call", method="sleep")
        limit = await a.recv()
        assert limit["code"] == "limit" and limit["id"] == 3 and limit["status"] == 429
        timeouts = [await a.recv(), await a.recv()]
        assert {t["id"] for t in timeouts} == {1, 2}
        assert all(t["code"] == "timeout" and t["status"] == 504 for t in timeouts)
        await a.ws.close()


async def test_topic_limit(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub, max_topics=2)) as server:
        a = await connect(server)
        for topic in ("t1", "t2", "t3"):
            await a.request("subscribe", topic=topic)
        frames = [await a.recv() for _ in range(3)]
        assert [f.get("type") for f in frames] == ["subscribed", "subscribed", "error"]
        assert frames[2]["code"] == "limit"
        await a.request("unsubscribe", topic="t1")
        await a.recv()
        await a.request("subscribe", topic="t3")
        assert (await a.recv())["type"] == "subscribed"
        await a.ws.close()


async def test_unsubscribe_while_authorizing_leaves_nothing(hub: BroadcastHub) -> None:
    gate = asyncio.Event()
    async with AppServer(make_app(hub, gate=gate)) as server:
        a = await connect(server)
        await a.request("subscribe", topic="slow:1")
        await a.request("unsubscribe", topic="slow:1")
        await a.request("call", method="echo")
        assert (await a.recv())["type"] == "result"  # calls are not held up by the topic
        gate.set()
        assert (await a.recv())["type"] == "subscribed"
        assert (await a.recv())["type"] == "unsubscribed"
        group = hub.get("slow:1")
        assert group is not None and len(group) == 0
        await a.ws.close()


async def test_malformed_frames_then_policy_close(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub, max_protocol_errors=3)) as server:
        a = await connect(server)
        bad = ["nope", "[]", '{"type":"subscribe","id":1,"topic":"a,b"}', '{"id":7}']
        for text in bad:
            await a.send(text)
        replies = [await a.recv() for _ in range(4)]
        assert all(r["type"] == "error" and r["code"] == "bad_request" for r in replies)
        assert replies[3]["id"] == 7
        with pytest.raises(websockets.ConnectionClosed):
            await a.recv()
        assert a.ws.close_code == CloseCode.POLICY_VIOLATION
        assert dict(subscription_stats(server.app).closed) == {1008: 1}


async def test_require_user_and_connection_refusal(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub, require_user=True)) as server:
        ws = await websockets.connect(server.ws_url("/ws"))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), scaled(10))
        assert ws.close_code == 4401
        a = await connect(server, "?user=bob")
        await a.request("subscribe", topic="kick")
        assert (await a.recv())["code"] == "forbidden"
        with pytest.raises(websockets.ConnectionClosed):
            await a.recv()
        assert a.ws.close_code == 4403


async def test_server_side_join_still_works_next_to_the_protocol(hub: BroadcastHub) -> None:
    class Old(tornado.websocket.WebSocketHandler):
        def open(self) -> None:
            hub.group("legacy").join(self)

    app = tornado.web.Application([(r"/old", Old), (r"/ws", Live, {"hub": hub})])
    async with AppServer(app) as server:
        ws = await websockets.connect(server.ws_url("/old"))
        group = hub.group("legacy")
        await wait_until(lambda: len(group) == 1)
        await group.publish("raw")
        assert await asyncio.wait_for(ws.recv(), scaled(10)) == "raw"
        await ws.close()


async def test_resubscribe_after_a_restart_gets_the_new_epoch_from_its_start() -> None:
    """A restarted in-memory server (new epoch) accepted messages before the client came back."""
    first = BroadcastHub(MemoryBackend(epoch="before"), history=100)
    async with AppServer(make_app(first)) as server:
        a = await connect(server)
        await a.request("subscribe", topic="room:r")
        assert (await a.recv())["cursor"] == "before-0"
        await subscription_group(first, "room:r").publish('"x"')
        last = (await a.recv())["cursor"]
        assert last == "before-1"
        await a.ws.close()
    await first.close(spread=0)
    second = BroadcastHub(MemoryBackend(epoch="after"), history=100)
    group = subscription_group(second, "room:r")
    for i in range(3):
        await group.publish(json.dumps(i))  # accepted before the client reconnects
    async with AppServer(make_app(second)) as server:
        a = await connect(server)
        await a.request("subscribe", topic="room:r", cursor=last)
        assert await a.recv() == {
            "type": "subscribed",
            "id": 1,
            "topic": "room:r",
            "cursor": "after-3",
        }
        assert await a.recv() == {
            "type": "resync",
            "topic": "room:r",
            "cursor": "after-0",
            "reason": "epoch",
        }
        await group.publish(json.dumps(3))
        got = [await a.recv() for _ in range(4)]
        assert [(m["cursor"], m["data"]) for m in got] == [
            ("after-1", 0),
            ("after-2", 1),
            ("after-3", 2),
            ("after-4", 3),
        ]
        await a.ws.close()
    await second.close(spread=0)


class Revoking(Live):
    """Ends a subscription from the server side when the client calls ``revoke``."""

    async def on_call(self, method: str, params: Any) -> Any:
        if method == "revoke":
            return self.end_subscription(params, "access revoked")
        return await super().on_call(method, params)


async def test_server_ends_a_subscription_and_frame_size_limit(hub: BroadcastHub) -> None:
    app = tornado.web.Application([(r"/ws", Revoking, {"hub": hub, "max_frame_size": 1000})])
    async with AppServer(app) as server:
        a = await connect(server)
        await a.request("subscribe", topic="room:x")
        assert (await a.recv())["type"] == "subscribed"
        await a.request("call", method="revoke", params="room:x")
        frames = [await a.recv(), await a.recv()]
        assert {
            "type": "unsubscribed",
            "id": None,
            "topic": "room:x",
            "reason": "access revoked",
        } in frames
        assert {"type": "result", "id": 2, "result": True} in frames
        await subscription_group(hub, "room:x").publish('"after"')
        await a.request("publish", topic="room:y", data="x" * 2000)
        too_large = await a.recv()  # and nothing of room:x before it
        assert too_large["code"] == "too_large" and too_large["status"] == 413
        await a.request("call", method="revoke", params="room:x")
        assert (await a.recv())["result"] is False
        assert subscription_stats(server.app).protocol_errors == 0
        await a.ws.close()


class Beating(HeartbeatMixin, Live):
    """The protocol with application-level heartbeats (``{"type":"ping"}`` / ``pong``)."""

    heartbeat_mode = "application"
    heartbeat_interval = 0.05


async def test_application_heartbeats_are_the_protocols_ping_and_pong(hub: BroadcastHub) -> None:
    app = tornado.web.Application([(r"/ws", Beating, {"hub": hub})])
    async with AppServer(app) as server:
        a = await connect(server)
        assert await a.until("ping") == {"type": "ping"}
        await a.send({"type": "pong"})  # swallowed by the heartbeat: no reply
        await a.request("call", method="echo", params=1)
        reply = await a.until("result")
        assert reply["id"] == 1 and reply["result"]["params"] == 1
        assert subscription_stats(server.app).protocol_errors == 0
        await a.ws.close()


class UnavailableHeads(MemoryBackend):
    """In memory, but answering like a remote backend (no ``since_nowait``), with
    ``failures`` head reads failing as unavailable first."""

    since_nowait = None  # type: ignore[assignment]

    def __init__(self, failures: int) -> None:
        super().__init__(epoch="ep1")
        self.failures = failures

    async def since(self, topic: str, cursor: Any, *, limit: int | None = None) -> Any:
        if cursor is None and self.failures > 0:
            self.failures -= 1
            raise BackendUnavailableError("command pool exhausted")
        return MemoryBackend.since_nowait(self, topic, cursor, limit=limit)


@pytest.mark.parametrize("failures", [3, subscriptions_module._HEAD_RETRIES + 1])
async def test_an_unavailable_head_read_is_tried_again_before_answering_unavailable(
    failures: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscriptions_module, "_HEAD_RETRY_BASE", 0.001)
    monkeypatch.setattr(subscriptions_module, "_HEAD_RETRY_CAP", 0.001)
    backend = UnavailableHeads(failures)
    hub = BroadcastHub(backend, history=100)
    try:
        async with AppServer(make_app(hub)) as server:
            client = await connect(server)
            await client.request("subscribe", topic="room:1")
            answer = await client.recv()
            if failures <= subscriptions_module._HEAD_RETRIES:
                assert answer["type"] == "subscribed" and answer["cursor"] == "ep1-0"
            else:
                assert answer["type"] == "error" and answer["code"] == "unavailable"
                assert answer["status"] == 503 and answer["topic"] == "room:1"
            assert backend.failures == 0  # every retry was made
            await client.ws.close()
    finally:
        await hub.close(spread=0)


async def test_a_request_cancelled_before_it_ran_leaves_no_coroutine_unawaited(
    hub: BroadcastHub,
) -> None:
    # A subscribe behind an async hook, and the close frame in the same write: the
    # connection closes (cancelling the request's task) before the task first runs.
    import gc
    import warnings

    from tornado_longconn.testing import WebSocketTestClient

    subscribe = json.dumps({"type": "subscribe", "id": 1, "topic": "slow:1"}).encode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with AppServer(make_app(hub)) as server:
            for _ in range(20):
                client = await WebSocketTestClient.connect(server.ws_url("/ws"))
                await client.send_raw(
                    WebSocketTestClient.build_frame(0x1, subscribe)
                    + WebSocketTestClient.build_frame(0x8, b"\x03\xe8")
                )
                await client.wait_closed(scaled(10))
        gc.collect()
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert unawaited == []
