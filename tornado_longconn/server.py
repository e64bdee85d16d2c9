"""An HTTP server with production limits that survives descriptor exhaustion.

Tornado's :class:`~tornado.httpserver.HTTPServer` defaults suit a development
machine: a client may take an hour (``idle_connection_timeout`` 3600 s) to send
its request head, a body has no deadline, and a head may be 64 KiB. Each such
client holds a file descriptor; a few hundred slow or idle ones exhaust a
process at ``ulimit -n 1024``. Then ``accept()`` fails with ``EMFILE``, the
listening socket stays readable, and Tornado's accept loop logs a traceback on
every turn of the event loop (tens of megabytes in seconds) while legitimate
clients wait.

:class:`LongConnHTTPServer` is an ``HTTPServer`` with the limits of
:class:`ServerLimits` as defaults, and an accept loop that, on ``EMFILE``,
``ENFILE``, ``ENOBUFS`` or ``ENOMEM``, stops accepting for a short backoff
(doubling up to a cap while the errors go on), logs at most one line per
``log_interval`` with the count of errors it did not log, and accepts again as
soon as a retry succeeds. Meanwhile the header and idle timeouts close the
connections that hold descriptors without sending a request, which frees them.
:func:`start_server` creates one and listens::

    server = start_server(app, 8888, "127.0.0.1")            # ServerLimits() defaults
    server = start_server(app, 8888, limits=ServerLimits(body_timeout=300.0))
    ...
    server.stop(); await server.close_all_connections()

Streaming handlers that accept large bodies (the tus upload handler) raise the
body size per request with ``self.request.connection.set_max_body_size(n)``
and, for slow links, ``set_body_timeout(seconds)``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import tornado.httpserver
import tornado.ioloop

from ._tornado.server import TCPServerInternals, check_tcpserver, handle_connection
from ._tornado.server import register_listener as _register_listener
from .logfields import log_fields
from .stats import COUNTER, FLAG

__all__ = [
    "AcceptStats",
    "AcceptThrottle",
    "LongConnHTTPServer",
    "ServerLimits",
    "start_server",
]

log = logging.getLogger("tornado_longconn.server")

#: ``accept()`` errors that mean "out of descriptors or kernel memory": wait, then retry.
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# Connections accepted per readiness callback at most (Tornado's listen backlog):
# bounded, so that a flood of connections cannot starve the rest of the loop.
_ACCEPT_BATCH = 128


@dataclass(frozen=True)
class ServerLimits:
    """Resource limits of :class:`LongConnHTTPServer` (all per connection), with defaults.

    ================================ ============ ============================================
    field                            default      meaning
    ================================ ============ ============================================
    ``idle_connection_timeout``      20 s         time to send a complete request head, and
                                                  how long a keep-alive connection may wait
                                                  for its next request (Tornado: 3600 s).
                                                  Closed without an answer past it.
    ``body_timeout``                 60 s         time to send a whole request body (Tornado:
                                                  none); 400-class close past it
    ``max_header_size``              16 KiB       request line + headers (Tornado: 64 KiB);
                                                  431-class close past it
    ``max_body_size``                1 MiB        request body (Tornado: 100 MB); streaming
                                                  handlers raise it per request
    ``accept_backoff``               0.05 s       first pause of ``accept()`` after EMFILE &c.
    ``accept_backoff_max``           1 s          the pause doubles up to this while errors
                                                  go on
    ``log_interval``                 10 s         at most one log line per interval about
                                                  accept errors, with the suppressed count
    ================================ ============ ============================================

    ``None`` for a timeout means no limit (not recommended). Tornado applies the
    head timeout from the moment it starts reading a request, so a client that
    sends one header byte per second (slowloris) is closed too. WebSocket
    connections leave these limits once upgraded (use heartbeats), and a long-poll
    or SSE response is not bounded by them (the request has been read).
    """

    idle_connection_timeout: float | None = 20.0
    body_timeout: float | None = 60.0
    max_header_size: int = 16 * 1024
    max_body_size: int = 1024 * 1024
    accept_backoff: float = 0.05
    accept_backoff_max: float = 1.0
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        for name in ("idle_connection_timeout", "body_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        for name in ("max_header_size", "max_body_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.accept_backoff <= self.accept_backoff_max:
            raise ValueError("need 0 < accept_backoff <= accept_backoff_max")
        if self.log_interval < 0:
            raise ValueError(f"log_interval must be >= 0, got {self.log_interval!r}")

    def http_server_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`tornado.httpserver.HTTPServer` these limits set."""
        return {
            # Tornado uses it as the header timeout as well (HTTP1ConnectionParameters).
            "idle_connection_timeout": self.idle_connection_timeout,
            "body_timeout": self.body_timeout,
            "max_header_size": self.max_header_size,
            "max_body_size": self.max_body_size,
        }


