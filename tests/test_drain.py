"""Graceful drain under load: readiness 503, polls answered, streams ended, WebSockets 1001."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import tornado.web
import tornado.websocket
import websockets
from websockets.exceptions import ConnectionClosed

from tests.helpers import wait_until
from tests.test_demo import DemoServer
from tornado_longconn import BroadcastHub, CloseCode, MemoryBackend
from tornado_longconn.connections import connection_stats
from tornado_longconn.drain import ReadinessHandler, drain, is_draining
from tornado_longconn.heartbeat import HeartbeatMixin
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.subscriptions import SubscriptionMixin
from tornado_longconn.subscriptions_http import SubscriptionPollHandler, SubscriptionSSEHandler
from tornado_longconn.testing import AppServer, scaled
from tornado_longconn.upload import UploadStore
from tornado_longconn.upload_tus import TusUploadHandler

pytestmark = pytest.mark.timeout(60)

N = 5


class Socket(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub


async def sse_until_end(
    client: httpx.AsyncClient, url: str, started: asyncio.Event, topics: str = "room"
) -> int:
    """Stream until the server ends it; the status (the body must end cleanly)."""
    async with client.stream("GET", url, params={"topics": topics}) as response:
        async for line in response.aiter_lines():
            if line.startswith("event: ready"):
                started.set()
        return response.status_code


@pytest.fixture
async def hub() -> AsyncIterator[BroadcastHub]:
    hub = BroadcastHub(MemoryBackend(epoch="ep"), history=100)
    yield hub
    await hub.close(spread=0)


async def test_drain_under_load(hub: BroadcastHub) -> None:
    waiter = LongPollWaiter(hub.backend, linger=0)
    # a poll on a waiter the drain does not close: the drain waits for it
    held = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/ws", Socket, {"hub": hub}),
            (r"/events", SubscriptionSSEHandler, {"hub": hub, "waiter": waiter}),
            (r"/poll", SubscriptionPollHandler, {"hub": hub, "waiter": waiter}),
            (r"/held", SubscriptionPollHandler, {"hub": hub, "waiter": held}),
            (r"/ready", ReadinessHandler),
            (r"/beat", Beating),  # heartbeat WebSockets in no group
        ]
    )
    limits = httpx.Limits(max_connections=4 * N)
    async with (
        AppServer(app) as server,
        httpx.AsyncClient(timeout=scaled(30), limits=limits) as client,
        httpx.AsyncClient(timeout=scaled(30), limits=httpx.Limits(max_connections=1)) as probe,
    ):
        assert (await probe.get(server.url("/ready"))).json() == {"ready": True}
        sockets = []
        for _ in range(N):
            ws = await websockets.connect(server.ws_url("/ws"))
            await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": "room"}))
            sockets.append(ws)
        for ws in sockets:  # welcome, then subscribed
            frames = [json.loads(await asyncio.wait_for(ws.recv(), scaled(10))) for _ in range(2)]
            assert frames[1]["type"] == "subscribed"
        for _ in range(N):
            beat = await websockets.connect(server.ws_url("/beat"))
            await beat.send("hi")
            assert await asyncio.wait_for(beat.recv(), scaled(10)) == "hi"
            sockets.append(beat)
        started = [asyncio.Event() for _ in range(N)]
        streams = [
            asyncio.ensure_future(sse_until_end(client, server.url("/events"), ev))
            for ev in started
        ]
        for ev in started:
            await asyncio.wait_for(ev.wait(), scaled(10))
        polls = [
            asyncio.ensure_future(
                client.get(server.url("/poll"), params={"topics": "room", "timeout": "60"})
            )
            for _ in range(N)
        ]
        held_poll = asyncio.ensure_future(
            client.get(server.url("/held"), params={"topics": "room", "timeout": "60"})
        )
        stats = connection_stats(app)
        await wait_until(lambda: connection_stats(app).longpoll == N + 1)
        assert stats.sse == N

        draining = asyncio.ensure_future(
            drain(app, servers=[server.server], waiters=[waiter], hubs=[hub], spread=0.05)
        )
        # the poll of the held waiter keeps the drain waiting
        await wait_until(lambda: connection_stats(app).longpoll == 1)
        assert is_draining(app) and not draining.done()
        ready = await probe.get(server.url("/ready"))  # a kept-alive connection
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        assert ready.headers["Retry-After"] == "1"

        answers = [await asyncio.wait_for(p, scaled(10)) for p in polls]
        assert [a.status_code for a in answers] == [200] * N
        for answer in answers:
            body = answer.json()
            assert body["messages"] == [] and set(body["cursors"]) == {"room"}
        assert await asyncio.wait_for(asyncio.gather(*streams), scaled(10)) == [200] * N
        for ws in sockets:
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(10))
            assert ws.close_code == CloseCode.GOING_AWAY

        await held.close()  # the last poll is answered: the drain finishes
        left = await asyncio.wait_for(draining, scaled(10))
        assert (await held_poll).status_code == 200
        assert left.sse == 0 and left.longpoll == 0 and left.websocket == 0
    await waiter.close()


async def test_readiness_head_and_get() -> None:
    app = tornado.web.Application([(r"/ready", ReadinessHandler)])
    async with AppServer(app) as server, httpx.AsyncClient() as client:
        assert (await client.head(server.url("/ready"))).status_code == 200
        await drain(app)
        head = await client.head(server.url("/ready"))
        assert head.status_code == 503 and head.content == b""


async def test_demo_drains_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM: pending polls answered 200, SSE streams ended, WebSockets closed with 1001."""
    server = DemoServer(tmp_path)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=scaled(30)) as client:
            ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/ws?user=ann")
            await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": "room:lobby"}))
            while json.loads(await asyncio.wait_for(ws.recv(), scaled(10))).get("id") != 1:
                pass
            started = asyncio.Event()
            stream = asyncio.ensure_future(sse_until_end(client, "/sse", started, "room:lobby"))
            await asyncio.wait_for(started.wait(), scaled(10))
            poll = asyncio.ensure_future(
                client.get("/poll", params={"topics": "room:lobby", "timeout": "60"})
            )

            async def poll_waiting() -> None:
                while True:
                    inspect = (await client.get("/api/inspect")).json()
                    if inspect["connections"]["longpoll"] == 1:
                        return

            await asyncio.wait_for(poll_waiting(), scaled(10))
            assert (await client.get("/ready")).json() == {"ready": True}
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(stream, scaled(15)) == 200
            answer = await asyncio.wait_for(poll, scaled(15))
            assert answer.status_code == 200 and answer.json()["messages"] == []
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), scaled(10))
            assert ws.close_code == CloseCode.GOING_AWAY
            assert await asyncio.wait_for(server.proc.wait(), scaled(15)) == 0
        assert not [line for line in server.output if " 500 " in line or "Traceback" in line]
    finally:
        await server.stop()


