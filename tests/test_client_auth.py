"""The Python client's token authentication: auth before subscribing, refresh before expiry.

A real server (``tests/test_auth.py``'s ``TokenSocket``: identity from the first
message, checked by ``authenticate``) and the real client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import tornado.web

from tests.test_auth import TOKENS, TokenSocket
from tornado_longconn import BroadcastHub, MemoryBackend
from tornado_longconn.client import ClientError, TopicMessage, connect
from tornado_longconn.subscriptions import subscription_group
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(60)

FAST = {"backoff_base": scaled(0.02), "backoff_cap": scaled(0.2), "idle_timeout": None}


@pytest.fixture
async def hub() -> AsyncIterator[BroadcastHub]:
    hub = BroadcastHub(MemoryBackend(epoch="ep"), history=100)
    yield hub
    await hub.close(spread=0)


def app(hub: BroadcastHub) -> tornado.web.Application:
    settings = {"hub": hub, "auth_timeout": scaled(10), "require_user": True}
    return tornado.web.Application([(r"/ws", TokenSocket, settings)])


async def test_client_authenticates_then_refreshes_before_expiry(hub: BroadcastHub) -> None:
    lifetime = scaled(0.6)
    reasons: list[str] = []
    refreshed = asyncio.Event()

    async def get_token(reason: str) -> str:
        reasons.append(reason)
        token = f"t-{len(reasons)}"
        TOKENS[token] = ("ann", time.time() + lifetime)
        if reason == "refresh":
            refreshed.set()
        return token

    async with (
        AppServer(app(hub)) as server,
        connect(
            server.ws_url("/ws"), get_token=get_token, refresh_margin=lifetime / 3, **FAST
        ) as client,
    ):
        assert client.user == "ann" and client.expires_in is not None
        room = await client.subscribe("room:1")  # accepted: authenticated first
        first_expiry = TOKENS["t-1"][1]
        await asyncio.wait_for(refreshed.wait(), scaled(10))
        assert reasons[:2] == ["open", "refresh"]
        # still open after the first token's expiry, on the same connection
        # (waiting for a wall-clock time: there is no event for it)
        await asyncio.sleep(max(0.0, first_expiry - time.time()) + scaled(0.05))
        result = await subscription_group(hub, "room:1").publish('"after"')
        message = await room.get(scaled(10))
        assert message == TopicMessage("room:1", str(result.cursor), "after")
        assert client.stats().connects == 1


async def test_client_with_a_forged_token_ends_unauthorized(hub: BroadcastHub) -> None:
    async with AppServer(app(hub)) as server:
        client = connect(
            server.ws_url("/ws"), get_token=lambda reason: "forged", open_timeout=scaled(10), **FAST
        )
        with pytest.raises(ClientError) as refused:
            await client.start()
        assert refused.value.code == "unauthorized"
        await client.close()


async def test_an_identity_expired_without_refresh_reconnects_with_a_new_token(
    hub: BroadcastHub,
) -> None:
    lifetime = scaled(0.3)
    reasons: list[str] = []
    reopened = asyncio.Event()

    def get_token(reason: str) -> str:
        reasons.append(reason)
        if len(reasons) == 3:
            reopened.set()
        if reason == "refresh":
            raise RuntimeError("identity provider down")  # the refresh is missed
        token = f"t-x{len(reasons)}"
        TOKENS[token] = ("ann", time.time() + (lifetime if len(reasons) == 1 else 600))
        return token

    async with (
        AppServer(app(hub)) as server,
        connect(server.ws_url("/ws"), get_token=get_token, **FAST) as client,
    ):
        room = await client.subscribe("room:1")
        # closed with 4401 "expired", reconnected, authenticated with a new token
        await asyncio.wait_for(reopened.wait(), scaled(10))
        assert reasons[:3] == ["open", "refresh", "open"]
        result = await subscription_group(hub, "room:1").publish('"back"')
        message = await room.get(scaled(10))
        assert message == TopicMessage("room:1", str(result.cursor), "back")