@dataclass(frozen=True, slots=True)
class AcceptStats:
    """Counters of one server's accept loop (see :meth:`LongConnHTTPServer.stats`).

    ``accepted``: connections taken; ``errors``: ``accept()`` calls that failed
    with EMFILE, ENFILE, ENOBUFS or ENOMEM; ``pauses``: times accepting stopped
    for a backoff; ``suppressed``: errors not logged because of the log rate
    limit (all counters); ``paused``: whether accepting is stopped right now (a flag).
    """

    accepted: int = field(default=0, metadata=COUNTER)
    errors: int = field(default=0, metadata=COUNTER)
    pauses: int = field(default=0, metadata=COUNTER)
    suppressed: int = field(default=0, metadata=COUNTER)
    paused: bool = field(default=False, metadata=FLAG)


class AcceptThrottle:
    """When to retry ``accept()`` after descriptor exhaustion, and what to log (no I/O).

    :meth:`failed` is called with the time and the error of a failed
    ``accept()``; it returns the pause (seconds) before accepting again and the
    log line to write, or ``None`` when a line was written less than
    ``log_interval`` ago (the error is then counted as suppressed and reported in
    the next line). :meth:`accepted` resets the backoff after a success, and
    returns a closing line for errors still unreported once ``log_interval`` has
    passed::

        >>> t = AcceptThrottle(backoff=0.05, backoff_max=0.2, log_interval=10.0)
        >>> t.failed(100.0, 24)[0], t.failed(100.1, 24)[0], t.failed(100.3, 24)[0]
        (0.05, 0.1, 0.2)
        >>> t.failed(100.6, 24)
        (0.2, None)
        >>> t.failed(111.0, 24)[1]
        'accept() failed: EMFILE (Too many open files); not accepting for 0.2 s; 3 similar errors in the last 11 s not logged'
        >>> t.accepted(111.5), t.failed(112.0, 24)[0]
        (None, 0.05)
    """

    __slots__ = (
        "_delay",
        "_last_log",
        "_unreported",
        "backoff",
        "backoff_max",
        "errors",
        "log_interval",
        "pauses",
        "suppressed",
    )

    def __init__(
        self, *, backoff: float = 0.05, backoff_max: float = 1.0, log_interval: float = 10.0
    ) -> None:
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.log_interval = log_interval
        self._delay = backoff
        self._last_log: float | None = None
        self._unreported = 0
        self.errors = 0
        self.pauses = 0
        self.suppressed = 0

    def failed(self, now: float, error_number: int) -> tuple[float, str | None]:
        """An ``accept()`` failed with ``error_number`` at ``now``: (pause, log line or None)."""
        self.errors += 1
        self.pauses += 1
        delay = self._delay
        self._delay = min(self._delay * 2, self.backoff_max)
        line: str | None = None
        if self._last_log is None or now - self._last_log >= self.log_interval:
            name = errno.errorcode.get(error_number, str(error_number))
            line = (
                f"accept() failed: {name} ({os.strerror(error_number)}); "
                f"not accepting for {delay:g} s"
            )
            if self._unreported:
                line += self._since(now)
            self._last_log = now
            self._unreported = 0
        else:
            self._unreported += 1
            self.suppressed += 1
        return delay, line

    def accepted(self, now: float) -> str | None:
        """A connection was accepted: reset the backoff; maybe a line about unlogged errors."""
        self._delay = self.backoff
        if not self._unreported or self._last_log is None:
            return None
        if now - self._last_log < self.log_interval:
            return None
        line = "accepting again" + self._since(now)
        self._last_log = now
        self._unreported = 0
        return line

    def _since(self, now: float) -> str:
        assert self._last_log is not None
        return (
            f"; {self._unreported} similar errors in the last "
            f"{now - self._last_log:.0f} s not logged"
        )


