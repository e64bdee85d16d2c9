"""Origin policy on every transport: same-origin by default, an allow-list, 403 for the rest.

Real clients on real sockets: ``websockets`` for WebSocket handshakes (403 before
the upgrade), ``httpx`` for SSE, long-poll and publish (403 JSON, CORS headers
for allowed origins) and for the tus preflight (no CORS header for an origin not
in ``cors_origins``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.web
import tornado.websocket
import websockets

from tornado_longconn import BroadcastHub, MemoryBackend
from tornado_longconn.heartbeat import HeartbeatMixin
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.origin import origin_allowed
from tornado_longconn.sse import SSEHandler
from tornado_longconn.subscriptions import SubscriptionMixin, subscription_stats
from tornado_longconn.subscriptions_http import (
    SubscriptionPollHandler,
    SubscriptionPublishHandler,
    SubscriptionSSEHandler,
)
from tornado_longconn.testing import AppServer, scaled
from tornado_longconn.upload import UploadStore
from tornado_longconn.upload_tus import TusUploadHandler

pytestmark = pytest.mark.timeout(60)

EVIL = "https://evil.example"
FRIEND = "https://app.example"


class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub


class Beat(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    def on_message(self, message: str | bytes) -> None:
        pass


class Publish(SubscriptionPublishHandler):
    def authorize_publish(self, topic: str, data: Any) -> bool:
        return True


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, **settings: Any) -> AsyncIterator[AppServer]:
    hub = BroadcastHub(MemoryBackend(epoch="ep"), history=10)
    waiter = LongPollWaiter(hub.backend, linger=0)
    store = UploadStore(tmp_path / "up", max_size=1000)
    app = tornado.web.Application(
        [
            (r"/ws", Live, {"hub": hub}),
            (r"/beat", Beat),
            (r"/events", SubscriptionSSEHandler, {"hub": hub, "waiter": waiter}),
            (r"/poll", SubscriptionPollHandler, {"hub": hub, "waiter": waiter}),
            (r"/publish", Publish, {"hub": hub}),
            (r"/one/events", SSEHandler, {"waiter": waiter, "topic": "room"}),
            (r"/one/poll", LongPollHandler, {"waiter": waiter, "topic": "room"}),
            *TusUploadHandler.routes("/files", store=store, cors_origins=[FRIEND]),
        ],
        **settings,
    )
    async with AppServer(app) as server:
        yield server
    await waiter.close()
    await hub.close(spread=0)
    store.close()


def own(server: AppServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def handshake(server: AppServer, path: str, origin: str | None) -> int:
    """101 when the upgrade succeeds, else the HTTP status of the refusal."""
    kwargs: dict[str, Any] = {}
    if origin is not None:
        kwargs["origin"] = websockets.Origin(origin)
    try:
        ws = await websockets.connect(server.ws_url(path), open_timeout=scaled(10), **kwargs)
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


@pytest.mark.parametrize("path", ["/ws", "/beat"])
async def test_websocket_same_origin_by_default(tmp_path: Path, path: str) -> None:
    async with serve(tmp_path) as server:
        assert await handshake(server, path, own(server)) == 101
        assert await handshake(server, path, None) == 101  # not a browser
        assert await handshake(server, path, EVIL) == 403
        assert await handshake(server, path, "null") == 403
        assert dict(subscription_stats(server.app).refused) == {"origin": 2}


async def test_websocket_allow_list(tmp_path: Path) -> None:
    async with serve(tmp_path, longconn_allowed_origins=frozenset({FRIEND})) as server:
        assert await handshake(server, "/ws", FRIEND) == 101
        assert await handshake(server, "/beat", FRIEND) == 101
        assert await handshake(server, "/ws", EVIL) == 403


HTTP_GETS = [
    ("/events", {"topics": "room"}),
    ("/poll", {"topics": "room", "timeout": "0"}),
    ("/one/events", {}),
    ("/one/poll", {"timeout": "0"}),
]


async def first_status(
    client: httpx.AsyncClient, url: str, params: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    """The response head (an SSE stream is left as soon as it started)."""
    async with client.stream("GET", url, params=params, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
        return response


@pytest.mark.parametrize(("path", "params"), HTTP_GETS)
async def test_sse_and_long_poll_refuse_other_origins(
    tmp_path: Path, path: str, params: dict[str, str]
) -> None:
    async with (
        serve(tmp_path, longconn_allowed_origins=[FRIEND]) as server,
        httpx.AsyncClient(timeout=scaled(10)) as client,
    ):
        url = server.url(path)
        refused = await first_status(client, url, params, {"Origin": EVIL})
        assert refused.status_code == 403
        assert refused.json() == {"code": "forbidden", "reason": "cross-origin request refused"}
        assert "access-control-allow-origin" not in refused.headers
        # a no-cors GET from another site carries no Origin, but Sec-Fetch-Site
        sneaky = await first_status(client, url, params, {"Sec-Fetch-Site": "cross-site"})
        assert sneaky.status_code == 403
        same = await first_status(client, url, params, {"Origin": own(server)})
        assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
        friend = await first_status(client, url, params, {"Origin": FRIEND})
        assert friend.status_code == 200
        assert friend.headers["Access-Control-Allow-Origin"] == FRIEND
        assert friend.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in friend.headers["Vary"]
        plain = await first_status(client, url, params, {})
        assert plain.status_code == 200
        assert dict(subscription_stats(server.app).refused) == {"origin": 2}


async def test_http_publish_and_its_preflight(tmp_path: Path) -> None:
    async with (
        serve(tmp_path, longconn_allowed_origins=[FRIEND]) as server,
        httpx.AsyncClient(timeout=scaled(10)) as client,
    ):
        url = server.url("/publish")
        body = {"topic": "room", "data": 1}
        refused = await client.post(url, json=body, headers={"Origin": EVIL})
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        preflight = {"Access-Control-Request-Method": "POST"}
        bad = await client.options(url, headers={"Origin": EVIL, **preflight})
        assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
        good = await client.options(url, headers={"Origin": FRIEND, **preflight})
        assert good.status_code == 204
        assert good.headers["Access-Control-Allow-Origin"] == FRIEND
        assert "POST" in good.headers["Access-Control-Allow-Methods"]
        sent = await client.post(url, json=body, headers={"Origin": FRIEND})
        assert sent.status_code == 200 and sent.headers["Access-Control-Allow-Origin"] == FRIEND
        same = await client.post(url, json=body, headers={"Origin": own(server)})
        assert same.status_code == 200


async def test_tus_preflight_gives_no_cors_to_other_origins(tmp_path: Path) -> None:
    async with serve(tmp_path) as server, httpx.AsyncClient(timeout=scaled(10)) as client:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "tus-resumable,upload-length",
        }
        bad = await client.options(server.url("/files/"), headers={"Origin": EVIL, **preflight})
        assert "access-control-allow-origin" not in bad.headers
        assert "access-control-allow-methods" not in bad.headers
        good = await client.options(server.url("/files/"), headers={"Origin": FRIEND, **preflight})
        assert good.headers["Access-Control-Allow-Origin"] == FRIEND
        assert "PATCH" in good.headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "site", "expected"),
    [
        ("http://a.example:8080", "A.example:8080", None, None, True),
        ("http://a.example:8080", "a.example", None, None, False),  # another port
        ("https://a.example", "b.example", ["https://a.example"], None, True),
        ("https://a.example", "b.example", "*", None, True),
        ("https://a.example", "b.example", "https://a.example", None, False),  # not a list
        ("null", "a.example", None, None, False),
        (None, "a.example", None, "same-origin", True),
        (None, "a.example", None, "cross-site", False),
        (None, "a.example", "*", "cross-site", True),
        ("not a url", "a.example", None, None, False),
    ],
)
def test_origin_allowed_rule(
    origin: str | None, host: str, allowed: Any, site: str | None, expected: bool
) -> None:
    assert origin_allowed(origin, host, allowed, site) is expected
