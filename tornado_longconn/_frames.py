"""WebSocket frame building and direct socket writes (internal).

A message is encoded ONCE into an :class:`Encoded` (opcode + payload) and its
server-to-client frame bytes are built once and cached, so a broadcast to 5,000
members costs one encode and one frame build. Connections that negotiated
permessage-deflate either share one compressed frame (when the server side has
no context takeover) or compress per connection, in wire order.

:func:`try_send` hands bytes straight to a plain (non-TLS) socket when Tornado's
``IOStream`` has nothing pending, skipping the Future and bookkeeping that
``IOStream.write`` creates per call; the caller passes any unsent remainder to
``IOStream.write`` so byte order is kept.

Everything here touches private attributes of Tornado's ``WebSocketProtocol13``
(``_compressor``) and ``IOStream`` (``socket``, ``_write_buffer``); they are
read in one place so that a Tornado upgrade breaks one module, which the test
suite covers.
"""

from __future__ import annotations

import json
import socket
import struct
import zlib
from typing import Any, Final

from tornado.iostream import IOStream, SSLIOStream

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Encoded",
    "abort_stream",
    "build_frame",
    "encode_message",
    "frame_for_connection",
    "plain_socket",
    "stream_pending_bytes",
    "stream_write_indexes",
    "try_send",
    "uses_deflate",
]

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_FIN: Final = 0x80
_RSV1: Final = 0x40

_pack_b = struct.Struct("!BB").pack
_pack_h = struct.Struct("!BBH").pack
_pack_q = struct.Struct("!BBQ").pack


def build_frame(opcode: int, payload: bytes, *, rsv1: bool = False) -> bytes:
    """Return one unmasked, final (FIN) WebSocket frame as sent by a server."""
    first = _FIN | opcode | (_RSV1 if rsv1 else 0)
    n = len(payload)
    if n < 126:
        header = _pack_b(first, n)
    elif n <= 0xFFFF:
        header = _pack_h(first, 126, n)
    else:
        header = _pack_q(first, 127, n)
    return header + payload


