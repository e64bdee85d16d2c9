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
from typing import Any, Final, Protocol

import tornado.iostream
from tornado.iostream import IOStream, SSLIOStream
from tornado.iostream import StreamBufferFullError as _StreamBufferFullError
from tornado.iostream import UnsatisfiableReadError as _UnsatisfiableReadError
from tornado.log import gen_log as _gen_log

from ._check import register, require_attrs, require_init_attrs

__all__ = [
    "KEEP_READING_BYTES",
    "KeepReadingIOStream",
    "StreamInternals",
    "StreamReader",
    "abort",
    "attach_reader",
    "attached_readers",
    "check_iostream",
    "check_keep_reading",
    "close_callback",
    "detach_reader",
    "idle",
    "keep_reading",
    "listen_for_reads",
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
    s: StreamInternals = stream  # type: ignore[assignment]
    if s._total_write_index != s._total_write_done_index or s._closed:
        return 0  # bytes wait (``stream.writing()``), or closed
    if isinstance(stream, SSLIOStream):
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


# -- keep listening while a few bytes wait ---------------------------------------------
#
# After every read event, ``IOStream._handle_events`` stops listening for reads when
# no read is pending and its buffer is not empty, and the next ``read_bytes`` starts
# listening again. A WebSocket frame arrives whole, and Tornado reads it in parts
# (header, mask, payload): after the header's read the rest is buffered, so each
# inbound frame (every pong) costs two selector changes -- on asyncio two
# ``epoll_ctl`` calls and a new ``Handle`` and ``SelectorKey``, objects that live
# until the next frame and are what the cyclic GC promotes and walks.
# :class:`KeepReadingIOStream` keeps listening while at most
# :data:`KEEP_READING_BYTES` wait in the buffer: no change at all for small
# frames, and inbound flow control is kept (past that much unread data the stream
# stops listening exactly as Tornado's does). Its ``_handle_events`` is Tornado's
# (identical in 6.4.2, 6.5.2 and 6.6.1; ``tests/test_tornado_canary.py`` compares
# the source) with that one condition changed.
#
# It also reads with one ``recv()`` per readiness event: Tornado's stream tries the
# socket inline for every read (``_try_inline_read``) and keeps reading after a
# short read until the socket answers EAGAIN (``_read_to_buffer_loop``), two
# ``recv()`` calls per inbound frame answered EAGAIN, each an exception in Python;
# and each ``recv`` goes into a zero-filled ``bytearray`` of ``read_chunk_size``
# (64 KiB) that is then copied. The selector is level-triggered, so bytes that
# arrive after a short read are reported by the next poll.

#: Bytes that may wait in a stream's read buffer while it keeps listening for reads.
KEEP_READING_BYTES: Final = 4096


class KeepReadingIOStream(IOStream):
    """An ``IOStream`` that keeps listening for reads while a few bytes are buffered.

    Made by :func:`keep_reading` (a class change of a live stream: same layout, no
    new attributes; its IOLoop registration is made again with the new method).
    """

    __slots__ = ()

    def _handle_events(self, fd: Any, events: int) -> None:
        if self.closed():
            _gen_log.warning("Got events for closed stream %s", fd)
            return
        try:
            if self._connecting:
                # Most IOLoops will report a write failed connect
                # with the WRITE event, but SelectIOLoop reports a
                # READ as well so we must check for connecting before
                # either.
                self._handle_connect()
            if self.closed():
                return
            if events & self.io_loop.READ:
                reader = _READERS.get(self)
                internals: _ReadInternals = self
                if (
                    reader is not None
                    and reader.parked
                    and internals._read_future is None
                    and not internals._read_buffer_size
                ):
                    self._hand_over(reader)
                else:
                    self._handle_read()
            if self.closed():
                return
            if events & self.io_loop.WRITE:
                self._handle_write()
            if self.closed():
                return
            if events & self.io_loop.ERROR:
                self.error = self.get_fd_error()
                # We may have queued up a user callback in _handle_read or
                # _handle_write, so don't close the IOStream until those
                # callbacks have had a chance to run.
                self.io_loop.add_callback(self.close)
                return
            state = self.io_loop.ERROR
            if self.reading():
                state |= self.io_loop.READ
            if self.writing():
                state |= self.io_loop.WRITE
            if state == self.io_loop.ERROR and self._read_buffer_size <= KEEP_READING_BYTES:
                # If the connection is idle, listen for reads too so
                # we can tell if the connection is closed.  If there is
                # data in the read buffer we won't run the close callback
                # yet anyway, so we don't need to listen in this case.
                state |= self.io_loop.READ
            if state != self._state:
                assert self._state is not None, (
                    "shouldn't happen: _handle_events without self._state"
                )
                self._state = state
                self.io_loop.update_handler(self.fileno(), self._state)
        except _UnsatisfiableReadError as e:
            _gen_log.info("Unsatisfiable read, closing connection: %s", e)
            self.close(exc_info=e)
        except Exception as e:
            _gen_log.error("Uncaught exception, closing connection.", exc_info=True)
            self.close(exc_info=e)
            raise

    # -- a parked reader -------------------------------------------------------------

    def _handle_read(self) -> None:
        super()._handle_read()
        reader = _READERS.get(self)
        if reader is not None:
            reader.readable()

    def _hand_over(self, reader: StreamReader) -> None:
        # A parked reader with nothing buffered and no read pending: what one recv()
        # returns goes to the reader as it is, past the read buffer (no read_bytes,
        # no future, no copy). Errors as in Tornado's _handle_read: a reset closes
        # quietly, anything else closes with a warning.
        try:
            data = self.socket.recv(self.read_chunk_size)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(exc_info=exc)
            internals: _ReadInternals = self
            if not internals._is_connreset(exc):
                _gen_log.warning("error on read: %s", exc)
            return
        if not data:
            self.close()
            return
        reader.received(data)

    def _signal_closed(self) -> None:
        reader = _READERS.pop(self, None)
        super()._signal_closed()
        if reader is not None:
            reader.stream_closed()

    # -- reading: one recv per readiness event ------------------------------------

    def _try_inline_read(self) -> None:
        # Tornado's, without its inline socket read. This stream listens for reads
        # whenever nothing is buffered, and the selector is level-triggered: bytes
        # that arrived are reported by the next poll. The inline read is a recv()
        # answered EAGAIN (an exception in Python) for nearly every WebSocket frame.
        internals: _ReadInternals = self
        pos = internals._find_read_pos()
        if pos is not None:
            internals._read_from_buffer(pos)
            return
        internals._check_closed()
        if not self.closed():
            internals._add_io_state(self.io_loop.READ)

    def _read_to_buffer_loop(self) -> int | None:
        # Tornado's loop reads until the socket answers EAGAIN; a short read already
        # means the socket is empty for now (more is reported by the next poll), and
        # each recv() gets a bytes object of its size instead of a zero-filled
        # bytearray of read_chunk_size that is then copied.
        internals: _ReadInternals = self
        if internals._user_read_buffer:  # read_into(): Tornado's own loop
            return super()._read_to_buffer_loop()
        target = internals._read_bytes
        chunk = self.read_chunk_size
        while not self.closed():
            if self._recv_chunk(internals, chunk) < chunk:
                break
            if target is None or internals._read_buffer_size >= target:
                break
        return internals._find_read_pos()

    def _recv_chunk(self, internals: _ReadInternals, chunk: int) -> int:
        """One recv() into the read buffer: bytes read, 0 if none (EAGAIN or closed)."""
        try:
            data = self.socket.recv(chunk)
        except BlockingIOError:
            return 0
        except OSError as exc:
            # Tornado's handling: a reset closes quietly, anything else closes and raises.
            self.close(exc_info=exc)
            if internals._is_connreset(exc):
                return 0
            raise
        if not data:
            self.close()
            return 0
        internals._read_buffer += data
        internals._read_buffer_size += len(data)
        if internals._read_buffer_size > self.max_buffer_size:
            _gen_log.error("Reached maximum read buffer size")
            full = _StreamBufferFullError("Reached maximum read buffer size")
            self.close(exc_info=full)
            raise full
        return len(data)


class _ReadInternals(Protocol):
    """The private part of ``IOStream`` that :class:`KeepReadingIOStream` reads with."""

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (a bytearray)
    _read_buffer: bytearray
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    _read_buffer_size: int
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (bytes a pending read_bytes wants)
    _read_bytes: int | None
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (True while a read_into is pending)
    _user_read_buffer: bool
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (the pending read's future, or None)
    _read_future: Any

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _find_read_pos(self) -> int | None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _read_from_buffer(self, pos: int) -> None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _check_closed(self) -> None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _add_io_state(self, state: int) -> None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _is_connreset(self, exc: BaseException) -> bool: ...


class StreamReader(Protocol):
    """What :func:`attach_reader` attaches: told about read events and the close."""

    @property
    def parked(self) -> bool:
        """True while the reader holds no pending read and takes bytes from :meth:`received`."""

    def received(self, data: bytes) -> None:
        """Bytes read for a parked reader, in order; the stream's read buffer was empty."""

    def readable(self) -> None:
        """The stream read bytes into its buffer (after any pending read was served)."""

    def stream_closed(self) -> None:
        """The stream closed."""


# Streams whose reader parks (holds no pending read between frames) -> that reader.
# A stream leaves on close, or by detach_reader(); one entry per such connection.
_READERS: dict[IOStream, StreamReader] = {}


def attach_reader(stream: IOStream | None, reader: StreamReader) -> bool:
    """Make ``stream`` a :class:`KeepReadingIOStream` that tells ``reader`` of reads and close.

    False (nothing attached) for any other stream than a plain, open ``IOStream``.
    """
    if stream is None or not keep_reading(stream) or stream.closed():
        return False
    _READERS[stream] = reader
    return True


def detach_reader(stream: IOStream | None) -> None:
    """Undo :func:`attach_reader` (a no-op if nothing is attached)."""
    if stream is not None:
        _READERS.pop(stream, None)


def attached_readers() -> int:
    """How many streams have a reader attached (for tests and inspection)."""
    return len(_READERS)


def listen_for_reads(stream: IOStream) -> None:
    """Make sure ``stream`` is registered for read events (a no-op if it is, or closed)."""
    internals: _ReadInternals = stream
    internals._add_io_state(stream.io_loop.READ)


def keep_reading(stream: IOStream | None) -> bool:
    """Make ``stream`` a :class:`KeepReadingIOStream` if it is a plain ``IOStream``.

    True if it is one now; an ``SSLIOStream`` or any other subclass is left as it is.
    """
    if stream is None:
        return False
    if type(stream) is IOStream and not stream.closed():
        stream.__class__ = KeepReadingIOStream
        state = stream._state
        if state is not None:
            # The IOLoop holds the bound method it was given: register the new one.
            fd = stream.fileno()
            stream.io_loop.remove_handler(fd)
            stream.io_loop.add_handler(fd, stream._handle_events, state)
    return type(stream) is KeepReadingIOStream


def check_keep_reading() -> None:
    """The names :class:`KeepReadingIOStream` uses exist."""
    require_attrs(
        IOStream,
        (
            "_handle_events",
            "_handle_connect",
            "_handle_read",
            "_handle_write",
            "get_fd_error",
            "reading",
            "writing",
            "fileno",
        ),
    )
    require_init_attrs(IOStream, ("_connecting", "_read_buffer_size", "_state", "io_loop"))
    require_attrs(
        IOStream,
        (
            "_try_inline_read",
            "_read_to_buffer_loop",
            "_find_read_pos",
            "_read_from_buffer",
            "_check_closed",
            "_add_io_state",
            "_is_connreset",
            "_signal_closed",
        ),
    )
    require_init_attrs(
        IOStream,
        (
            "_read_buffer",
            "_read_bytes",
            "_user_read_buffer",
            "_read_future",
            "read_chunk_size",
            "max_buffer_size",
        ),
    )


register(check_keep_reading)
