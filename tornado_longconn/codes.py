"""WebSocket close codes used by tornado-longconn (documented, stable).

Standard codes come from RFC 6455; the library's own codes use the private range
4000-4999. Upload errors mirror the HTTP status a tus server would answer: 4400
for 400, 4413 for 413, and so on.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CloseCode"]


class CloseCode(IntEnum):
    """Close codes the library sends, and what a client should do on each."""

    #: Normal closure.
    NORMAL = 1000
    #: The server is shutting down (graceful shutdown); reconnect with jittered backoff.
    GOING_AWAY = 1001
    #: The peer broke RFC 6455 (unmasked frame, bad opcode or close code, ...);
    #: a client bug: do not retry the same bytes.
    PROTOCOL_ERROR = 1002
    #: A text message or close reason was not valid UTF-8.
    INVALID_DATA = 1007
    #: The client broke a policy of the application protocol: the subscriptions
    #: protocol sends it after too many malformed frames
    #: (``SubscriptionMixin.max_protocol_errors``); fix the client before retrying.
    POLICY_VIOLATION = 1008
    #: A message was larger than the configured limit.
    MESSAGE_TOO_BIG = 1009
    #: Unexpected server error.
    INTERNAL_ERROR = 1011
    #: The client read too slowly and its buffer passed the limit (``CLOSE`` policy);
    #: reconnect and resume from the last cursor.
    SLOW_CONSUMER = 4000
    #: History no longer reaches back to the client's cursor (or the backend lost
    #: messages); reload state, then continue from the new cursor.
    RESYNC_REQUIRED = 4001
    #: An application-level heartbeat went unanswered past the timeout.
    HEARTBEAT_TIMEOUT = 4002
    #: Subscriptions: the connection has no identity and the handler requires one
    #: (``require_user``, or a hook raised ``SubscriptionError("unauthorized", close=True)``);
    #: log in, then reconnect.
    UNAUTHORIZED = 4401
    #: Subscriptions: the connection is refused as a whole (a hook raised
    #: ``SubscriptionError("forbidden", close=True)``); do not retry as is.
    FORBIDDEN = 4403
    #: The client sent faster than the server's rate limits allow, past the
    #: breaches tolerated (``RateLimits.max_breaches``), or opened more
    #: connections than its cap; do not reconnect at once: wait (with backoff)
    #: and send less.
    RATE_LIMITED = 4429
    #: Upload: malformed request or protocol message.
    UPLOAD_BAD_REQUEST = 4400
    #: Upload: unknown upload id.
    UPLOAD_NOT_FOUND = 4404
    #: Upload: offset mismatch or a concurrent writer on the same upload.
    UPLOAD_CONFLICT = 4409
    #: Upload: bigger than the declared or the maximum size.
    UPLOAD_TOO_LARGE = 4413
    #: Upload: checksum mismatch; the chunk was discarded, the offset is unchanged.
    UPLOAD_CHECKSUM_MISMATCH = 4460
    #: Upload: the server's storage is full; the durable offset is unchanged.
    UPLOAD_STORAGE_FULL = 4507
