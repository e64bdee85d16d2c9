"""A live price ticker: never wait for a slow subscriber, drop its stale prices instead.

``python backpressure_ticker.py`` serves ``ws://localhost:8888/prices``. One producer
publishes a price every 10 ms to every subscriber with ``send_nowait``; a subscriber
that cannot keep up loses its OLDEST unsent prices (it only cares about the latest),
and the drops are counted in ``/stats``.
"""

from __future__ import annotations

import asyncio
import os
import random

import tornado.web
import tornado.websocket

from tornado_longconn.backpressure import BackpressureWriter, OverflowPolicy, SendResult
from tornado_longconn.server import start_server


class Ticker:
    """The subscribers of one price feed (passed to handlers, not a module global)."""

    def __init__(self) -> None:
        self.writers: set[BackpressureWriter] = set()
        self.published = 0

    def publish(self, price: dict[str, object]) -> None:
        self.published += 1
        for writer in list(self.writers):
            if writer.send_nowait(price) is SendResult.CLOSED:
                self.writers.discard(writer)  # the subscriber is gone

    def stats(self) -> dict[str, int]:
        return {
            "subscribers": len(self.writers),
            "published": self.published,
            "dropped": sum(w.stats().dropped for w in self.writers),
        }


class PriceSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, ticker: Ticker) -> None:
        self.ticker = ticker

    def open(self) -> None:
        self.writer = BackpressureWriter.of(
            self,
            high_water=64 * 1024,  # a ticker needs little buffer: prices go stale fast
            policy=OverflowPolicy.DROP_OLDEST,
            max_queue=100,  # then the oldest unsent price is dropped
        )
        self.ticker.writers.add(self.writer)

    def on_close(self) -> None:
        self.ticker.writers.discard(self.writer)


class Stats(tornado.web.RequestHandler):
    def initialize(self, ticker: Ticker) -> None:
        self.ticker = ticker

    def get(self) -> None:
        self.write(self.ticker.stats())


def make_app(ticker: Ticker) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/prices", PriceSocket, {"ticker": ticker}), (r"/stats", Stats, {"ticker": ticker})]
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    ticker = Ticker()
    start_server(make_app(ticker), port, "127.0.0.1")
    print(f"prices on ws://localhost:{port}/prices", flush=True)
    price = 100.0
    while True:
        price = round(price + random.uniform(-0.5, 0.5), 2)
        ticker.publish({"symbol": "XYZ", "price": price})
        await asyncio.sleep(0.01)  # the feed's own rate: one price every 10 ms


if __name__ == "__main__":
    asyncio.run(main())
