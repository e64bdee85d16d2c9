"""The nginx recipe (docs/examples/nginx.conf) with a real nginx in front of a test app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.web
import tornado.websocket
import websockets

from tests.helpers import EXAMPLES, free_port, wait_listening
from tornado_longconn import BroadcastHub, MemoryBackend
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.subscriptions import SubscriptionMixin, subscription_group
from tornado_longconn.subscriptions_http import SubscriptionSSEHandler
from tornado_longconn.testing import AppServer, scaled

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed"),
]


class Socket(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub


class WhoAmI(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"ip": self.request.remote_ip})


@contextlib.asynccontextmanager
async def nginx(tmp: Path, upstream: int) -> AsyncIterator[int]:
    """nginx with the recipe on a free port, proxying to 127.0.0.1:``upstream``."""
    assert NGINX is not None
    port = free_port()
    recipe = (EXAMPLES / "nginx.conf").read_text()
    assert "listen 8080;" in recipe and "server 127.0.0.1:8888;" in recipe
    recipe = recipe.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    recipe = recipe.replace("server 127.0.0.1:8888;", f"server 127.0.0.1:{upstream};")
    (tmp / "longconn.conf").write_text(recipe)
    temps = "\n".join(
        f"  {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp / "nginx.conf").write_text(
        f"""worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"};
events {{ worker_connections 256; }}
http {{
  access_log off;
{temps}
  include {tmp / "longconn.conf"};
}}
"""
    )
    proc = await asyncio.create_subprocess_exec(
        NGINX,
        "-p",
        str(tmp),
        "-e",
        str(tmp / "error.log"),
        "-c",
        str(tmp / "nginx.conf"),
        "-g",
        "daemon off;",
    )
    try:
        await wait_listening(port)  # nginx says nothing when it listens
        yield port
    finally:
        proc.terminate()
        await proc.wait()


@pytest.fixture
async def hub() -> AsyncIterator[BroadcastHub]:
    hub = BroadcastHub(MemoryBackend(epoch="ep"), history=100)
    yield hub
    await hub.close(spread=0)


async def test_websocket_and_sse_through_nginx(hub: BroadcastHub, tmp_path: Path) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/ws", Socket, {"hub": hub}),
            (r"/events", SubscriptionSSEHandler, {"hub": hub, "waiter": waiter}),
            (r"/whoami", WhoAmI),
        ]
    )
    async with AppServer(app, xheaders=True) as server, nginx(tmp_path, server.port) as port:
        base = f"127.0.0.1:{port}"
        # WebSocket upgrade through the proxy: subscribe, then a message arrives
        async with websockets.connect(f"ws://{base}/ws") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": "room"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))["type"] == "subscribed"
            await subscription_group(hub, "room").publish(json.dumps("over ws"))
            got: Any = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
            assert got["data"] == "over ws"
        # SSE unbuffered: each event reaches the client while the stream stays open
        async with httpx.AsyncClient(timeout=scaled(20)) as client:
            who = (await client.get(f"http://{base}/whoami")).json()
            assert who == {"ip": "127.0.0.1"}  # X-Real-IP, read with xheaders=True
            async with client.stream(
                "GET", f"http://{base}/events", params={"topics": "room"}
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.aiter_lines()
                async for line in lines:  # the ready event, to its blank line
                    if not line:
                        break
                for i in range(3):
                    await subscription_group(hub, "room").publish(json.dumps(i))
                    async for line in lines:
                        if line.startswith("data: "):
                            assert json.loads(line[6:])["data"] == i
                            break
    await waiter.close()
