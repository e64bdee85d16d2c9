"""Helpers for testing long-connection code (public: for this project and its users).

* :func:`scaled` / :data:`MS` -- one timing factor for all timing-dependent tests,
  from the environment variable ``LONGCONN_TEST_TIMEOUT_FACTOR`` (default 1).
* :class:`AppServer` -- run a Tornado ``Application`` on a free 127.0.0.1 port
  inside the current event loop, and tear it down.
"""

from __future__ import annotations

import os
import socket
from types import TracebackType
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

__all__ = ["MS", "TIMEOUT_FACTOR", "AppServer", "scaled"]

#: Multiplier for every interval and deadline in timing-dependent tests.
TIMEOUT_FACTOR: float = float(os.environ.get("LONGCONN_TEST_TIMEOUT_FACTOR", "1") or 1)

#: One millisecond, scaled by :data:`TIMEOUT_FACTOR`.
MS: float = 0.001 * TIMEOUT_FACTOR


def scaled(seconds: float) -> float:
    """``seconds`` multiplied by :data:`TIMEOUT_FACTOR`."""
    return seconds * TIMEOUT_FACTOR


class AppServer:
    """A Tornado application listening on a free port of 127.0.0.1.

    Use as an async context manager inside a running event loop::

        async with AppServer(app) as server:
            url = server.ws_url("/chat")     # "ws://127.0.0.1:PORT/chat"

    ``ssl_options`` serves TLS (then use ``https``/``wss`` URLs); extra keyword
    arguments go to :class:`tornado.httpserver.HTTPServer`. On exit the server
    stops listening and every open connection is closed.
    """

    def __init__(
        self,
        app: tornado.web.Application,
        *,
        ssl_options: Any = None,
        host: str = "127.0.0.1",
        **server_kwargs: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.ssl = ssl_options is not None
        self._server_kwargs = dict(server_kwargs, ssl_options=ssl_options)
        self.server: tornado.httpserver.HTTPServer | None = None
        self.port = 0

    def start(self) -> AppServer:
        """Bind a free port and start serving (call from within a running loop)."""
        sockets = tornado.netutil.bind_sockets(0, self.host, family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(self.app, **self._server_kwargs)
        self.server.add_sockets(sockets)
        return self

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self.server is not None:
            self.server.stop()
            await self.server.close_all_connections()
            self.server = None

    async def __aenter__(self) -> AppServer:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def url(self, path: str = "/") -> str:
        """``http(s)://127.0.0.1:PORT`` + ``path``."""
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}{path}"

    def ws_url(self, path: str = "/") -> str:
        """``ws(s)://127.0.0.1:PORT`` + ``path``."""
        return f"{'wss' if self.ssl else 'ws'}://{self.host}:{self.port}{path}"
