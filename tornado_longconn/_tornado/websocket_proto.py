"""Tornado's ``WebSocketProtocol13`` and its deflate compressor: private names read (internal).

Private names used (each checked against Tornado 6.4.2, 6.5.2 and 6.6.1):

* ``WebSocketProtocol13._compressor`` -- the connection's
  ``_PerMessageDeflateCompressor``, or ``None`` without permessage-deflate.
* ``WebSocketProtocol13._wire_bytes_in`` -- bytes parsed as frames so far.
* ``_PerMessageDeflateCompressor._compressor`` -- its zlib context when the
  server keeps context takeover, ``None`` without (each message compressed alone).
* ``_PerMessageDeflateCompressor._max_wbits`` / ``_compression_level`` /
  ``_mem_level`` -- the negotiated zlib parameters.
* ``_PerMessageDeflateCompressor.compress(data)`` -- compress one message in
  wire order (RFC 7692 tail stripped).

Checked once when this module is imported (:func:`check_websocket_protocol`).
"""

from __future__ import annotations

from typing import Final, Protocol

import tornado.websocket
from tornado.iostream import IOStream

from . import iostream
from ._check import missing, register, require_attrs, require_init_attrs

__all__ = [
    "DeflateInternals",
    "ProtocolInternals",
    "check_websocket_protocol",
    "deflate_of",
    "read_progress",
    "shared_deflate_params",
    "uses_deflate",
    "wire_bytes_in",
]


class DeflateInternals(Protocol):
    """The private part of Tornado's ``_PerMessageDeflateCompressor`` that the library reads.

    Read-only (properties), so that Tornado's own annotations match.
    """

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1 (None: no server context takeover)
    @property
    def _compressor(self) -> object | None: ...
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    @property
    def _max_wbits(self) -> int: ...
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    @property
    def _compression_level(self) -> int: ...
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    @property
    def _mem_level(self) -> int: ...

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    def compress(self, data: bytes) -> bytes: ...


class ProtocolInternals(Protocol):
    """The private part of ``tornado.websocket.WebSocketProtocol13`` that the library reads."""

    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    @property
    def _compressor(self) -> DeflateInternals | None: ...
    # checked against Tornado 6.4.2, 6.5.2, 6.6.1
    @property
    def _wire_bytes_in(self) -> int: ...


_DEFLATE_NAMES: Final = ("_compressor", "_max_wbits", "_compression_level", "_mem_level")


def check_websocket_protocol() -> None:
    """Raise :class:`~tornado_longconn.exceptions.LongConnError` if a name above is gone.

    Run once at import of this module.
    """
    require_init_attrs(tornado.websocket.WebSocketProtocol13, ("_compressor", "_wire_bytes_in"))
    require_attrs(tornado.websocket.WebSocketProtocol13, ("close", "is_closing"))
    deflate = getattr(tornado.websocket, "_PerMessageDeflateCompressor", None)
    if not isinstance(deflate, type):
        raise missing("tornado.websocket", "_PerMessageDeflateCompressor")
    require_init_attrs(deflate, _DEFLATE_NAMES)
    require_attrs(deflate, ("compress",))


register(check_websocket_protocol)


# The functions below annotate the connection as ProtocolInternals by assignment
# instead of calling ``cast()``: heartbeats and deflate fan-outs call them per
# connection and tick or message.


def deflate_of(ws_connection: object) -> DeflateInternals | None:
    """The connection's permessage-deflate compressor, or None when not negotiated."""
    ws: ProtocolInternals = ws_connection  # type: ignore[assignment]
    return ws._compressor


def uses_deflate(ws_connection: object) -> bool:
    """True if this ``WebSocketProtocol13`` negotiated permessage-deflate."""
    ws: ProtocolInternals = ws_connection  # type: ignore[assignment]
    return ws._compressor is not None


def shared_deflate_params(pmd: DeflateInternals) -> tuple[int, int, int] | None:
    """``(wbits, level, mem_level)`` when every message is compressed alone, else None.

    None means the server keeps context takeover: each connection must compress
    with its own context (``pmd.compress``), in wire order.
    """
    if pmd._compressor is not None:
        return None
    return pmd._max_wbits, pmd._compression_level, pmd._mem_level


def wire_bytes_in(ws_connection: object) -> int:
    """Bytes this connection has parsed as frames so far."""
    ws: ProtocolInternals = ws_connection  # type: ignore[assignment]
    return ws._wire_bytes_in


def read_progress(ws_connection: object, stream: IOStream) -> int:
    """Bytes ever read from the peer on this connection; grows with every byte it sends.

    Bytes read from the socket and not yet parsed (``IOStream._read_buffer_size``)
    plus bytes parsed as frames (``_wire_bytes_in``). Heartbeats compare it
    between ticks to see inbound progress without per-message bookkeeping.
    """
    ws: ProtocolInternals = ws_connection  # type: ignore[assignment]
    return iostream.unread_bytes(stream) + ws._wire_bytes_in
