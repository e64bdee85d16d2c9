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

Private names used (each checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``WebSocketProtocol13._receive_frame()`` -- reads one frame; its FIRST
  ``_read_bytes`` call reads the 2-byte header (verified at each call: any other
  size raises :class:`~tornado_longconn.exceptions.LongConnError`).
* ``WebSocketProtocol13._read_bytes(n)`` -- one read from the stream; the
  header read does what it does (``stream.read_bytes(n)``, then adds ``n`` to
  ``WebSocketProtocol13._wire_bytes_in``) without its coroutine.
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
from collections.abc import Callable, Coroutine
from typing import Any, Final, NamedTuple, Protocol, cast

import tornado
from tornado.concurrent import Future
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from ..exceptions import LongConnError
from ._check import register, require_attrs, require_init_attrs
from .iostream import keep_reading

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

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (first call reads the 2-byte header)
    async def _receive_frame(self) -> None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    async def _read_bytes(self, n: int) -> bytes: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (on WebSocketProtocol)
    def _run_callback(
        self, callback: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Future[Any] | None: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (on WebSocketProtocol)
    def _abort(self) -> None: ...


_METHODS: Final = ("_receive_frame", "_read_bytes", "_handle_message", "_run_callback", "_abort")
# "params" holds a private _WebSocketParams; the others are public attribute names.
_INSTANCE_NAMES: Final = (
    "_decompressor",
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
    require_attrs(WebSocketProtocol13, (*_METHODS, "close"))
    require_init_attrs(WebSocketProtocol13, _INSTANCE_NAMES)


register(check_websocket)


def _header_size_changed(n: int) -> LongConnError:
    return LongConnError(
        f"tornado.websocket.WebSocketProtocol13._receive_frame first read {n} bytes, not the "
        f"2-byte frame header, in Tornado {tornado.version}: the strict WebSocket reader "
        "cannot check frames on this version"
    )


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
        "_strict_checker",
        "_strict_failure",
        "_strict_header_next",
        "_strict_quiet",
        "_strict_reader",
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
        self._strict_checker: FrameChecker | None = None
        self._strict_header_next = False
        # The task running _receive_frame, while it runs: a close or abort made
        # synchronously from it (outside handler callbacks) is a protocol failure.
        self._strict_reader: asyncio.Task[Any] | None = None
        self._strict_quiet = False
        self._strict_failure: Failure = _OTHER

    # -- reading -------------------------------------------------------------

    async def _receive_frame(self) -> None:
        self._strict_header_next = True
        self._strict_reader = asyncio.current_task()
        try:
            await super()._receive_frame()
        finally:
            self._strict_reader = None
            self._strict_failure = _OTHER

    def _read_bytes(self, n: int) -> Coroutine[Any, Any, bytes]:
        if self._strict_header_next:
            self._strict_header_next = False
            return self._read_header(n)
        return super()._read_bytes(n)

    async def _read_header(self, n: int) -> bytes:
        if n != 2:
            raise _header_size_changed(n)
        # Tornado's _read_bytes, inlined: one coroutine less per frame, and the frame
        # loop's idle wait (one per connection) holds one object less.
        data = await self.stream.read_bytes(n)
        cast(Any, self)._wire_bytes_in += n
        checker = self._strict_checker
        if checker is None:
            # The first frame: from now on the stream keeps listening for reads while
            # the rest of a small frame waits in its buffer (see iostream.keep_reading).
            keep_reading(self.stream)
            checker = self._strict_checker = FrameChecker(
                expect_masked=not self.mask_outgoing,
                deflate=cast(ReaderInternals, self)._decompressor is not None,
            )
        failure = checker.check(data[0], data[1])
        if failure is not None:
            self._fail(failure)
            # Ends Tornado's read loop the way a closed stream does (it aborts,
            # then calls the handler's on_close).
            raise StreamClosedError()
        return data

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
        reader = self._strict_reader
        if reader is None or self._strict_quiet:
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
