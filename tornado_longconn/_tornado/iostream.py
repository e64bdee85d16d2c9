"""Tornado's ``IOStream``: the private names the library reads, and raw socket writes (internal).

Private names used (each checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``BaseIOStream._write_buffer`` -- bytes accepted by ``write`` and not yet sent
  (``len()`` of it; ``None`` once the stream closed).
* ``BaseIOStream._total_write_index`` / ``_total_write_done_index`` -- bytes ever
  accepted by ``write`` / handed to the kernel; a write future resolves when the
  second reaches the first's value right after that ``write``.
* ``BaseIOStream._closed`` -- what ``closed()`` returns (read as an attribute on
  the fan-out's hot path: one read instead of a call).
* ``BaseIOStream._read_buffer_size`` -- bytes read from the socket and not yet
  consumed by a ``read_*`` call.
* ``BaseIOStream._close_callback`` -- what ``set_close_callback`` set (``None``
  after it ran).
* ``BaseIOStream.error`` (public) -- the exception that closed the stream; its
  traceback holds the frames of the stream's own methods, so a stream closed by an
  error (a reset peer) sits in a reference cycle: :func:`release_error` drops it.
* ``IOStream.socket`` -- the connected socket: raw ``send()`` when nothing is
  pending (order is kept because the stream is idle), ``SO_LINGER`` for an abort.

Checked once when this module is imported (:func:`check_iostream`).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Sized
from typing import Final, Protocol

import tornado.iostream
from tornado.iostream import IOStream, SSLIOStream

from ._check import register, require_attrs, require_init_attrs

__all__ = [
    "StreamInternals",
    "abort",
    "check_iostream",
    "close_callback",
    "idle",
    "pending_bytes",
    "plain_socket",
    "release_error",
    "send_if_idle",
    "socket_send",
    "try_send",
    "unread_bytes",
    "write_done",
    "write_indexes",
    "write_total",
]


class StreamInternals(Protocol):
    """The private part of ``tornado.iostream.IOStream`` that the library reads."""

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (a _StreamBuffer; None once closed)
    _write_buffer: Sized | None
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _total_write_index: int
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _total_write_done_index: int
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _closed: bool
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _read_buffer_size: int
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _close_callback: Callable[[], None] | None
    # public attribute, written to directly: checked against Tornado 6.4.2, 6.5.2, 6.6.1
    socket: socket.socket


_INSTANCE_NAMES: Final = (
    "_write_buffer",
    "_total_write_index",
    "_total_write_done_index",
    "_closed",
    "_read_buffer_size",
    "_close_callback",
)


def check_iostream() -> None:
    """Raise :class:`~tornado_longconn.exceptions.LongConnError` if a name above is gone.

    Run once at import of this module.
    """
    require_init_attrs(tornado.iostream.BaseIOStream, _INSTANCE_NAMES)
    require_init_attrs(IOStream, ("socket",))
    require_attrs(IOStream, ("set_close_callback", "writing", "closed", "write", "close"))


register(check_iostream)


# The functions below annotate ``stream`` as StreamInternals by assignment instead of
# calling ``cast()``: they run once per member and message in the fan-out, where a
# function call is a measurable part of the cost.


def pending_bytes(stream: IOStream) -> int:
    """Bytes accepted by ``stream.write`` but not yet handed to the kernel (0 once closed)."""
    s: StreamInternals = stream  # type: ignore[assignment]
    buffer = s._write_buffer
    return 0 if buffer is None else len(buffer)


def write_indexes(stream: IOStream) -> tuple[int, int]:
    """``(total, done)``: bytes ever accepted by ``stream.write`` and bytes handed to the kernel."""
    s: StreamInternals = stream  # type: ignore[assignment]
    return s._total_write_index, s._total_write_done_index


def write_total(stream: IOStream) -> int:
    """Bytes ever accepted by ``stream.write`` (the first of :func:`write_indexes`)."""
    s: StreamInternals = stream  # type: ignore[assignment]
    return s._total_write_index


def write_done(stream: IOStream) -> int:
    """Bytes ever handed to the kernel (the second of :func:`write_indexes`)."""
    s: StreamInternals = stream  # type: ignore[assignment]
    return s._total_write_done_index


def idle(stream: IOStream) -> bool:
    """True when ``stream`` is open and holds no unsent bytes (a raw send keeps order)."""
    s: StreamInternals = stream  # type: ignore[assignment]
    return s._total_write_index == s._total_write_done_index and not s._closed


def unread_bytes(stream: IOStream) -> int:
    """Bytes read from the socket that no ``read_*`` call consumed yet."""
    s: StreamInternals = stream  # type: ignore[assignment]
    return s._read_buffer_size


def close_callback(stream: IOStream) -> Callable[[], None] | None:
    """The callback ``stream.set_close_callback`` installed (None if none, or after it ran)."""
    s: StreamInternals = stream  # type: ignore[assignment]
    return s._close_callback


def plain_socket(stream: IOStream) -> socket.socket | None:
    """The socket of an open plain-TCP ``IOStream`` for raw sends; None for TLS or closed."""
    if isinstance(stream, SSLIOStream) or stream.closed():
        return None
    sock = stream.socket
    return sock if isinstance(sock, socket.socket) else None


def socket_send(sock: socket.socket, data: bytes) -> int:
    """``sock.send(data)``: bytes the kernel took; 0 when it would block.

    Other ``OSError`` (reset, broken pipe) propagate: the caller closes the stream.
    """
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


def send_if_idle(stream: IOStream, sock: socket.socket, data: bytes) -> int:
    """Raw-send ``data`` on ``sock`` (the socket of ``stream``) if the stream is idle.

    Returns -1 (nothing sent) when the stream holds unsent bytes or is closed;
    otherwise the bytes the kernel took. Raises ``OSError`` when the send fails
    (would block included: the caller then takes its ordinary path). The
    fan-out's per-member test and write, in one call.
    """
    s: StreamInternals = stream  # type: ignore[assignment]
    if s._total_write_index != s._total_write_done_index or s._closed:
        return -1
    return sock.send(data)


def try_send(stream: IOStream, data: bytes) -> int:
    """Send as much of ``data`` as the socket takes now, without blocking.

    Only for an open plain-TCP ``IOStream`` with nothing pending; for TLS, closed
    and busy streams it sends nothing and returns 0, and the caller must
    ``stream.write`` all of ``data``. Connection errors propagate as ``OSError``.
    """
    if stream.writing() or stream.closed() or isinstance(stream, SSLIOStream):
        return 0
    return socket_send(stream.socket, data)


def abort(stream: IOStream) -> None:
    """Close ``stream`` at once with a TCP reset (``SO_LINGER`` 0), discarding unsent data.

    Does nothing on a closed stream.
    """
    if stream.closed():
        return
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.close()


def release_error(stream: IOStream | None) -> None:
    """Drop the traceback of the error that closed ``stream`` (nothing if none).

    ``IOStream.close(exc_info=...)`` keeps the exception in ``stream.error`` with
    its traceback, whose frames hold the stream (``self`` of ``read_from_fd`` and
    its callers): the stream, its socket and buffers would wait for the cyclic
    collector. Called once the connection's close handling ran; the exception
    itself (type, errno, message) stays for whoever reads ``stream.error``.
    """
    if stream is None:
        return
    error = stream.error
    if error is not None and error.__traceback__ is not None:
        error.__traceback__ = None
        context = error.__context__
        if context is not None:
            context.__traceback__ = None
