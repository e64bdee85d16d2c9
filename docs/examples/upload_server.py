"""Resumable uploads over tus (HTTP) and WebSocket on one store (``python upload_server.py``).

Environment: ``PORT`` (default 8888), ``UPLOAD_DIR`` (default ``./uploads``),
``UPLOAD_MAX_SIZE`` (bytes, default 1 GiB), ``CORS_ORIGINS`` (comma-separated, or
``*``; default none). Prints one line with both URLs once it listens, then serves until
SIGTERM/SIGINT. Expired partial uploads are swept every 10 minutes.
"""

from __future__ import annotations

import asyncio
import os
import signal

import tornado.ioloop
import tornado.web

from tornado_longconn.upload import ChunkedUploadSink, UploadStore
from tornado_longconn.upload_tus import TusUploadHandler
from tornado_longconn.upload_ws import WebSocketUploadHandler


def log_complete(sink: ChunkedUploadSink) -> None:
    print(
        f"complete {sink.id} {sink.filename!r} {sink.size} bytes sha256={sink.sha256}", flush=True
    )


def make_app(store: UploadStore, cors: list[str] | str | None = None) -> tornado.web.Application:
    """Routes: tus at ``/files/`` (and ``/files/<id>``), WebSocket uploads at ``/ws-upload``."""
    return tornado.web.Application(
        [
            *TusUploadHandler.routes(
                "/files", store=store, cors_origins=cors, on_complete=log_complete
            ),
            (r"/ws-upload", WebSocketUploadHandler, {"store": store, "on_complete": log_complete}),
        ],
        websocket_max_message_size=2 << 20,
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    store = UploadStore(
        os.environ.get("UPLOAD_DIR", "uploads"),
        max_size=int(os.environ.get("UPLOAD_MAX_SIZE", str(1 << 30))),
    )
    origins = os.environ.get("CORS_ORIGINS")
    cors = None if not origins else ("*" if origins == "*" else origins.split(","))
    server = make_app(store, cors).listen(port, "127.0.0.1")
    sweeper = tornado.ioloop.PeriodicCallback(store.sweep, 600_000)
    sweeper.start()
    print(
        f"tus on http://localhost:{port}/files/ websocket on ws://localhost:{port}/ws-upload",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    sweeper.stop()
    server.stop()
    await store.drain_tasks()
    store.close()


if __name__ == "__main__":
    asyncio.run(main())
