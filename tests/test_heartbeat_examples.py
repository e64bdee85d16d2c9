"""The heartbeat examples in docs/examples/ work as the how-to says."""

from __future__ import annotations

import asyncio
import json

import httpx
import websockets

from tests.helpers import load_example as load
from tornado_longconn.heartbeat import heartbeat_stats
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled


async def test_chat_measures_latency_and_serves_metrics() -> None:
    example = load("heartbeat_chat")
    app = example.make_app(heartbeat_interval=scaled(0.05), heartbeat_timeout=scaled(1))
    async with AppServer(app) as server, websockets.connect(server.ws_url("/chat")) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), scaled(5))) == {"hello": "connected"}
        # websockets answers pings while it reads; chat until the server saw two answers.
        for _ in range(10_000):
            if heartbeat_stats(app).count >= 2:
                break
            await ws.send("tick")
            reply = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
            assert reply["echo"] == "tick"
        assert heartbeat_stats(app).count >= 2
        await ws.send("tock")
        reply = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
        assert isinstance(reply["latency_ms"], float)
        async with httpx.AsyncClient(timeout=scaled(5)) as http:
            metrics = (await http.get(server.url("/metrics"))).json()
        assert metrics["connections"] == 1 and metrics["count"] >= 2
        assert metrics["p50"] is not None


async def test_browser_example_answers_text_pings() -> None:
    example = load("heartbeat_browser")
    app = example.make_app(heartbeat_interval=scaled(0.05), heartbeat_timeout=scaled(1))
    async with AppServer(app) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/live"))
        async with client:
            client.auto_pong = False  # like page JavaScript: no access to ping frames
            for _ in range(3):
                assert await client.recv(scaled(5)) == '{"type":"ping"}'
                await client.send('{ "type": "pong" }')  # another JSON spelling
            await client.send("hi")
            while (message := await client.recv(scaled(5))) == '{"type":"ping"}':
                await client.send('{"type":"pong"}')
            assert json.loads(message) == {"got": "hi"}
            stats = heartbeat_stats(app)
            assert stats.count >= 3 and stats.timeouts == 0