async def test_drain_lets_an_upload_in_flight_finish(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads", max_size=1 << 20)
    app = tornado.web.Application(TusUploadHandler.routes("/files", store=store))
    tus = {"Tus-Resumable": "1.0.0"}
    async with AppServer(app) as server, httpx.AsyncClient() as client:
        created = await client.post(server.url("/files/"), headers={**tus, "Upload-Length": "100"})
        assert created.status_code == 201
        path = created.headers["Location"]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
            "Content-Length: 100\r\n\r\n".encode()
            + b"a" * 50
        )
        await writer.drain()
        await wait_until(lambda: store.stats().active == 1)
        draining = asyncio.ensure_future(
            drain(app, servers=[server.server], upload_stores=[store], timeout=scaled(30))
        )
        await wait_until(lambda: is_draining(app))
        assert not draining.done()  # the upload holds it
        writer.write(b"b" * 50)  # the rest of the body
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), scaled(10))
        assert status.startswith(b"HTTP/1.1 204")
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(10))).lower()
        assert b"upload-offset: 100\r\n" in head
        await asyncio.wait_for(draining, scaled(10))
        writer.close()
        assert store.stats().completed == 1
    await store.drain_tasks()
    store.close()


class Beating(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    """A plain heartbeat WebSocket in no group: the drain must close it too."""

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message)


async def test_drain_closes_websockets_in_no_group_with_1001(hub: BroadcastHub) -> None:
    app = tornado.web.Application([(r"/beat", Beating), (r"/ws", Socket, {"hub": hub})])
    async with AppServer(app) as server:
        beating = [await websockets.connect(server.ws_url("/beat")) for _ in range(N)]
        for ws in beating:  # open and answering
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), scaled(10)) == "hi"
        # subscriptions connections that subscribed to nothing: in no group either
        idle = [await websockets.connect(server.ws_url("/ws")) for _ in range(N)]
        for ws in idle:
            assert json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))["type"] == "welcome"
        assert connection_stats(app).websocket == 2 * N
        left = await asyncio.wait_for(
            drain(app, servers=[server.server], batch=3, spread=scaled(0.05)), scaled(20)
        )
        assert left.websocket == 0
        for ws in [*beating, *idle]:
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(10))
            assert (ws.close_code, ws.close_reason) == (CloseCode.GOING_AWAY, "going away")


async def test_an_upload_cut_by_a_drain_resumes_on_the_next_process(tmp_path: Path) -> None:
    """The drain's process stops; the next one (same storage) continues the upload."""
    tus = {"Tus-Resumable": "1.0.0"}
    store = UploadStore(tmp_path / "uploads", max_size=1 << 20)
    app = tornado.web.Application(TusUploadHandler.routes("/files", store=store))
    async with AppServer(app) as server, httpx.AsyncClient() as client:
        created = await client.post(server.url("/files/"), headers={**tus, "Upload-Length": "100"})
        path = created.headers["Location"]
        part = await client.patch(
            server.url(path),
            headers={
                **tus,
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": "0",
            },
            content=b"a" * 60,
        )
        assert part.status_code == 204
        left = await drain(app, servers=[server.server], upload_stores=[store], timeout=scaled(10))
        assert left == connection_stats(app)
    await store.drain_tasks()
    store.close()

    again = UploadStore(tmp_path / "uploads", max_size=1 << 20)
    app2 = tornado.web.Application(TusUploadHandler.routes("/files", store=again))
    async with AppServer(app2) as server, httpx.AsyncClient() as client:
        head = await client.head(server.url(path), headers=tus)
        assert head.status_code == 200 and head.headers["Upload-Offset"] == "60"
        rest = await client.patch(
            server.url(path),
            headers={
                **tus,
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": "60",
            },
            content=b"b" * 40,
        )
        assert rest.status_code == 204 and rest.headers["Upload-Offset"] == "100"
    await again.drain_tasks()
    assert again.stats().completed == 1
    again.close()
