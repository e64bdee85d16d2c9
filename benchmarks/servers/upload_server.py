"""Upload server variants for ``bench_upload.py``, each with a 10 ms loop-lag ticker.

Usage: ``python -m benchmarks.servers.upload_server VARIANT ROOT``. Every variant
mounts ``POST /report?kind=LAG``: it reports ``LAG {"n", "p50", "p99", "max"}``, the
ticker's lateness in ms since the previous LAG report (the first one starts the
ticker), and resets the samples.

Variants:

* ``ours``: ``TusUploadHandler`` at ``/files/`` and ``WebSocketUploadHandler`` at
  ``/ws`` (and with ``read_ahead=True`` at ``/ws-ra``) on one ``UploadStore(ROOT)``
  (executor writes, sha256, fsync + rename); ``/null/`` and ``/ws-null`` take the same
  requests and messages and throw the bytes away (the transport's ceiling);
* ``shared``: ``TusUploadHandler`` at ``/files/`` on an ``UploadStore(ROOT)`` whose
  upload state is shared through Redis (``python -m benchmarks.servers.upload_server
  shared ROOT REDIS_URL PREFIX``): N such processes serve one upload directory. It also
  reports ``RT``: the commands its ``RedisUploadState`` sent so far (round trips);
* ``tutorial``: the tutorial's WebSocket upload: ``self.file.write(chunk)`` inside
  ``on_message`` on the event loop, no checksum, no fsync; it speaks the same
  start/ack/complete messages so the same client drives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import deque
from typing import Any

import tornado.web
import tornado.websocket

from benchmarks.harness import report_route, serve_tornado
from tornado_longconn.upload import UploadStore
from tornado_longconn.upload_tus import TusUploadHandler
from tornado_longconn.upload_ws import WebSocketUploadHandler

__all__ = ["VARIANTS", "main"]

VARIANTS = ("ours", "shared", "tutorial")
TICK = 0.010


class LagTicker:
    """Lateness (ms) of a ``sleep(10 ms)`` loop on the server's event loop."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=200_000)
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(TICK)
            self.samples.append((loop.time() - start - TICK) * 1000.0)

    def report(self) -> dict[str, float]:
        """Percentiles since the last report (starting the ticker on the first call)."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())
        data = sorted(self.samples)
        self.samples.clear()
        if not data:
            return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}

        def pct(p: float) -> float:
            return data[min(len(data) - 1, int(p * len(data)))]

        return {"n": len(data), "p50": pct(0.50), "p99": pct(0.99), "max": data[-1]}


class TutorialUpload(tornado.websocket.WebSocketHandler):
    """The tutorial: blocking writes on the loop."""

    def initialize(self, root: str) -> None:
        self.root = root
        self.file: Any = None
        self.size = 0
        self.received = 0

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            msg = json.loads(message)
            self.size, self.received = int(msg["size"]), 0
            self.file = open(os.path.join(self.root, "tutorial.bin"), "wb")  # noqa: SIM115
            self.write_message(
                {
                    "type": "ready",
                    "id": "tutorial",
                    "offset": 0,
                    "size": self.size,
                    "window": 8,
                    "chunk_size": 1 << 20,
                }
            )
            return
        self.file.write(message[8:])
        self.received += len(message) - 8
        self.write_message({"type": "ack", "offset": self.received})
        if self.received == self.size:
            self.file.close()
            self.write_message({"type": "complete", "id": "tutorial", "size": self.size})

    def get_compression_options(self) -> None:
        return None


class NullWebSocket(tornado.websocket.WebSocketHandler):
    """Transport ceiling: the same protocol, chunks acknowledged and thrown away."""

    size = 0
    received = 0

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.size, self.received = int(json.loads(message)["size"]), 0
            self.write_message(
                {
                    "type": "ready",
                    "id": "null",
                    "offset": 0,
                    "size": self.size,
                    "window": 8,
                    "chunk_size": 1 << 20,
                }
            )
            return
        self.received += len(message) - 8
        self.write_message({"type": "ack", "offset": self.received})
        if self.received == self.size:
            self.write_message({"type": "complete", "id": "null", "size": self.size})

    def get_compression_options(self) -> None:
        return None


@tornado.web.stream_request_body
class NullTus(tornado.web.RequestHandler):
    """Transport ceiling: creation answers 201, a PATCH body is read and thrown away."""

    received = 0

    def prepare(self) -> None:
        self.request.connection.set_max_body_size(1 << 40)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self.received += len(chunk)

    def post(self) -> None:
        self.set_header("Location", f"http://{self.request.host}/null/null")
        self.set_status(201)

    def patch(self, _id: str = "") -> None:
        self.set_header("Upload-Offset", str(self.received))
        self.set_status(204)


def main() -> None:
    variant, root = sys.argv[1], sys.argv[2]
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {VARIANTS}")
    ticker = LagTicker()
    rules: list[Any] = [report_route(LAG=ticker.report)]
    if variant == "ours":
        store = UploadStore(root, max_size=4 << 30, chunk_size=1 << 20, max_in_flight=4)
        rules += TusUploadHandler.routes("/files", store=store)
        rules.append((r"/ws", WebSocketUploadHandler, {"store": store, "window": 8}))
        rules.append(
            (r"/ws-ra", WebSocketUploadHandler, {"store": store, "window": 8, "read_ahead": True})
        )
        rules += [(r"/ws-null", NullWebSocket), (r"/null/?", NullTus), (r"/null/(.*)", NullTus)]
    elif variant == "shared":
        from tornado_longconn.upload_state import RedisUploadState

        state = RedisUploadState(sys.argv[3], prefix=sys.argv[4])
        store = UploadStore(
            root, max_size=4 << 30, chunk_size=1 << 20, max_in_flight=4, shared=state
        )
        rules = [report_route(LAG=ticker.report, RT=lambda: state.round_trips)]
        rules += TusUploadHandler.routes("/files", store=store)
    else:
        rules.append((r"/ws", TutorialUpload, {"root": root}))
    app = tornado.web.Application(rules, websocket_max_message_size=2 << 20)
    # chunk_size: data_received gets up to 1 MiB at a time (Tornado's default is 64 KiB).
    serve_tornado(app, chunk_size=1 << 20)


if __name__ == "__main__":
    main()
