"""The server side: how a server variant starts, stops and reports to its benchmark.

A server variant is a module under ``benchmarks/servers/`` run as ``python -m
benchmarks.servers.<name> ARGS...`` from the repository root. It binds a free port on
127.0.0.1, serves until SIGTERM, and tells the benchmark everything through **report
lines** on its stdout -- the one way a server reports:

    KIND <json>

``KIND`` is an upper-case word, the rest one JSON value. :func:`emit` writes one (and
flushes); nothing else may be written to stdout. The first report is always ``PORT
<n>`` (:func:`announce`, done by :func:`serve_tornado` / :func:`serve_until_sigterm`).
The benchmark reads them with ``ServerProcess.reports(kind)`` /
``ServerProcess.wait_report(kind)`` while the server runs.

A server emits a report on its own when it knows the moment (e.g. ``STATS`` at the end
of a measured window, or from ``on_stop`` at SIGTERM). When the benchmark picks the
moment, the server mounts :func:`report_route`: a ``POST /report?kind=KIND`` makes it
emit ``KIND`` from the callable registered for that kind, and the benchmark calls
:func:`benchmarks.harness.request_report`. The HTTP answer carries nothing: the data
travels as a report line like every other. Example::

    from benchmarks.harness import PayloadMaker, query_int, report_route, serve_tornado

    class Stream(tornado.websocket.WebSocketHandler):
        async def open(self) -> None:
            make = PayloadMaker(query_int(self, "size"))
            for seq in range(query_int(self, "count")):
                await self.write_message(make(seq), binary=True)

    app = tornado.web.Application([("/stream", Stream), report_route(STATS=lambda: {...})])
    serve_tornado(app, on_stop=lambda: emit("STATS", {...}))

Set ``BENCH_LOOP=uvloop`` to run the servers on uvloop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import tornado.web

__all__ = [
    "ReportHandler",
    "announce",
    "emit",
    "parse_report",
    "query_int",
    "report_route",
    "serve_tornado",
    "serve_until_sigterm",
]

_KIND = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def emit(kind: str, value: Any) -> None:
    """Report ``value`` (JSON-serialisable) to the benchmark: one ``KIND <json>`` line.

    Raises ``ValueError`` if ``kind`` is not an upper-case word.
    """
    if not _KIND.match(kind):
        raise ValueError(f"report kind must be an upper-case word, not {kind!r}")
    print(f"{kind} {json.dumps(value)}", flush=True)


def parse_report(line: str) -> tuple[str, Any] | None:
    """``(kind, value)`` of a report line, or ``None`` if the line is not one."""
    kind, sep, rest = line.strip().partition(" ")
    if not sep or not _KIND.match(kind):
        return None
    try:
        return kind, json.loads(rest)
    except ValueError:
        return None


def announce(port: int) -> None:
    """Tell the runner the server is ready: the ``PORT <n>`` report."""
    emit("PORT", port)


def query_int(handler: Any, name: str, default: int | None = None) -> int:
    """Integer query argument ``name`` of a Tornado handler's request.

    Raises ``ValueError`` when it is missing and there is no ``default``.
    """
    value = handler.get_query_argument(name, None)
    if value is None:
        if default is None:
            raise ValueError(f"missing query argument {name!r}")
        return default
    return int(value)


class ReportHandler(tornado.web.RequestHandler):
    """``POST /report?kind=KIND``: emit ``KIND`` from its source; answer 204 (404 if unknown)."""

    def initialize(self, sources: dict[str, Callable[[], Any]]) -> None:
        self.sources = sources

    def post(self) -> None:
        source = self.sources.get(self.get_query_argument("kind", ""))
        if source is None:
            raise tornado.web.HTTPError(404)
        emit(self.get_query_argument("kind"), source())
        self.set_status(204)


def report_route(**sources: Callable[[], Any]) -> tuple[str, type[ReportHandler], dict[str, Any]]:
    """The Tornado rule ``/report`` for :class:`ReportHandler`: ``report_route(STATS=fn)``."""
    return (r"/report", ReportHandler, {"sources": sources})


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if os.environ.get("BENCH_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def serve_until_sigterm(
    start: Callable[[], Awaitable[int]], *, on_stop: Callable[[], object] | None = None
) -> None:
    """Run ``await start()`` (returns the bound port), announce it, serve until SIGTERM.

    ``on_stop`` runs on the loop after SIGTERM, before the process exits (e.g. to emit
    a final report); if it returns an awaitable, that is awaited.
    """

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        port = await start()
        announce(port)
        await stop.wait()
        if on_stop is not None:
            result = on_stop()
            if isinstance(result, Awaitable):
                await result

    _run(main)


def serve_tornado(
    app: tornado.web.Application,
    *,
    on_stop: Callable[[], object] | None = None,
    **server_kwargs: Any,
) -> None:
    """Serve a Tornado ``Application`` on a free 127.0.0.1 port until SIGTERM.

    ``server_kwargs`` go to ``HTTPServer``; ``on_stop`` as in :func:`serve_until_sigterm`.
    """
    import tornado.httpserver
    import tornado.netutil

    async def start() -> int:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", socket.AF_INET, backlog=4096)
        server = tornado.httpserver.HTTPServer(app, **server_kwargs)
        server.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    serve_until_sigterm(start, on_stop=on_stop)
