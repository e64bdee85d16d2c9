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

The private names of Tornado's ``WebSocketProtocol13`` and ``IOStream`` are read
through the door (:mod:`tornado_longconn._tornado.websocket_proto` and
:mod:`tornado_longconn._tornado.iostream`); the stream helpers here are
re-exported from it under their historical names.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Final

from ._tornado import iostream, websocket_proto

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
    "read_progress",
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


def frame_for_connection(ws_connection: object, encoded: Encoded) -> bytes:
    """The frame bytes to send ``encoded`` on one Tornado WebSocket connection.

    ``ws_connection`` is ``handler.ws_connection`` (``WebSocketProtocol13``).
    Without permessage-deflate this is the shared cached frame. With it and no
    server context takeover, a compressed frame shared by all connections with
    the same parameters. With context takeover the connection's own compressor
    is used: call this exactly when the frame is committed to the stream, in
    wire order, and never drop the result afterwards.
    """
    pmd = websocket_proto.deflate_of(ws_connection)
    if pmd is None:
        return encoded.frame
    params = websocket_proto.shared_deflate_params(pmd)
    if params is not None:  # no context takeover: one compression for everyone
        return encoded.deflated_frame(*params)
    return build_frame(encoded.opcode, pmd.compress(encoded.payload), rsv1=True)


def uses_deflate(ws_connection: object) -> bool:
    """True if this Tornado WebSocket connection negotiated permessage-deflate."""
    return websocket_proto.uses_deflate(ws_connection)


#: Bytes accepted by ``stream.write`` but not yet handed to the kernel (0 once closed).
stream_pending_bytes = iostream.pending_bytes

#: ``(total, done)``: bytes ever accepted by ``stream.write`` and bytes handed to
#: the kernel. A future returned by ``stream.write`` resolves once ``done``
#: reaches the value ``total`` had right after that call.
stream_write_indexes = iostream.write_indexes

#: Close a stream at once, discarding unsent data (TCP reset, ``SO_LINGER`` 0).
#: Used when a peer stopped reading. Does nothing on a closed stream.
abort_stream = iostream.abort

#: The socket of a plain TCP ``IOStream``, for direct sends; None for TLS or a
#: closed stream. Send on it only while ``not stream.writing()``.
plain_socket = iostream.plain_socket

#: Send as much of ``data`` as the socket takes now, without blocking; 0 (nothing
#: sent) for TLS, closed or busy streams: the caller ``stream.write``\ s the rest.
try_send = iostream.try_send

#: Bytes ever read from the peer on a WebSocket connection (``(ws, stream)``).
read_progress = websocket_proto.read_progress
