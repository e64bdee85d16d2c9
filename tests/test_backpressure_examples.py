"""The backpressure examples in docs/examples/ work as the how-to says."""

from __future__ import annotations

import asyncio
import json

import httpx
import websockets

from tests.helpers import load_example as load
from tornado_longconn.backpressure import SendResult
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled


async def test_export_over_websocket() -> None:
    export = load("backpressure_export")
    async with (
        AppServer(export.make_app(count=5000)) as server,
        websockets.connect(server.ws_url("/export"), max_size=None) as ws,
    ):
        rows = [json.loads(await asyncio.wait_for(ws.recv(), scaled(10))) for _ in range(5001)]
    assert rows[-1] == {"done": True, "rows": 5000}
    assert [r["id"] for r in rows[:-1]] == list(range(5000))


async def test_export_over_http() -> None:
    export = load("backpressure_export")
    async with (
        AppServer(export.make_app(count=5000)) as server,
        httpx.AsyncClient(timeout=scaled(10)) as http,
    ):
        response = await http.get(server.url("/export.ndjson"))
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = response.text.splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(5000))


async def test_ticker_drops_oldest_for_a_slow_subscriber() -> None:
    example = load("backpressure_ticker")
    ticker = example.Ticker()
    async with AppServer(example.make_app(ticker)) as server:
        # Tornado runs open() before the client can read the handshake answer.
        slow = await WebSocketTestClient.connect(server.ws_url("/prices"), rcvbuf=4096)
        (slow_writer,) = ticker.writers
        fast = await WebSocketTestClient.connect(server.ws_url("/prices"))
        try:
            slow.stop_reading()
            assert len(ticker.writers) == 2
            price = {"symbol": "XYZ", "price": 0, "pad": "x" * 500}
            sent = 0
            # Publish until the slow subscriber's buffer is over its high-water mark.
            while slow_writer.send_nowait(dict(price, price=-1)) is SendResult.WRITTEN:
                pass
            for i in range(300):
                ticker.publish(dict(price, price=i))
                sent += 1
                if i % 20 == 0:
                    await asyncio.sleep(0)  # let the fast subscriber read
            stats = ticker.stats()
            assert stats["subscribers"] == 2
            assert stats["dropped"] == slow_writer.stats().dropped > 0
            got = [json.loads(m)["price"] for m in await fast.recv_many(sent, scaled(10))]
            assert got == list(range(300))
            # The slow subscriber gets what it had, then only the newest 100 prices.
            slow.resume_reading()
            await asyncio.wait_for(slow_writer.drained(), scaled(10))
            slow_prices = []
            while slow.pending_messages or not slow_prices or slow_prices[-1] != 299:
                slow_prices.append(json.loads(await slow.recv(scaled(10)))["price"])
            tail = [p for p in slow_prices if p != -1]
            assert tail[-100:] == list(range(200, 300))
            async with httpx.AsyncClient(timeout=scaled(10)) as http:
                body = (await http.get(server.url("/stats"))).json()
            assert body["published"] == 300
        finally:
            fast.vanish()
            slow.vanish()
