"""Production controls over real sockets: rate limits and connection caps."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import tornado.web
import tornado.websocket
import websockets
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.helpers import load_example, wait_until
from tornado_longconn import BroadcastHub, CloseCode, MemoryBackend
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.metrics import LongConnCollector
from tornado_longconn.ratelimit import RateLimits
from tornado_longconn.subscriptions import SubscriptionMixin, subscription_stats
from tornado_longconn.subscriptions_http import (
    SubscriptionPollHandler,
    SubscriptionPublishHandler,
    SubscriptionSSEHandler,
)
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(60)


class Open(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    """Anyone may publish anywhere; the limits come from the route."""

    def initialize(self, hub: BroadcastHub, **settings: Any) -> None:
        self.subscription_hub = hub
        for key, value in settings.items():
            setattr(self, key, value)

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return True


@pytest.fixture
async def hub() -> AsyncIterator[BroadcastHub]:
    hub = BroadcastHub(MemoryBackend(epoch="ep"), history=1000)
    yield hub
    await hub.close(spread=0)


def make_app(hub: BroadcastHub, **settings: Any) -> tornado.web.Application:
    return tornado.web.Application([(r"/ws", Open, {"hub": hub, **settings})])


async def connect(server: AppServer) -> ClientConnection:
    ws = await websockets.connect(server.ws_url("/ws"), max_size=None)
    welcome = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
    assert welcome["type"] == "welcome"
    return ws


async def recv(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))


async def drain_frames(ws: ClientConnection) -> list[Any]:
    """Every frame until the server closes the connection."""
    frames = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            frames.append(await recv(ws))
    return frames


LIMITS = RateLimits(messages_per_second=20, message_burst=20, max_breaches=5)


async def test_flooder_gets_limit_errors_then_4429_others_unaffected(hub: BroadcastHub) -> None:
    async with AppServer(make_app(hub, rate_limits=LIMITS)) as server:
        reader = await connect(server)
        await reader.send(json.dumps({"type": "subscribe", "id": 1, "topic": "room"}))
        assert (await recv(reader))["type"] == "subscribed"
        good = await connect(server)
        flooder = await connect(server)
        # 10x the burst in one go
        with contextlib.suppress(ConnectionClosed):
            for i in range(200):
                frame = {"type": "publish", "id": i, "topic": "flood", "data": i}
                await flooder.send(json.dumps(frame))
        frames = await drain_frames(flooder)
        assert flooder.close_code == CloseCode.RATE_LIMITED == 4429
        errors = [f for f in frames if f.get("type") == "error"]
        published = [f for f in frames if f.get("type") == "published"]
        assert len(errors) == LIMITS.max_breaches + 1
        assert all(e["code"] == "limit" and e["status"] == 429 for e in errors)
        assert {e["id"] for e in errors}.isdisjoint(p["id"] for p in published)
        assert len(published) >= 20
        # the well-behaved client on the same server: every message delivered
        for i in range(10):
            await good.send(json.dumps({"type": "publish", "id": i, "topic": "room", "data": i}))
            assert (await recv(good))["type"] == "published"
        got = [await recv(reader) for _ in range(10)]
        assert [m["data"] for m in got] == list(range(10))
        stats = subscription_stats(server.app)
        limited = dict(stats.rate_limited)
        assert limited == {"messages": LIMITS.max_breaches + 1}
        assert dict(stats.closed) == {4429: 1}
        assert dict(stats.errors)["limit"] == LIMITS.max_breaches + 1
        registry = CollectorRegistry()
        registry.register(LongConnCollector(application=server.app))
        text = generate_latest(registry).decode()
        assert 'longconn_subscription_rate_limited_total{limit="messages"} 6' in text
        assert 'longconn_subscription_closes_total{code="4429"} 1' in text
        await good.close()
        await reader.close()


async def test_publish_rate_per_topic(hub: BroadcastHub) -> None:
    limits = RateLimits(publishes_per_second=0.01, publish_burst=2, max_breaches=100)
    async with AppServer(make_app(hub, rate_limits=limits)) as server:
        ws = await connect(server)
        answers = []
        for i, topic in enumerate(["a", "a", "a", "b", "b", "b"]):
            await ws.send(json.dumps({"type": "publish", "id": i, "topic": topic, "data": i}))
            answers.append(await recv(ws))
        kinds = [(a["type"], a.get("code")) for a in answers]
        ok, limited = ("published", None), ("error", "limit")
        assert kinds == [ok, ok, limited, ok, ok, limited]
        assert answers[2]["topic"] == "a" and answers[2]["id"] == 2
        # other requests of the connection still work
        await ws.send(json.dumps({"type": "subscribe", "id": 99, "topic": "a"}))
        assert (await recv(ws))["type"] == "subscribed"
        assert dict(subscription_stats(server.app).rate_limited) == {"publishes": 2}
        await ws.close()


async def test_bytes_rate(hub: BroadcastHub) -> None:
    limits = RateLimits(bytes_per_second=1, byte_burst=300, max_breaches=0)
    async with AppServer(make_app(hub, rate_limits=limits)) as server:
        ws = await connect(server)
        big = {"type": "publish", "id": 1, "topic": "t", "data": "x" * 200}
        await ws.send(json.dumps(big))
        assert (await recv(ws))["type"] == "published"
        await ws.send(json.dumps({**big, "id": 2}))
        frames = await drain_frames(ws)
        assert [(f["type"], f["code"], f["id"]) for f in frames] == [("error", "limit", 2)]
        assert ws.close_code == 4429
        assert dict(subscription_stats(server.app).rate_limited) == {"bytes": 1}


class Streams(SubscriptionSSEHandler):
    max_connections_per_ip = 2


class Polls(SubscriptionPollHandler):
    max_connections_per_ip = 2


async def test_websockets_per_ip_cap(hub: BroadcastHub) -> None:
    app = make_app(hub, max_connections_per_ip=3)
    async with AppServer(app) as server:
        kept = [await connect(server) for _ in range(3)]
        refused = await websockets.connect(server.ws_url("/ws"))
        assert await drain_frames(refused) == []  # no welcome: closed at once
        assert refused.close_code == CloseCode.RATE_LIMITED
        assert "per ip" in (refused.close_reason or "")
        stats = subscription_stats(app)
        assert dict(stats.refused) == {"ip": 1} and dict(stats.closed) == {4429: 1}
        # a slot freed is a slot taken again
        await kept.pop().close()
        await wait_until(lambda: subscription_stats(app).connections == 2)
        kept.append(await connect(server))
        for ws in kept:
            await ws.close()


async def test_websockets_per_user_cap(hub: BroadcastHub) -> None:
    class PerUser(Open):
        def get_current_user(self) -> str | None:
            return self.get_query_argument("user", None)

    app = tornado.web.Application([(r"/ws", PerUser, {"hub": hub, "max_connections_per_user": 2})])
    async with AppServer(app) as server:
        url = server.ws_url("/ws")
        ann = [await websockets.connect(url + "?user=ann") for _ in range(2)]
        for ws in ann:
            assert json.loads(await recv_raw(ws))["type"] == "welcome"
        third = await websockets.connect(url + "?user=ann")
        assert await drain_frames(third) == []
        assert third.close_code == 4429
        bob = await websockets.connect(url + "?user=bob")  # another user is not affected
        assert json.loads(await recv_raw(bob))["type"] == "welcome"
        assert dict(subscription_stats(app).refused) == {"user": 1}
        for ws in [*ann, bob]:
            await ws.close()


async def recv_raw(ws: ClientConnection) -> Any:
    return await asyncio.wait_for(ws.recv(), scaled(10))


async def test_http_streams_and_polls_share_the_per_ip_cap(hub: BroadcastHub) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/events", Streams, {"hub": hub, "waiter": waiter}),
            (r"/poll", Polls, {"hub": hub, "waiter": waiter}),
        ]
    )
    async with AppServer(app) as server, httpx.AsyncClient(timeout=scaled(20)) as client:
        params = {"topics": "room"}
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                response = await stack.enter_async_context(
                    client.stream("GET", server.url("/events"), params=params)
                )
                assert response.status_code == 200
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith(("retry", "event", "id", ":"))
            refused = await client.get(server.url("/poll"), params={**params, "timeout": "0"})
            assert refused.status_code == 429
            assert refused.json()["code"] == "limit"
            assert refused.headers["Retry-After"] == "1"
            assert dict(subscription_stats(app).refused) == {"ip": 1}
        # the streams ended: their slots are free again
        await wait_until(lambda: waiter.stats().waiting == 0)
        answered = await client.get(server.url("/poll"), params={**params, "timeout": "0"})
        assert answered.status_code == 200
    await waiter.close()


# -- docs/examples/controls_app.py: the three ways to say who a client is ------------

EXAMPLE = load_example("controls_app")
SECRET = "s" * 32


@contextlib.asynccontextmanager
async def example_server(hub: BroadcastHub) -> AsyncIterator[AppServer]:
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = EXAMPLE.make_app(
        hub, waiter, cookie_secret=SECRET, allowed_origins=frozenset({"https://app.example"})
    )
    async with AppServer(app) as server:
        yield server
    await waiter.close()


async def welcomed(url: str, **kwargs: Any) -> ClientConnection:
    ws = await websockets.connect(url, **kwargs)
    assert json.loads(await recv_raw(ws))["type"] == "welcome"
    return ws


async def call(ws: ClientConnection, rid: int, method: str, params: Any = None) -> Any:
    await ws.send(json.dumps({"type": "call", "id": rid, "method": method, "params": params}))
    return await recv(ws)


async def test_example_cookie_identity(hub: BroadcastHub) -> None:
    async with example_server(hub) as server:
        cookie = tornado.web.create_signed_value(SECRET, "user", "alice").decode()
        url = server.ws_url("/ws/cookie")
        ws = await welcomed(url, additional_headers={"Cookie": f"user={cookie}"})
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": "room:1"}))
        assert (await recv(ws))["type"] == "subscribed"
        await ws.close()
        anonymous = await websockets.connect(url)
        assert await drain_frames(anonymous) == []
        assert anonymous.close_code == CloseCode.UNAUTHORIZED
        # another site's page cannot use the cookie
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, origin=websockets.Origin("https://evil.example"))
        assert refused.value.response.status_code == 403


async def test_example_header_identity(hub: BroadcastHub) -> None:
    async with example_server(hub) as server:
        url = server.ws_url("/ws/header")
        ws = await welcomed(url, additional_headers={"Authorization": "Bearer t-bob"})
        await ws.close()
        wrong = await websockets.connect(url, additional_headers={"Authorization": "Bearer nope"})
        assert await drain_frames(wrong) == []
        assert wrong.close_code == CloseCode.UNAUTHORIZED


async def test_example_token_in_first_message_and_expiry(hub: BroadcastHub) -> None:
    async with example_server(hub) as server:
        url = server.ws_url("/ws/token")
        ws = await welcomed(url)
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": "room:1"}))
        refused = await recv(ws)
        assert refused["code"] == "unauthorized" and refused["status"] == 401
        await ws.send(json.dumps({"type": "auth", "id": 2, "token": "t-alice"}))
        answer = await recv(ws)
        assert answer["type"] == "authenticated" and answer["user"] == "alice"
        assert 0 < answer["expires_in"] <= EXAMPLE.TokenLive.session_ttl
        await ws.send(json.dumps({"type": "subscribe", "id": 3, "topic": "room:1"}))
        assert (await recv(ws))["type"] == "subscribed"
        await ws.close()

        bad = await welcomed(url)
        await bad.send(json.dumps({"type": "auth", "id": 1, "token": "stolen?"}))
        answer = await recv(bad)
        assert answer["code"] == "unauthorized"
        assert await drain_frames(bad) == []
        assert bad.close_code == CloseCode.UNAUTHORIZED


async def test_example_session_lapses_with_4401(
    hub: BroadcastHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(EXAMPLE.TokenLive, "session_ttl", scaled(0.2))
    async with example_server(hub) as server:
        ws = await welcomed(server.ws_url("/ws/token"))
        await ws.send(json.dumps({"type": "auth", "id": 1, "token": "t-alice"}))
        assert (await recv(ws))["user"] == "alice"
        assert await drain_frames(ws) == []  # nothing until the session lapses
        assert ws.close_code == CloseCode.UNAUTHORIZED
        assert ws.close_reason == "expired"


class UserPublish(SubscriptionPublishHandler):
    rate_limits = RateLimits(user_publishes_per_second=0.01, user_publish_burst=2)

    def get_current_user(self) -> str | None:
        return self.get_query_argument("user", None)

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return True


async def test_user_publish_limit_spans_connections_and_http(hub: BroadcastHub) -> None:
    class PerUser(Open):
        def get_current_user(self) -> str | None:
            return self.get_query_argument("user", None)

    limits = RateLimits(user_publishes_per_second=0.01, user_publish_burst=2, max_breaches=100)
    app = tornado.web.Application(
        [
            (r"/ws", PerUser, {"hub": hub, "rate_limits": limits}),
            (r"/publish", UserPublish, {"hub": hub}),
        ]
    )
    async with AppServer(app) as server, httpx.AsyncClient() as client:
        url = server.ws_url("/ws")
        first = await welcomed(url + "?user=ann")
        second = await welcomed(url + "?user=ann")
        bob = await welcomed(url + "?user=bob")

        async def publish(ws: ClientConnection, rid: int, topic: str = "room") -> Any:
            await ws.send(json.dumps({"type": "publish", "id": rid, "topic": topic, "data": 1}))
            return await recv(ws)

        assert (await publish(first, 1))["type"] == "published"
        assert (await publish(second, 1))["type"] == "published"
        refused = await publish(first, 2)  # ann's burst is spent, on any connection
        assert refused["code"] == "limit" and "user_publishes" in refused["reason"]
        over_http = await client.post(
            server.url("/publish?user=ann"), json={"topic": "room", "data": 1}
        )
        assert over_http.status_code == 429 and over_http.json()["code"] == "limit"
        assert (await publish(first, 3, "other"))["type"] == "published"  # another topic
        assert (await publish(bob, 1))["type"] == "published"  # another user
        ok = await client.post(server.url("/publish?user=bob"), json={"topic": "room", "data": 2})
        assert ok.status_code == 200
        assert dict(subscription_stats(app).rate_limited) == {"user_publishes": 2}
        for ws in (first, second, bob):
            await ws.close()