def _deflate_once(payload: bytes, wbits: int, level: int, mem_level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # RFC 7692: strip the 0x00 0x00 0xff 0xff tail


class Encoded:
    """A message encoded once: opcode, payload and (lazily) its frame bytes.

    Build one with :func:`encode_message`. ``frame`` is the uncompressed server
    frame; :meth:`deflated_frame` caches one compressed frame per set of
    compression parameters, for connections without context takeover.
    """

    __slots__ = ("_deflated", "_frame", "opcode", "payload")

    def __init__(self, opcode: int, payload: bytes) -> None:
        self.opcode = opcode
        self.payload = payload
        self._frame: bytes | None = None
        self._deflated: dict[tuple[int, int, int], bytes] | None = None

    def __repr__(self) -> str:
        kind = "text" if self.opcode == OP_TEXT else "binary"
        return f"<Encoded {kind} {len(self.payload)} bytes>"

    @property
    def is_text(self) -> bool:
        """True for a text message (``str``, ``dict``, ``list``)."""
        return self.opcode == OP_TEXT

    @property
    def frame(self) -> bytes:
        """The uncompressed server-to-client frame (built on first use)."""
        frame = self._frame
        if frame is None:
            frame = self._frame = build_frame(self.opcode, self.payload)
        return frame

    def deflated_frame(self, wbits: int, level: int, mem_level: int) -> bytes:
        """A permessage-deflate frame compressed with a fresh context (cached)."""
        cache = self._deflated
        if cache is None:
            cache = self._deflated = {}
        key = (wbits, level, mem_level)
        frame = cache.get(key)
        if frame is None:
            frame = cache[key] = build_frame(
                self.opcode, _deflate_once(self.payload, wbits, level, mem_level), rsv1=True
            )
        return frame


def encode_message(message: Any) -> Encoded:
    """Encode a message once: ``str`` → text, ``bytes`` → binary, ``dict``/``list`` → JSON text.

    An :class:`Encoded` passes through unchanged. Raises :class:`TypeError` for
    anything else (``None``, numbers, objects), so a bug is not sent as ``"None"``.
    """
    if isinstance(message, Encoded):
        return message
    if isinstance(message, str):
        return Encoded(OP_TEXT, message.encode("utf-8"))
    if isinstance(message, bytes):
        return Encoded(OP_BINARY, message)
    if isinstance(message, (bytearray, memoryview)):
        return Encoded(OP_BINARY, bytes(message))
    if isinstance(message, (dict, list)):
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        return Encoded(OP_TEXT, text.encode("utf-8"))
    raise TypeError(
        f"cannot send a {type(message).__name__}: messages must be str (text), "
        "bytes (binary), or dict/list (JSON text)"
    )


def frame_for_connection(ws_connection: Any, encoded: Encoded) -> bytes:
    """The frame bytes to send ``encoded`` on one Tornado WebSocket connection.

    ``ws_connection`` is ``handler.ws_connection`` (``WebSocketProtocol13``).
    Without permessage-deflate this is the shared cached frame. With it and no
    server context takeover, a compressed frame shared by all connections with
    the same parameters. With context takeover the connection's own compressor
    is used: call this exactly when the frame is committed to the stream, in
    wire order, and never drop the result afterwards.
    """
    pmd = getattr(ws_connection, "_compressor", None)
    if pmd is None:
        return encoded.frame
    if pmd._compressor is None:  # no context takeover: one compression for everyone
        return encoded.deflated_frame(pmd._max_wbits, pmd._compression_level, pmd._mem_level)
    return build_frame(encoded.opcode, pmd.compress(encoded.payload), rsv1=True)


def uses_deflate(ws_connection: Any) -> bool:
    """True if this Tornado WebSocket connection negotiated permessage-deflate."""
    return getattr(ws_connection, "_compressor", None) is not None


def stream_pending_bytes(stream: IOStream) -> int:
    """Bytes accepted by ``stream.write`` but not yet handed to the kernel (0 once closed)."""
    buffer = stream._write_buffer
    return 0 if buffer is None else len(buffer)


def stream_write_indexes(stream: IOStream) -> tuple[int, int]:
    """``(total, done)``: bytes ever accepted by ``stream.write`` and bytes handed to the kernel.

    A future returned by ``stream.write`` resolves once ``done`` reaches the value
    ``total`` had right after that call.
    """
    return stream._total_write_index, stream._total_write_done_index


def abort_stream(stream: IOStream) -> None:
    """Close ``stream`` at once, discarding unsent data (TCP reset, ``SO_LINGER`` 0).

    Used when a peer stopped reading: a plain close would leave the kernel
    retrying the unsent bytes; a reset frees them. Does nothing on a closed stream.
    """
    if stream.closed():
        return
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass
    stream.close()


def plain_socket(stream: IOStream) -> socket.socket | None:
    """The socket of a plain TCP ``IOStream``, for direct sends; None for TLS or a closed stream.

    The caller only sends on it while ``not stream.writing()`` and the stream is
    open, and passes any unsent remainder to ``stream.write``.
    """
    if isinstance(stream, SSLIOStream) or stream.closed():
        return None
    sock = stream.socket
    return sock if isinstance(sock, socket.socket) else None


def try_send(stream: IOStream, data: bytes) -> int:
    """Send as much of ``data`` as the socket takes now, without blocking.

    Only for plain TCP ``IOStream`` with nothing pending (``not stream.writing()``);
    for TLS streams, closed streams and busy streams it sends nothing and returns
    0, and the caller must ``stream.write`` the whole of ``data``. Returns how
    many bytes the kernel accepted. Connection errors propagate as ``OSError``;
    the caller closes the stream.
    """
    if stream.writing() or stream.closed() or isinstance(stream, SSLIOStream):
        return 0
    try:
        return stream.socket.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
