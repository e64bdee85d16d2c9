"""Resumable uploads over tus (HTTP) and WebSocket on one store (``python upload_server.py``).

Environment: ``PORT`` (default 8888), ``UPLOAD_DIR`` (default ``./uploads``),
``UPLOAD_MAX_SIZE`` (bytes, default 1 GiB), ``CORS_ORIGINS`` (comma-separated, or
``*``; default none), ``UPLOAD_BASE_URL`` (the public URL of ``/files``, used for
``Location``; default: relative ``Location``), ``TRUST_FORWARDED`` (``1`` behind a
proxy that sets ``X-Forwarded-Proto``/``-Host`` or ``Forwarded``; default ``0``),
``UPLOAD_MAX_OPEN_FILES`` (partial files held open at once; default a quarter of the
soft ``RLIMIT_NOFILE``), ``EARLY_ANSWER_MAX_BYTES`` / ``EARLY_ANSWER_TIMEOUT``
(body drained after an early answer such as 423; default 8 MiB / 5 s). Prints one
line with both URLs once it listens, then serves until SIGTERM/SIGINT. Expired
partial uploads are swept every 10 minutes.
"""

from __future__ import annotations

import asyncio
import os
import signal

import tornado.ioloop
import tornado.web

from tornado_longconn.server import start_server
from tornado_longconn.streaming import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, EarlyAnswer
from tornado_longconn.upload import ChunkedUploadSink, UploadStore
from tornado_longconn.upload_tus import TusUploadHandler
from tornado_longconn.upload_ws import WebSocketUploadHandler


def log_complete(sink: ChunkedUploadSink) -> None:
    print(
        f"complete {sink.id} {sink.filename!r} {sink.size} bytes sha256={sink.sha256}", flush=True
    )


def make_app(
    store: UploadStore,
    cors: list[str] | str | None = None,
    *,
    base_url: str | None = None,
    trust_forwarded: bool = False,
    early_answer: EarlyAnswer | None = None,
) -> tornado.web.Application:
    """Routes: tus at ``/files/`` (and ``/files/<id>``), WebSocket uploads at ``/ws-upload``."""
    return tornado.web.Application(
        [
            *TusUploadHandler.routes(
                "/files",
                store=store,
                cors_origins=cors,
                on_complete=log_complete,
                base_url=base_url,
                trust_forwarded=trust_forwarded,
                early_answer=early_answer,
            ),
            (r"/ws-upload", WebSocketUploadHandler, {"store": store, "on_complete": log_complete}),
        ],
        websocket_max_message_size=2 << 20,
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    max_open_files = os.environ.get("UPLOAD_MAX_OPEN_FILES")
    store = UploadStore(
        os.environ.get("UPLOAD_DIR", "uploads"),
        max_size=int(os.environ.get("UPLOAD_MAX_SIZE", str(1 << 30))),
        max_open_files=int(max_open_files) if max_open_files else None,
    )
    origins = os.environ.get("CORS_ORIGINS")
    cors = None if not origins else ("*" if origins == "*" else origins.split(","))
    early_answer = EarlyAnswer(
        max_bytes=int(os.environ.get("EARLY_ANSWER_MAX_BYTES", str(DEFAULT_MAX_BYTES))),
        timeout=float(os.environ.get("EARLY_ANSWER_TIMEOUT", str(DEFAULT_TIMEOUT))),
    )
    app = make_app(
        store,
        cors,
        base_url=os.environ.get("UPLOAD_BASE_URL") or None,
        trust_forwarded=os.environ.get("TRUST_FORWARDED", "0") == "1",
        early_answer=early_answer,
    )
    server = start_server(app, port, "127.0.0.1")
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
