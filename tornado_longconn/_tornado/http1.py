"""HTTP/1 connections: delivering an answer sent while the request body still arrives (internal).

When a handler answers before it read the whole request body (a tus PATCH refused
with 409/413/415/423/460 from ``prepare()`` or mid-body), Tornado's
:class:`~tornado.http1connection.HTTP1Connection` writes the response without
``Connection: close`` (it decides to close only in ``finish()``, after the headers
went out) and then closes the socket at once, with body bytes unread: the kernel
answers those with a TCP reset, and a client still sending its body never reads the
status. :func:`linger_after_answer` changes that for ONE connection:

1. before the headers are written it sets ``_disconnect_on_finish``, so Tornado
   itself writes ``Connection: close``;
2. when the response is finished it does not close: it waits until the response
   left the write buffer, shuts the socket's write side (the client reads the
   status and an end of stream, as with nginx's and Apache's *lingering close*) and
   lets Tornado's own body reader go on reading and discarding the body (Tornado
   stops handing body bytes to the handler once the response is finished);
3. it closes the connection once ``max_bytes`` more body bytes were read, or
   ``timeout`` seconds after the answer, or when the client closes first. A
   connection whose body was not consumed is never kept alive.

Private names used (each checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``HTTP1Connection._read_finished`` -- ``bool``: the request body was read to its end.
* ``HTTP1Connection._disconnect_on_finish`` -- ``bool``: close after this response;
  read by ``write_headers`` to add ``Connection: close``.
* ``HTTP1Connection._finish_request(future)`` -- called by ``finish()`` once the
  response is written; closes at once when ``_disconnect_on_finish`` is set. The
  door shadows it on the connection instance (never on the class).
* ``HTTP1Connection._clear_callbacks()`` -- drops the connection's callbacks (what
  ``_finish_request`` does first).

Public names used besides: ``HTTP1Connection.is_client``, ``.stream``,
``.set_max_body_size``; ``IOStream.read_bytes`` (shadowed on the instance while the
body is discarded, to count the bytes read), ``.write``, ``.socket``, ``.closed``,
``.close``. A Tornado release without one of the private names raises
:class:`~tornado_longconn.exceptions.LongConnError` naming it and
``tornado.version`` at import (never a silent fallback to the immediate close).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import tornado
import tornado.http1connection
import tornado.ioloop
import tornado.iostream
from tornado.concurrent import Future

from ..exceptions import LongConnError

__all__ = ["CHECKED_VERSIONS", "check_http1", "linger_after_answer"]

#: Checked against these Tornado versions.
CHECKED_VERSIONS = ("6.4.2", "6.5.2", "6.6.1")

#: Why a lingering connection was closed (the argument of ``on_end``).
END_BYTES = "bytes"
END_DEADLINE = "deadline"

_METHODS = ("_finish_request", "_clear_callbacks")
_INIT_ATTRS = ("_read_finished", "_disconnect_on_finish")
_ARMED = "_longconn_linger"


class _Stream(Protocol):
    socket: socket.socket | None

    def read_bytes(self, num_bytes: int, partial: bool = False) -> Awaitable[bytes]: ...
    def write(self, data: bytes | memoryview) -> Future[None]: ...
    def closed(self) -> bool: ...
    def close(self, exc_info: bool = False) -> None: ...


class HTTP1Internals(Protocol):
    """The part of :class:`tornado.http1connection.HTTP1Connection` the door uses."""

    is_client: bool
    stream: _Stream | None
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _read_finished: bool
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _disconnect_on_finish: bool

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _finish_request(self, future: Future[None] | None) -> None: ...
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _clear_callbacks(self) -> None: ...
    def set_max_body_size(self, max_body_size: int) -> None: ...


def _missing(name: str, why: str = "") -> LongConnError:
    return LongConnError(
        f"tornado.http1connection.HTTP1Connection.{name} is missing in Tornado "
        f"{tornado.version} (checked against {', '.join(CHECKED_VERSIONS)}){why}: "
        "early answers to streamed request bodies cannot be delivered"
    )


def check_http1() -> None:
    """Raise ``LongConnError`` unless ``HTTP1Connection`` has every private name used.

    Methods are looked up on the class; instance attributes in the names its
    ``__init__`` assigns. Called at import.
    """
    cls = tornado.http1connection.HTTP1Connection
    for name in _METHODS:
        if not callable(getattr(cls, name, None)):
            raise _missing(name)
    assigned = set(cls.__init__.__code__.co_names)
    for name in _INIT_ATTRS:
        if name not in assigned:
            raise _missing(name, " (no longer set by __init__)")


check_http1()


def linger_after_answer(
    connection: object,
    *,
    max_bytes: int,
    timeout: float,
    on_end: Callable[[str, int], None] | None = None,
) -> bool:
    """Arrange for an answer sent before the request body was read to reach the client.

    Call it BEFORE the response headers are written (before ``finish()`` or the first
    ``flush()``). ``connection`` is ``request.connection``. Returns False, doing
    nothing, if it is not a server-side HTTP/1 connection, if the body was already
    read to its end, or if the stream is gone; True once armed (calling again is a
    no-op that returns True).

    Once the response is finished, the connection reads and discards up to
    ``max_bytes`` more body bytes (plus the one read already under way, at most
    Tornado's ``chunk_size``), for at most ``timeout`` seconds, then closes.
    ``on_end(reason, discarded)`` is called when the door closes it: ``reason`` is
    ``"bytes"`` or ``"deadline"``; it is not called when the client closed first.
    """
    if not isinstance(connection, tornado.http1connection.HTTP1Connection):
        return False
    conn = cast(HTTP1Internals, connection)
    stream = conn.stream
    if conn.is_client or stream is None or stream.closed():
        return False
    if getattr(conn, _ARMED, False):
        return True
    if conn._read_finished:
        return False
    setattr(conn, _ARMED, True)
    conn._disconnect_on_finish = True  # write_headers adds "Connection: close"
    # The body is discarded under our own bound; Tornado's limit would answer a
    # second time (a raw 400) over a long body.
    conn.set_max_body_size(sys.maxsize)
    original = tornado.http1connection.HTTP1Connection._finish_request

    def finish_request(future: Future[None] | None) -> None:
        if conn._read_finished or stream.closed():
            original(cast(tornado.http1connection.HTTP1Connection, conn), future)
            return
        conn._clear_callbacks()
        _Linger(stream, max_bytes, timeout, on_end).start()

    # Shadowed on this connection only; finish() calls self._finish_request.
    conn._finish_request = finish_request  # type: ignore[method-assign]
    return True


class _Linger:
    """Reads and discards the rest of a body after an early answer, then closes."""

    __slots__ = ("_deadline", "_max_bytes", "_on_end", "_read", "_stream", "discarded")

    def __init__(
        self,
        stream: _Stream,
        max_bytes: int,
        timeout: float,
        on_end: Callable[[str, int], None] | None,
    ) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._on_end = on_end
        self._read = stream.read_bytes
        self.discarded = 0
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(timeout, self._end, END_DEADLINE)

    def start(self) -> None:
        stream = self._stream
        if stream.closed():
            self._deadline.cancel()
            return
        # Count what Tornado's body reader reads from now on (instance shadow).
        stream.read_bytes = self._read_bytes  # type: ignore[method-assign]
        if self._max_bytes <= 0:
            self._end(END_BYTES)
            return
        # Once the answer left the write buffer, end our side: the client reads the
        # status and an end of stream even while it still sends.
        flushed = stream.write(b"")
        flushed.add_done_callback(self._shut_write)

    def _shut_write(self, flushed: Future[None]) -> None:
        if flushed.cancelled() or flushed.exception() is not None:
            return  # the stream closed; nothing left to do
        sock = self._stream.socket
        stream: object = self._stream
        if sock is None or isinstance(stream, tornado.iostream.SSLIOStream):
            return  # TLS: a half-close without close_notify; rely on Connection: close
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _read_bytes(self, num_bytes: int, partial: bool = False) -> Awaitable[bytes]:
        future = self._read(num_bytes, partial)
        if isinstance(future, Future):
            future.add_done_callback(self._count)
        return future

    def _count(self, future: Future[bytes]) -> None:
        if future.cancelled() or future.exception() is not None:
            self._deadline.cancel()  # closed (by the client, or by us)
            return
        self.discarded += len(future.result())
        if self.discarded >= self._max_bytes:
            self._end(END_BYTES)

    def _end(self, reason: str) -> None:
        self._deadline.cancel()
        stream = self._stream
        if stream.closed():
            return
        stream.close()
        if self._on_end is not None:
            self._on_end(reason, self.discarded)