class _Listener:
    """The accept handler of one listening socket: pauses on exhaustion, resumes on a timer."""

    __slots__ = ("io_loop", "removed", "server", "sock", "timer")

    def __init__(self, server: LongConnHTTPServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.io_loop = tornado.ioloop.IOLoop.current()
        self.removed = False
        self.timer: object | None = None
        self.io_loop.add_handler(sock, self.on_readable, tornado.ioloop.IOLoop.READ)

    def on_readable(self, fd: Any, events: int) -> None:
        server = self.server
        for _ in range(_ACCEPT_BATCH):
            if self.removed or self.timer is not None:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return  # every waiting connection was taken
            except ConnectionAbortedError:
                continue  # closed by the peer while in the accept queue
            except OSError as exc:
                if exc.errno not in EXHAUSTION_ERRNOS:
                    raise
                self.pause(exc.errno)
                return
            server._accepted += 1
            line = server._throttle.accepted(self.io_loop.time())
            if line:
                log.warning("%s", line, extra=log_fields())
            handle_connection(server._internals, connection, address)

    def pause(self, error_number: int) -> None:
        delay, line = self.server._throttle.failed(self.io_loop.time(), error_number)
        if line:
            log.warning("%s", line, extra=log_fields())
        self.io_loop.remove_handler(self.sock)
        self.timer = self.io_loop.call_later(delay, self.resume)

    def resume(self) -> None:
        self.timer = None
        if not self.removed:
            self.io_loop.add_handler(self.sock, self.on_readable, tornado.ioloop.IOLoop.READ)
            # Connections may be waiting already: the socket is readable, the loop calls back.

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        if self.timer is not None:
            self.io_loop.remove_timeout(self.timer)
            self.timer = None
        else:
            self.io_loop.remove_handler(self.sock)


class LongConnHTTPServer(tornado.httpserver.HTTPServer):
    """:class:`tornado.httpserver.HTTPServer` with production limits and an EMFILE-proof accept loop.

    Takes the arguments of ``HTTPServer`` plus ``limits`` (a
    :class:`ServerLimits`, default ``ServerLimits()``) whose values are the
    defaults of ``idle_connection_timeout``, ``body_timeout``,
    ``max_header_size`` and ``max_body_size``; an explicit keyword argument wins.
    Use it like ``HTTPServer`` (``listen``, ``add_sockets``, ``bind``/``start``,
    ``stop``, ``close_all_connections``), or through :func:`start_server`.

    When ``accept()`` fails for lack of descriptors or kernel memory, the socket
    is left alone for ``limits.accept_backoff`` seconds (doubling up to
    ``accept_backoff_max``), then accepted again; see :class:`AcceptThrottle` for
    the log lines. Raises :class:`~tornado_longconn.exceptions.LongConnError` when
    created on a Tornado whose accept internals are not the ones checked.
    """

    def initialize(
        self, request_callback: Any, *args: Any, limits: ServerLimits | None = None, **kwargs: Any
    ) -> None:
        """Keep ``limits`` and configure ``HTTPServer`` (see the class docstring)."""
        self.limits = limits if limits is not None else ServerLimits()
        options = self.limits.http_server_options()
        options.update(kwargs)
        super().initialize(request_callback, *args, **options)
        self._internals: TCPServerInternals = check_tcpserver(self)
        self._throttle = AcceptThrottle(
            backoff=self.limits.accept_backoff,
            backoff_max=self.limits.accept_backoff_max,
            log_interval=self.limits.log_interval,
        )
        self._listeners: list[_Listener] = []
        self._accepted = 0

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Accept connections on ``sockets`` (as ``TCPServer.add_sockets``, with our accept loop)."""
        for sock in sockets:
            listener = _Listener(self, sock)
            self._listeners.append(listener)
            _register_listener(self._internals, sock, listener.remove)

    def stats(self) -> AcceptStats:
        """A snapshot of the accept loop's counters (see :class:`AcceptStats`)."""
        t = self._throttle
        return AcceptStats(
            accepted=self._accepted,
            errors=t.errors,
            pauses=t.pauses,
            suppressed=t.suppressed,
            paused=any(x.timer is not None and not x.removed for x in self._listeners),
        )


def start_server(
    request_callback: Any,
    port: int,
    address: str | None = None,
    *,
    limits: ServerLimits | None = None,
    reuse_port: bool = False,
    **kwargs: Any,
) -> LongConnHTTPServer:
    """Create a :class:`LongConnHTTPServer` for ``request_callback`` and listen on ``port``.

    ``request_callback`` is usually a :class:`tornado.web.Application`;
    ``address`` None listens on every interface (give ``"127.0.0.1"`` behind a
    local proxy). ``kwargs`` go to ``HTTPServer`` (``xheaders``, ``ssl_options``,
    or any limit to override). Must run on the event loop that serves it. Raises
    ``OSError`` when the port cannot be bound.
    """
    server = LongConnHTTPServer(request_callback, limits=limits, **kwargs)
    server.listen(port, address, reuse_port=reuse_port)
    return server
