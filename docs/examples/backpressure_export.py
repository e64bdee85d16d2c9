"""Stream a large export over a WebSocket or a long HTTP response, at the client's pace.

``python backpressure_export.py`` serves ``ws://localhost:8888/export`` (one JSON
message per row) and ``http://localhost:8888/export.ndjson`` (one JSON line per row).
Memory per connection stays under the writer's high-water mark however slow the
client reads: ``await writer.send(...)`` waits while the buffer is full.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import tornado.web
import tornado.websocket

from tornado_longconn.backpressure import BackpressureWriter
from tornado_longconn.exceptions import PeerGoneError
from tornado_longconn.server import start_server

HIGH_WATER = 256 * 1024  # bytes buffered per connection before send() waits


async def rows(count: int) -> AsyncIterator[dict[str, object]]:
    """The data to export (a database cursor in a real application)."""
    for i in range(count):
        yield {"id": i, "name": f"item {i}", "price": round(i * 0.25, 2)}
        if i % 1000 == 999:
            await asyncio.sleep(0)  # a real cursor awaits I/O between batches


class ExportSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, count: int) -> None:
        self.count = count

    async def open(self) -> None:
        writer = BackpressureWriter.of(self, high_water=HIGH_WATER)
        try:
            async for row in rows(self.count):
                await writer.send(row)  # dict -> JSON text frame; waits while the client is slow
            await writer.send({"done": True, "rows": self.count})
        except PeerGoneError:
            return  # the client went away: stop producing


class ExportHTTP(tornado.web.RequestHandler):
    def initialize(self, count: int) -> None:
        self.count = count

    async def get(self) -> None:
        self.set_header("Content-Type", "application/x-ndjson")
        writer = BackpressureWriter.of(self, high_water=HIGH_WATER)
        try:
            async for row in rows(self.count):
                await writer.send(json.dumps(row) + "\n")
        except PeerGoneError:
            return
        writer.close()  # finishes the response


def make_app(count: int = 100_000) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/export", ExportSocket, {"count": count}),
            (r"/export\.ndjson", ExportHTTP, {"count": count}),
        ]
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    start_server(make_app(), port, "127.0.0.1")
    print(f"export on ws://localhost:{port}/export and http://localhost:{port}/export.ndjson")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
