"""Identity on the subscriptions protocol: a token in the first message, expiry, refresh.

Real WebSocket clients (``websockets``) against a real server; expiries are a
fraction of a second (scaled by ``LONGCONN_TEST_TIMEOUT_FACTOR``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import tornado.web
import tornado.websocket
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.helpers import wait_until
from tornado_longconn import BroadcastHub, CloseCode, MemoryBackend
from tornado_longconn.auth import Credentials
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.subscriptions import (
    SubscriptionError,
    SubscriptionMixin,
    subscription_stats,
)
from tornado_longconn.subscriptions_http import SubscriptionPollHandler, SubscriptionSSEHandler
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(60)

#: token -> (user, seconds from now until it expires; None: never)
TOKENS: dict[str, tuple[str, float | None]] = {}
BANNED = {"mallory"}


def issue(token: str, user: str, lifetime: float | None) -> str:
    TOKENS[token] = (user, None if lifetime is None else time.time() + lifetime)
    return token


class TokenSocket(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    """Identity from the first message (or a header), checked by ``authenticate``."""

    def initialize(self, hub: BroadcastHub, **settings: Any) -> None:
        self.subscription_hub = hub
        for key, value in settings.items():
            setattr(self, key, value)

    def get_current_user(self) -> str | None:
        header = self.request.headers.get("X-Token")
        found = TOKENS.get(header) if header else None
        return found[0] if found else None

    def connection_expiry(self) -> float | None:
        return TOKENS[self.request.headers["X-Token"]][1]

    async def authenticate(self, token: str) -> Credentials:
        await asyncio.sleep(0)  # an async hook (e.g. asks an identity provider)
        found = TOKENS.get(token)
        if found is None:
            raise SubscriptionError("unauthorized", "invalid token")
        user, expires_at = found
        if user in BANNED:
            raise SubscriptionError("forbidden", "banned")
        return Credentials(user, expires_at)


@pytest.fixture
async def hub() -> AsyncIterator[BroadcastHub]:
    hub = BroadcastHub(MemoryBackend(epoch="ep"), history=100)
    yield hub
    await hub.close(spread=0)


@contextlib.asynccontextmanager
async def serve(hub: BroadcastHub, **settings: Any) -> AsyncIterator[AppServer]:
    app = tornado.web.Application([(r"/ws", TokenSocket, {"hub": hub, **settings})])
    async with AppServer(app) as server:
        yield server


async def recv(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))


async def open_ws(server: AppServer, **kwargs: Any) -> tuple[ClientConnection, Any]:
    ws = await websockets.connect(server.ws_url("/ws"), **kwargs)
    welcome = await recv(ws)
    assert welcome["type"] == "welcome"
    return ws, welcome


async def request(ws: ClientConnection, obj: dict[str, Any]) -> Any:
    await ws.send(json.dumps(obj))
    return await recv(ws)


async def closed(ws: ClientConnection) -> tuple[list[Any], int | None, str | None]:
    """Frames until the server closes, the close code and reason."""
    frames = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            frames.append(await recv(ws))
    return frames, ws.close_code, ws.close_reason


async def test_token_in_first_message(hub: BroadcastHub) -> None:
    async with serve(hub, auth_timeout=scaled(10), require_user=True) as server:
        ws, welcome = await open_ws(server)
        assert "expires_in" in welcome  # the deadline to authenticate
        early = await request(ws, {"type": "subscribe", "id": 1, "topic": "room"})
        assert (early["type"], early["code"], early["status"]) == ("error", "unauthorized", 401)
        token = issue("t-ann", "ann", 600)
        answer = await request(ws, {"type": "auth", "id": 2, "token": token})
        assert answer["type"] == "authenticated" and answer["user"] == "ann"
        assert 0 < answer["expires_in"] <= 600
        assert (await request(ws, {"type": "subscribe", "id": 3, "topic": "room"}))[
            "type"
        ] == "subscribed"
        await ws.close()


@pytest.mark.parametrize(
    ("token", "code", "reason"),
    [
        ("forged", CloseCode.UNAUTHORIZED, "invalid token"),
        ("t-old", CloseCode.UNAUTHORIZED, "the token has expired"),
        ("t-mallory", CloseCode.FORBIDDEN, "banned"),
    ],
)
async def test_bad_tokens_close_the_connection(
    hub: BroadcastHub, token: str, code: int, reason: str
) -> None:
    issue("t-old", "ann", -1)
    issue("t-mallory", "mallory", 600)
    async with serve(hub, auth_timeout=scaled(10)) as server:
        ws, _ = await open_ws(server)
        other, _ = await open_ws(server)  # another client is not affected
        await ws.send(json.dumps({"type": "auth", "id": 1, "token": token}))
        frames, close_code, close_reason = await closed(ws)
        assert [(f["type"], f["code"], f["reason"]) for f in frames] == [
            ("error", "unauthorized" if code == 4401 else "forbidden", reason)
        ]
        assert (close_code, close_reason) == (code, reason)
        assert dict(subscription_stats(server.app).closed) == {code: 1}
        pong = await request(other, {"type": "auth", "id": 9, "token": issue("t-b", "bob", 60)})
        assert pong["type"] == "authenticated"
        await other.close()


async def test_a_token_without_string_is_a_bad_request(hub: BroadcastHub) -> None:
    async with serve(hub, auth_timeout=scaled(10)) as server:
        ws, _ = await open_ws(server)
        answer = await request(ws, {"type": "auth", "id": 1, "token": 5})
        assert answer["code"] == "bad_request" and answer["id"] == 1
        await ws.close()


async def test_no_auth_within_the_timeout_closes_4401(hub: BroadcastHub) -> None:
    async with serve(hub, auth_timeout=scaled(0.2), require_user=True) as server:
        ws, _ = await open_ws(server)
        assert await closed(ws) == ([], 4401, "authentication timeout")


async def test_expiry_lapses_without_refresh_and_moves_with_it(hub: BroadcastHub) -> None:
    async with serve(hub, auth_timeout=scaled(10)) as server:
        lapsing, _ = await open_ws(server)
        first = await request(
            lapsing, {"type": "auth", "id": 1, "token": issue("t-1", "ann", scaled(0.3))}
        )
        assert first["type"] == "authenticated"
        assert await closed(lapsing) == ([], 4401, "expired")

        kept, _ = await open_ws(server)
        await request(kept, {"type": "auth", "id": 1, "token": issue("t-2", "ann", scaled(0.3))})
        new_expiry = time.time() + scaled(0.8)
        TOKENS["t-3"] = ("ann", new_expiry)
        renewed = await request(kept, {"type": "refresh", "id": 2, "token": "t-3"})
        assert renewed["type"] == "authenticated" and renewed["expires_in"] > scaled(0.3)
        assert await closed(kept) == ([], 4401, "expired")
        assert time.time() >= new_expiry  # not at the first token's expiry


async def test_refresh_with_another_users_token_is_forbidden(hub: BroadcastHub) -> None:
    async with serve(hub, auth_timeout=scaled(10)) as server:
        ws, _ = await open_ws(server)
        await request(ws, {"type": "auth", "id": 1, "token": issue("t-a", "ann", 60)})
        await ws.send(json.dumps({"type": "refresh", "id": 2, "token": issue("t-b", "bob", 60)}))
        frames, code, reason = await closed(ws)
        assert [f["code"] for f in frames] == ["forbidden"]
        assert (code, reason) == (4403, "the token is another user's")


async def test_header_identity_expires_and_refreshes(hub: BroadcastHub) -> None:
    async with serve(hub, require_user=True) as server:
        token = issue("t-h", "ann", scaled(0.4))
        ws, welcome = await open_ws(server, additional_headers={"X-Token": token})
        assert 0 < welcome["expires_in"] <= scaled(0.4)
        assert await closed(ws) == ([], 4401, "expired")
        # a header token that expired already: closed at open, no welcome
        old = issue("t-h-old", "ann", -1)
        late = await websockets.connect(server.ws_url("/ws"), additional_headers={"X-Token": old})
        assert await closed(late) == ([], 4401, "expired")


async def test_per_user_cap_applies_once_the_token_names_the_user(hub: BroadcastHub) -> None:
    async with serve(hub, auth_timeout=scaled(10), max_connections_per_user=2) as server:
        ann = issue("t-ann", "ann", 600)
        kept = []
        for i in range(2):
            ws, _ = await open_ws(server)
            assert (await request(ws, {"type": "auth", "id": i, "token": ann}))[
                "type"
            ] == "authenticated"
            kept.append(ws)
        third, _ = await open_ws(server)  # anonymous: not counted yet
        await third.send(json.dumps({"type": "auth", "id": 1, "token": ann}))
        assert await closed(third) == ([], 4429, "too many connections per user")
        bob, _ = await open_ws(server)
        answer = await request(bob, {"type": "auth", "id": 1, "token": issue("t-bob", "bob", 60)})
        assert answer["type"] == "authenticated"
        assert dict(subscription_stats(server.app).refused) == {"user": 1}
        # a slot freed by a close is free again
        await kept.pop().close()
        await wait_until(lambda: subscription_stats(server.app).connections == 2)
        again, _ = await open_ws(server)
        reply = await request(again, {"type": "auth", "id": 1, "token": ann})
        assert reply["type"] == "authenticated"
        kept.append(again)
        for ws in [*kept, bob]:
            await ws.close()


class HeaderHTTP:
    """Identity and expiry from ``X-Token`` for the HTTP handlers."""

    def get_current_user(self: Any) -> str | None:
        found = TOKENS.get(self.request.headers.get("X-Token", ""))
        return found[0] if found else None

    def connection_expiry(self: Any) -> float | None:
        return TOKENS[self.request.headers["X-Token"]][1]


class ExpiringSSE(HeaderHTTP, SubscriptionSSEHandler):
    pass


class ExpiringPoll(HeaderHTTP, SubscriptionPollHandler):
    pass


async def test_sse_stream_ends_at_expiry_with_a_final_event_and_an_expired_poll_gets_401(
    hub: BroadcastHub,
) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/events", ExpiringSSE, {"hub": hub, "waiter": waiter}),
            (r"/poll", ExpiringPoll, {"hub": hub, "waiter": waiter}),
        ]
    )
    async with AppServer(app) as server, httpx.AsyncClient(timeout=scaled(20)) as client:
        expires_at = time.time() + scaled(0.4)
        TOKENS["t-sse"] = ("ann", expires_at)
        headers = {"X-Token": "t-sse"}
        params = {"topics": "room"}
        async with client.stream(
            "GET", server.url("/events"), params=params, headers=headers
        ) as stream:
            assert stream.status_code == 200
            lines = [line async for line in stream.aiter_lines()]  # until the server ends it
        assert time.time() >= expires_at
        assert any(line.startswith("event: ready") for line in lines)
        # The last event says why the stream ended (4401 expired), as a WebSocket's close.
        events = [i for i, line in enumerate(lines) if line.startswith("event: ")]
        assert lines[events[-1]] == "event: disconnect"
        final = json.loads(lines[events[-1] + 1].removeprefix("data: "))
        assert final == {"type": "disconnect", "code": 4401, "reason": "expired"}
        again = await client.get(server.url("/events"), params=params, headers=headers)
        assert again.status_code == 401
        assert again.json() == {"code": "unauthorized", "reason": "expired"}
        poll = await client.get(
            server.url("/poll"), params={**params, "timeout": "0"}, headers=headers
        )
        assert poll.status_code == 401
        assert dict(subscription_stats(app).errors)["unauthorized"] == 3
    await waiter.close()


async def test_anonymous_connections_awaiting_auth_count_against_the_ip_cap(
    hub: BroadcastHub,
) -> None:
    settings = {"auth_timeout": scaled(10), "require_user": True, "max_connections_per_ip": 1}
    async with serve(hub, **settings) as server:
        first, _ = await open_ws(server)
        second = await websockets.connect(server.ws_url("/ws"))
        assert await closed(second) == ([], 4429, "too many connections per ip")
        await first.close()
