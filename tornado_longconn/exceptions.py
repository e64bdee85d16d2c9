"""Exceptions raised by tornado-longconn.

Every exception the library raises on purpose derives from :class:`LongConnError`.
Two families keep "you closed it" apart from "the peer is gone", in the spirit of
trio's ``ClosedResourceError`` and ``BrokenResourceError``:

* :class:`ConnectionClosedError` -- this side closed the connection (or the writer)
  and then tried to use it again. This is a bug in the caller.
* :class:`PeerGoneError` -- the other side went away (reset, EOF, timeout). This is
  normal for long-lived connections; the original error, when there is one, is
  kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "ConnectionClosedError",
    "CursorError",
    "LongConnError",
    "PeerGoneError",
    "SlowConsumerError",
    "UploadError",
]


class LongConnError(Exception):
    """Root of every exception raised on purpose by tornado-longconn."""


class ConnectionClosedError(LongConnError):
    """This side already closed the connection or writer, and it was used again."""


class PeerGoneError(LongConnError):
    """The peer went away: connection reset, closed by the client, or timed out.

    The underlying error (``StreamClosedError``, ``ConnectionResetError``, ...) is
    attached as ``__cause__`` when there is one.
    """


class SlowConsumerError(PeerGoneError):
    """The connection was closed because the peer did not read fast enough.

    Raised to a waiting sender when the ``CLOSE`` overflow policy closed the
    connection under it.
    """


class CursorError(LongConnError, ValueError):
    """A cursor string is malformed (not produced by this library)."""


class BackendError(LongConnError):
    """A backend (in-memory, Redis) failed to carry out an operation."""


class BackendUnavailableError(BackendError):
    """The backend's server cannot be reached right now (e.g. Redis is down)."""


class UploadError(LongConnError):
    """An upload was rejected or failed; ``status`` is the HTTP status to answer.

    ``retry_after`` (seconds, or None) is sent as ``Retry-After`` by the tus handler
    (503 when the shared upload state is unreachable, 429 at an upload quota).
    """

    def __init__(
        self, message: str, *, status: int = 400, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
