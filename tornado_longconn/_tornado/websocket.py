"""Tornado's WebSocket reader, made strict about RFC 6455 (internal).

Tornado's ``WebSocketProtocol13`` accepts unmasked client frames, echoes any
close code it receives (999, 1005, 5000, ...), raises on a close reason that is
not UTF-8, and on the protocol errors it does detect drops the TCP connection
without a close frame. :class:`StrictWebSocketProtocol` subclasses it and:

* checks every frame header as soon as its two bytes are read (before the
  payload): client frames must be masked; reserved bits only as negotiated
  (RSV1 on the first frame of a data message with permessage-deflate); known
  opcodes only; control frames final and at most 125 bytes; a continuation
  only inside a fragmented message and no new data message inside one;
* checks a received close frame (:func:`close_payload_failure`): an invalid
  code or a 1-byte payload is answered with 1002, a reason that is not UTF-8
  with 1007, instead of being echoed;
* answers a compressed message that does not inflate with 1002 (Tornado lets
  the ``zlib.error`` escape its read loop);
* whenever Tornado itself fails the connection while reading (text that is not
  UTF-8, a future check), sends a close frame first -- 1007 for text, 1002
  otherwise -- best effort (handed to the kernel if it takes it at once), then
  closes the TCP connection. Tornado's own 1009 "message too big" is kept;
* reports every such failure (close code and reason) to an ``on_error``
  callback, for :class:`~tornado_longconn.strict.ProtocolErrorCounters`.

It reads frames itself: one pending read per wait for the socket, and every
frame the stream has buffered parsed from one chunk (Tornado's reader awaits a
read, a future and a coroutine, for the header, the mask and the payload of
each frame). An idle connection's pong costs one future instead of three and no
coroutine. Messages go to Tornado's own ``_handle_message`` (and from there to
the handler's callbacks), as Tornado's reader hands them over; the limits are
Tornado's (``max_message_size`` answered with 1009) and its fairness rule (a
turn for the loop after about 256 KiB parsed without a wait) applies on every
version.

Private names used (each checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``WebSocketProtocol13._receive_frame_loop()`` -- the coroutine
  ``WebSocketProtocol13._accept_connection`` awaits after ``open()`` to read
  frames until the connection ends (checked: its code names it); replaced by
  the library's reader (below), which ends it as Tornado's does (an abort on a
  closed stream, then ``handler.on_ws_connection_close(code, reason)``).
* ``WebSocketProtocol13._wire_bytes_in`` -- bytes read as frames; the reader
  adds the bytes it takes from the stream (heartbeats read it as progress).
* ``WebSocketProtocol13._frame_compressed`` -- read by ``_handle_message``:
  inflate the message? Set by the reader before each message it hands over.
* ``tornado.util._websocket_mask(mask, data)`` -- unmasks a payload (Tornado's C
  speedup when it is built).
* ``WebSocketProtocol13._handle_message(opcode, data)`` -- dispatches a
  complete message or control frame (close frames: records and echoes the code).
* ``WebSocketProtocol._run_callback(callback, *args)`` -- runs a handler
  callback (``on_message``, ``on_ping``, ``on_pong``); aborts if it raises.
* ``WebSocketProtocol._abort()`` -- closes the TCP connection at once.
* ``WebSocketProtocol13._decompressor`` -- not ``None`` once permessage-deflate
  was negotiated (then RSV1 marks a compressed message).
* ``WebSocketProtocol13.params`` -- a ``tornado.websocket._WebSocketParams``
  (private class), passed on unchanged to the strict protocol.

The class-level names are checked when this module is imported, the instance
attributes (set by ``__init__``) likewise by reading ``__init__``'s code: a
Tornado release without one raises
:class:`~tornado_longconn.exceptions.LongConnError` naming it and
``tornado.version``. There is no fallback to the lenient reader.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Callable
from typing import Any, Final, NamedTuple, Protocol, cast

import tornado
import tornado.util
from tornado.concurrent import Future
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from ..exceptions import LongConnError
from ._check import missing, register, require_attrs, require_init_attrs
from .iostream import attach_reader, detach_reader, listen_for_reads, unread_bytes

__all__ = [
    "PROTOCOL_ERROR",
    "UNSUPPORTED_DATA",
    "Failure",
    "FrameChecker",
    "ReaderInternals",
    "StrictWebSocketProtocol",
    "check_websocket",
    "close_payload_failure",
    "is_valid_close_code",
    "make_strict",
]

#: RFC 6455 close code for a protocol error.
PROTOCOL_ERROR: Final = 1002
#: RFC 6455 close code for data inconsistent with the message type (not UTF-8).
UNSUPPORTED_DATA: Final = 1007

# Called with the close code and reason of every connection failed while reading.
ErrorCallback = Callable[[int, str], None]

_OP_CONT: Final = 0x0
_OP_TEXT: Final = 0x1
_OP_BINARY: Final = 0x2
_OP_CLOSE: Final = 0x8
_KNOWN_OPCODES: Final = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))
# What the parser answers (see StrictWebSocketProtocol._parse).
_IDLE: Final = 0
_NEED: Final = 1
_WAIT: Final = 2
_END: Final = 3
_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")

#: Bytes the reader takes from the stream per read: what the stream has buffered,
#: up to this much, so the frames in it are parsed without a read each.
READ_CHUNK: Final = 65536
# Tornado 6.6's fairness rule, applied on every version: after about this much
# work (bytes, plus a cost per frame) without a wait for the socket, the reader
# gives the event loop a turn.
_YIELD_THRESHOLD: Final = 256 * 1024
_FRAME_YIELD_COST: Final = 1024


class Failure(NamedTuple):
    """Why a connection is failed: the close code sent and its reason."""

    code: int
    reason: str


_UNMASKED: Final = Failure(PROTOCOL_ERROR, "frame not masked")
_MASKED: Final = Failure(PROTOCOL_ERROR, "frame masked")
_RESERVED_BITS: Final = Failure(PROTOCOL_ERROR, "reserved bits set")
_BAD_OPCODE: Final = Failure(PROTOCOL_ERROR, "unknown opcode")
_FRAGMENTED_CONTROL: Final = Failure(PROTOCOL_ERROR, "fragmented control frame")
_LONG_CONTROL: Final = Failure(PROTOCOL_ERROR, "control frame longer than 125 bytes")
_ORPHAN_CONTINUATION: Final = Failure(PROTOCOL_ERROR, "continuation without a message")
_INTERLEAVED: Final = Failure(PROTOCOL_ERROR, "new message inside a fragmented message")
_BAD_CLOSE_CODE: Final = Failure(PROTOCOL_ERROR, "invalid close code")
_SHORT_CLOSE: Final = Failure(PROTOCOL_ERROR, "close payload of 1 byte")
_CLOSE_REASON_NOT_UTF8: Final = Failure(UNSUPPORTED_DATA, "close reason not UTF-8")
_TEXT_NOT_UTF8: Final = Failure(UNSUPPORTED_DATA, "text not UTF-8")
_BAD_DEFLATE: Final = Failure(PROTOCOL_ERROR, "decompression failed")
_OTHER: Final = Failure(PROTOCOL_ERROR, "protocol error")


def is_valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 section 7.4).

    Valid: 1000-1003, 1007-1014 (1012-1014 registered with IANA since), and
    3000-4999 (registered and private use). Invalid: 0-999, 1004-1006, 1015
    (reserved, never on the wire), 1016-2999 and 5000 and above.

    >>> [c for c in (999, 1000, 1004, 1005, 1011, 1014, 1015, 2999, 3000, 4999, 5000)
    ...  if is_valid_close_code(c)]
    [1000, 1011, 1014, 3000, 4999]
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_payload_failure(payload: bytes) -> Failure | None:
    """What is wrong with a received close frame's payload, or ``None`` if nothing.

    An empty payload is valid (no code). One byte is a protocol error (1002),
    as is a code that :func:`is_valid_close_code` rejects; a reason that is not
    UTF-8 is 1007 (checked before the code).

    >>> close_payload_failure(b"\\x03\\xe8bye") is None
    True
    >>> close_payload_failure(b"\\x03\\xe7")
    Failure(code=1002, reason='invalid close code')
    >>> close_payload_failure(b"\\x03\\xe8\\xff").code
    1007
    """
    if not payload:
        return None
    if len(payload) == 1:
        return _SHORT_CLOSE
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return _CLOSE_REASON_NOT_UTF8  # checked first, as python-websockets does
    if not is_valid_close_code(int.from_bytes(payload[:2], "big")):
        return _BAD_CLOSE_CODE
    return None


class FrameChecker:
    """The RFC 6455 header rules for the frames of one connection (I/O-free).

    ``expect_masked`` is True on the server (client frames are masked) and
    ``deflate`` True once permessage-deflate was negotiated (RSV1 then marks the
    first frame of a compressed data message). :meth:`check` takes the two
    first bytes of each frame, in order, and tracks fragmentation.

    >>> checker = FrameChecker(expect_masked=True, deflate=False)
    >>> checker.check(0x01, 0x85) is None      # text, not final, masked, 5 bytes
    True
    >>> checker.check(0x81, 0x85).reason       # a new text message inside it
    'new message inside a fragmented message'
    >>> FrameChecker(expect_masked=True, deflate=False).check(0x81, 0x05).reason
    'frame not masked'
    """

    __slots__ = ("deflate", "expect_masked", "in_fragment")

    def __init__(self, *, expect_masked: bool, deflate: bool) -> None:
        self.expect_masked = expect_masked
        self.deflate = deflate
        #: True between the first and the final frame of a fragmented message.
        self.in_fragment = False

    def check(self, first: int, second: int) -> Failure | None:
        """The failure of a frame whose header starts with ``first``, ``second``; or None."""
        if bool(second & 0x80) != self.expect_masked:
            return _UNMASKED if self.expect_masked else _MASKED
        opcode = first & 0x0F
        final = bool(first & 0x80)
        reserved = first & 0x70
        if self.deflate and opcode in (_OP_TEXT, _OP_BINARY):
            reserved &= ~0x40
        if reserved:
            return _RESERVED_BITS
        if opcode not in _KNOWN_OPCODES:
            return _BAD_OPCODE
        if opcode & 0x8:
            if not final:
                return _FRAGMENTED_CONTROL
            if second & 0x7F > 125:
                return _LONG_CONTROL
        elif opcode == _OP_CONT:
            if not self.in_fragment:
                return _ORPHAN_CONTINUATION
            self.in_fragment = not final
        else:
            if self.in_fragment:
                return _INTERLEAVED
            self.in_fragment = not final
        return None


class ReaderInternals(Protocol):
    """The private part of ``WebSocketProtocol13`` that the strict reader uses."""

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (a _PerMessageDeflateDecompressor)
    _decompressor: object | None
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (read by _handle_message: inflate?)
    _frame_compressed: bool | None
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (bytes parsed as frames)
    _wire_bytes_in: int

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (started by the handler after open())
    async def _receive_frame_loop(self) -> None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (on WebSocketProtocol)
    def _run_callback(
        self, callback: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Future[Any] | None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (on WebSocketProtocol)
    def _abort(self) -> None: ...


_METHODS: Final = ("_receive_frame_loop", "_handle_message", "_run_callback", "_abort")
# "params" holds a private _WebSocketParams; the others are public attribute names.
_INSTANCE_NAMES: Final = (
    "_decompressor",
    "_frame_compressed",
    "params",
    "mask_outgoing",
    "stream",
    "client_terminated",
    "server_terminated",
    "close_code",
    "close_reason",
    "_wire_bytes_in",
)


def check_websocket() -> None:
    """Raise :class:`~tornado_longconn.exceptions.LongConnError` if a name above is gone.

    Run at import of this module, and again by ``_check.check_tornado()``.
    """
    require_attrs(WebSocketProtocol13, (*_METHODS, "close", "_accept_connection"))
    require_init_attrs(WebSocketProtocol13, _INSTANCE_NAMES)
    accept = getattr(WebSocketProtocol13._accept_connection, "__code__", None)
    if accept is None or "_receive_frame_loop" not in accept.co_names:
        # The reader replaces _receive_frame_loop: Tornado must still start it by name.
        raise missing(
            "tornado.websocket.WebSocketProtocol13",
            "_receive_frame_loop",
            "no longer started by _accept_connection",
        )
    if not callable(getattr(tornado.util, "_websocket_mask", None)):
        raise missing("tornado.util", "_websocket_mask")


register(check_websocket)

# ``_unmask(mask, data)``: ``data`` XOR-ed with the 4-byte ``mask``
# (``tornado.util._websocket_mask``: Tornado's C speedup when it is built).
_unmask: Final[Callable[[bytes, bytes], bytes]] = tornado.util._websocket_mask


class StrictWebSocketProtocol(WebSocketProtocol13):
    """``WebSocketProtocol13`` that fails connections breaking RFC 6455, with a close frame.

    Built by :func:`make_strict` from the protocol Tornado's
    ``get_websocket_protocol`` returned (same handler, masking and parameters:
    compression, ping interval, ``max_message_size``). ``on_error(code,
    reason)`` is called once per failed connection.
    """

    # Slots, not instance attributes: Tornado's protocol instances share one key
    # table (a split dict) while they have the same keys; six more keys would give
    # every connection a dict of its own (about 1.5 KB).
    __slots__ = (
        "_strict_can_park",
        "_strict_checked",
        "_strict_checker",
        "_strict_compressed",
        "_strict_ended",
        "_strict_failure",
        "_strict_fragment_opcode",
        "_strict_fragments",
        "_strict_parked",
        "_strict_quiet",
        "_strict_reader",
        "_strict_syncing",
        "_strict_task",
        "on_error",
    )

    def __init__(
        self,
        handler: Any,
        mask_outgoing: bool,
        params: Any,
        *,
        on_error: ErrorCallback | None = None,
    ) -> None:
        super().__init__(handler, mask_outgoing, params)
        #: Called with (close code, reason) when this connection is failed while reading.
        self.on_error = on_error
        # The task running _receive_frame, while it runs: a close or abort made
        # synchronously from it (outside handler callbacks) is a protocol failure.
        self._strict_reader: asyncio.Task[Any] | None = None
        self._strict_quiet = False
        self._strict_failure: Failure = _OTHER
        # The reader's state between reads (see "reading" below).
        self._strict_checker: FrameChecker | None = None
        self._strict_checked = False  # the next frame's header passed the checker
        self._strict_fragments: bytearray | None = None
        self._strict_fragment_opcode = 0
        self._strict_compressed = False
        self._strict_can_park = False
        self._strict_parked = False
        self._strict_syncing = False  # received() is parsing
        self._strict_ended: asyncio.Future[None] | None = None
        self._strict_task: asyncio.Future[None] | None = None

    # -- reading -------------------------------------------------------------
    #
    # Two ways in, one parser (_parse). While a coroutine is needed -- a payload
    # that has not all arrived, an ``async`` handler callback to wait for -- frames
    # are read by a coroutine (_read_async) with one pending read per wait for the
    # socket. At a frame boundary with nothing buffered, and when the stream is a
    # KeepReadingIOStream, the reader PARKS instead: no read stays pending, and the
    # stream hands what each read event's recv() returned to :meth:`received`,
    # which parses it synchronously. An idle connection then holds no future and no suspended
    # coroutine of the reader, and a pong costs no future and no task step (what a
    # heartbeat's pong used to leave for the collector to promote). The reader
    # leaves the parked state for the coroutine whenever it needs one.

    async def _receive_frame_loop(self) -> None:
        # Tornado's loop (``try: frames; except StreamClosedError: abort; then
        # on_ws_connection_close``) around a reader of our own.
        self._strict_reader = asyncio.current_task()
        stream = self.stream
        try:
            internals: ReaderInternals = self  # type: ignore[assignment]
            self._strict_checker = FrameChecker(
                expect_masked=not self.mask_outgoing,
                deflate=internals._decompressor is not None,
            )
            self._strict_can_park = attach_reader(stream, self)
            await self._read_async(b"", 0, None)
            if self._strict_parked:
                self._strict_reader = None
                ended = self._strict_ended = asyncio.get_running_loop().create_future()
                await ended
        except StreamClosedError:
            self._abort()
        finally:
            self._strict_reader = None
            self._strict_parked = False
            detach_reader(stream)
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    @property
    def parked(self) -> bool:
        """True while the reader holds no pending read: the stream hands it what it reads."""
        return self._strict_parked

    def received(self, data: bytes) -> None:
        """Parse bytes the stream read for the parked reader (called by the stream).

        The stream's buffer was empty and no read was pending: ``data`` is all
        there is. Hands over to the coroutine when a frame is incomplete or a
        handler callback returned an awaitable.
        """
        if not self._strict_parked:  # never, as the stream checks first
            raise RuntimeError("received() on a reader that is not parked")
        self._strict_syncing = True
        try:
            if self._take(data) not in (_IDLE, _END):
                return  # the coroutine reads on
        finally:
            self._strict_syncing = False
        if self.client_terminated:
            self._end()

    def readable(self) -> None:
        """Parse what the stream read into its buffer, if the reader is parked (called by the stream).

        Runs after every read event of a :class:`KeepReadingIOStream` this
        protocol is attached to that did not go to :meth:`received` (bytes were
        buffered, or a read was pending); each chunk taken goes to
        :meth:`received`, until the reader is no longer parked.
        """
        stream = self.stream
        while self._strict_parked and unread_bytes(stream) and not self.client_terminated:
            # Served from the stream's buffer at once: a future that is done.
            read = cast("Future[bytes]", stream.read_bytes(READ_CHUNK, partial=True))
            self.received(read.result())

    def _take(self, buf: bytes) -> int:
        """Parse ``buf`` for the parked reader; the status of :meth:`_parse`.

        :data:`_IDLE`: every byte used, still parked. :data:`_END`: the
        connection is closing. :data:`_NEED` or :data:`_WAIT`: handed over to
        the coroutine (which then owns the reading): a frame is incomplete or a
        handler callback returned an awaitable.
        """
        internals: ReaderInternals = self  # type: ignore[assignment]
        internals._wire_bytes_in += len(buf)
        status, pos, extra = self._parse(buf, 0)
        if status in (_IDLE, _END):
            return status
        self._strict_parked = False
        pending = extra if status == _WAIT else None
        self._strict_task = asyncio.ensure_future(self._resume(buf, pos, pending))
        return status

    def stream_closed(self) -> None:
        """The stream closed (called by the stream): a parked reader ends, as Tornado's would."""
        if self._strict_parked:
            # Tornado's reader learns it from its read future, a callback later.
            asyncio.get_running_loop().call_soon(self._closed_while_parked)

    def _closed_while_parked(self) -> None:
        if self._strict_parked:
            self._abort()

    def _end(self, exc: BaseException | None = None) -> None:
        """The reader is done: let _receive_frame_loop end (raising ``exc`` if given)."""
        self._strict_parked = False
        ended = self._strict_ended
        if ended is not None and not ended.done():
            if exc is None:
                ended.set_result(None)
            else:
                ended.set_exception(exc)

    async def _resume(self, buf: bytes, pos: int, pending: Future[None] | None) -> None:
        """The coroutine reader, after the parked reader handed over."""
        self._strict_reader = asyncio.current_task()
        try:
            await self._read_async(buf, pos, pending)
        except StreamClosedError:
            self._abort()
        except BaseException as exc:  # as from Tornado's reader: out of _receive_frame_loop
            self._end(exc)
            return
        finally:
            self._strict_reader = None
            self._strict_task = None
        if not self._strict_parked:
            self._end()

    async def _fill(self, rest: bytes, n: int) -> bytes:
        """``rest`` and what follows it on the stream: at least ``n`` bytes.

        Small needs take what the stream has buffered (up to :data:`READ_CHUNK`
        bytes: the frames behind it are parsed without another read); a large
        payload is read in one exact read. Bytes taken from the stream count in
        ``_wire_bytes_in`` (read progress) as they are taken.
        """
        stream = self.stream
        internals: ReaderInternals = self  # type: ignore[assignment]
        if not rest:
            data = await stream.read_bytes(READ_CHUNK, partial=True)
            internals._wire_bytes_in += len(data)
            if len(data) >= n:
                return data
            rest = data
        acc = bytearray(rest)  # grows in place: a peer sending byte by byte costs O(n)
        while len(acc) < n:
            missing = n - len(acc)
            if missing >= READ_CHUNK:
                chunk = await stream.read_bytes(missing)
            else:
                chunk = await stream.read_bytes(READ_CHUNK, partial=True)
            internals._wire_bytes_in += len(chunk)
            acc += chunk
        return bytes(acc)

    async def _read_async(self, buf: bytes, pos: int, pending: Future[None] | None) -> None:
        """Read and dispatch frames until the reader parks, the peer's close, or a failure.

        Starts with ``buf[pos:]`` (bytes already taken from the stream) after
        awaiting ``pending`` (a handler callback's awaitable), as Tornado's reader
        awaits it before the next frame.
        """
        internals: ReaderInternals = self  # type: ignore[assignment]
        stream = self.stream
        work = 0
        while True:
            if pending is not None:
                await pending
                pending = None
            if work >= _YIELD_THRESHOLD:
                # Tornado 6.6's fairness rule, on every version: a peer whose frames
                # are always buffered does not keep the loop to itself.
                work = 0
                await asyncio.sleep(0)
            if self.client_terminated:
                return
            if pos == len(buf):
                if self._strict_can_park and not unread_bytes(stream):
                    self._strict_parked = True
                    listen_for_reads(stream)  # the read events now reach received()
                    return
                buf = await stream.read_bytes(READ_CHUNK, partial=True)
                internals._wire_bytes_in += len(buf)
                pos = 0
            start = pos
            status, pos, extra = self._parse(buf, pos)
            work += _FRAME_YIELD_COST + pos - start
            if status == _END:
                return
            if status == _WAIT:
                pending = extra
            elif status == _NEED:
                buf = await self._fill(buf[pos:], extra)
                pos = 0

    def _parse(self, buf: bytes, pos: int) -> tuple[int, int, Any]:
        """Check and dispatch the complete frames of ``buf`` from ``pos`` (no I/O).

        Returns ``(status, pos, extra)``: :data:`_IDLE` when every byte was used;
        :data:`_NEED` with ``buf[pos:]`` the start of a frame that needs ``extra``
        bytes in all; :data:`_WAIT` with ``extra`` the awaitable a handler
        callback returned (wait for it before the next frame, at ``pos``);
        :data:`_END` after the peer's close frame or a failure (the connection
        is closing).
        """
        internals: ReaderInternals = self  # type: ignore[assignment]
        checker = self._strict_checker
        assert checker is not None
        deflate = checker.deflate
        size = len(buf)
        while True:
            if self.client_terminated:
                return _END, pos, None
            if size - pos < 2:
                return (_IDLE, pos, None) if pos == size else (_NEED, pos, 2)
            first = buf[pos]
            second = buf[pos + 1]
            if not self._strict_checked:
                # At first sight of the header: its two bytes decide (before the rest).
                failure = checker.check(first, second)
                if failure is not None:
                    self._fail(failure)
                    return _END, pos, None
                self._strict_checked = True
            length = second & 0x7F
            head = 2 if length < 126 else 4 if length == 126 else 10
            if second & 0x80:
                head += 4
            if size - pos < head:
                return _NEED, pos, head
            if length == 126:
                length = _U16.unpack_from(buf, pos + 2)[0]
            elif length == 127:
                length = _U64.unpack_from(buf, pos + 2)[0]
            fragments = self._strict_fragments
            if length + (0 if fragments is None else len(fragments)) > self.params.max_message_size:
                self.close(1009, "message too big")  # Tornado's answer, kept
                self._abort()
                return _END, pos, None
            start = pos + head
            stop = start + length
            if stop > size:
                return _NEED, pos, head + length
            self._strict_checked = False
            payload = buf[start:stop]
            if second & 0x80 and length:
                payload = _unmask(buf[start - 4 : start], payload)
            pos = stop
            opcode = first & 0x0F
            final = first & 0x80
            if opcode & 0x8:  # control: between the frames of a message, never compressed
                if deflate:
                    internals._frame_compressed = False
            elif opcode == _OP_CONT:
                assert fragments is not None  # the checker refused an orphan continuation
                fragments += payload
                if not final:
                    continue
                opcode = self._strict_fragment_opcode
                payload = bytes(fragments)
                self._strict_fragments = None
                if deflate:
                    internals._frame_compressed = self._strict_compressed
            else:
                if deflate:
                    self._strict_compressed = internals._frame_compressed = bool(first & 0x40)
                if not final:
                    self._strict_fragment_opcode = opcode
                    self._strict_fragments = bytearray(payload)
                    continue
            handled = self._handle_message(opcode, payload)
            if handled is not None:
                return _WAIT, pos, handled

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if opcode == _OP_CLOSE and not self.client_terminated:
            failure = close_payload_failure(data)
            if failure is not None:
                self.client_terminated = True
                if len(data) >= 2:
                    self.close_code = struct.unpack("!H", data[:2])[0]
                self._fail(failure)
                return None
            quiet = self._strict_quiet
            self._strict_quiet = True  # Tornado echoes the code: no failure
            try:
                return super()._handle_message(opcode, data)
            finally:
                self._strict_quiet = quiet
        if opcode in (_OP_TEXT, _OP_BINARY):
            # Tornado aborts when the text does not decode.
            self._strict_failure = _TEXT_NOT_UTF8 if opcode == _OP_TEXT else _OTHER
            try:
                return super()._handle_message(opcode, data)
            except zlib.error:
                # Only the decompressor raises it here (Tornado catches what handler
                # callbacks raise); Tornado would let it escape its read loop.
                self._fail(_BAD_DEFLATE)
                return None
            finally:
                self._strict_failure = _OTHER
        return super()._handle_message(opcode, data)

    def _run_callback(
        self, callback: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Future[Any] | None:
        # A handler that raises is aborted by Tornado: not a protocol failure.
        quiet = self._strict_quiet
        self._strict_quiet = True
        try:
            return super()._run_callback(callback, *args, **kwargs)
        finally:
            self._strict_quiet = quiet

    # -- failing -------------------------------------------------------------

    def _reading_now(self) -> bool:
        """True in _receive_frame's own synchronous code (not a handler callback)."""
        if self._strict_quiet:
            return False
        if self._strict_syncing:
            return True
        reader = self._strict_reader
        if reader is None:
            return False
        try:
            return asyncio.current_task() is reader
        except RuntimeError:  # no running loop
            return False

    def _fail(self, failure: Failure) -> None:
        self._strict_failure = failure
        self._abort()

    def _abort(self) -> None:
        if not self.server_terminated and self._reading_now():
            stream = self.stream
            if stream is not None and not stream.closed():
                failure = self._strict_failure
                self.close(failure.code, failure.reason)
        super()._abort()
        if self._strict_parked:
            self._end()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Tornado's ``close``; a close sent because of a protocol failure is reported."""
        if code is not None and not self.server_terminated and self._reading_now():
            stream = self.stream
            if stream is not None and not stream.closed() and self.on_error is not None:
                self.on_error(code, reason or "")
        super().close(code, reason)


def make_strict(
    protocol: WebSocketProtocol | None,
    handler: WebSocketHandler,
    on_error: ErrorCallback | None = None,
) -> StrictWebSocketProtocol | None:
    """The strict version of the ``protocol`` Tornado's ``get_websocket_protocol`` returned.

    ``None`` (an unsupported ``Sec-WebSocket-Version``) stays ``None``; a
    :class:`StrictWebSocketProtocol` is returned as is (with ``on_error`` set
    when given). Raises :class:`~tornado_longconn.exceptions.LongConnError` for
    any other class than Tornado's ``WebSocketProtocol13``: another subclass
    cannot be made strict without losing what it changes.
    """
    if protocol is None:
        return None
    if isinstance(protocol, StrictWebSocketProtocol):
        if on_error is not None:
            protocol.on_error = on_error
        return protocol
    if type(protocol) is not WebSocketProtocol13:
        raise LongConnError(
            f"{type(handler).__name__}.get_websocket_protocol returned a "
            f"{type(protocol).__module__}.{type(protocol).__qualname__}; the strict reader "
            "replaces only tornado.websocket.WebSocketProtocol13"
        )
    return StrictWebSocketProtocol(
        handler, protocol.mask_outgoing, protocol.params, on_error=on_error
    )
