"""tornado-longconn: production-grade long-lived connections for Tornado.

Mixins and helpers that Tornado applications compose into their own handlers:
heartbeats with dead-peer detection, broadcast groups with encode-once fan-out,
per-connection backpressure, resumable uploads, and long-poll / SSE fallbacks
that resume from a cursor. See https://tornado-longconn.readthedocs.io.
"""

from __future__ import annotations

from .backends import Backend, MemoryBackend
from .exceptions import (
    BackendError,
    BackendUnavailableError,
    ConnectionClosedError,
    CursorError,
    LongConnError,
    PeerGoneError,
    SlowConsumerError,
    UploadError,
)
from .log import Cursor, HistoryLimit, Message, SinceResult, parse_cursor

__version__ = "0.1.0.dev0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "ConnectionClosedError",
    "Cursor",
    "CursorError",
    "HistoryLimit",
    "LongConnError",
    "MemoryBackend",
    "Message",
    "PeerGoneError",
    "SinceResult",
    "SlowConsumerError",
    "UploadError",
    "__version__",
    "parse_cursor",
]
