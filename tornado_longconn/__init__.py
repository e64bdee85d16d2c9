"""tornado-longconn: production-grade long-lived connections for Tornado.

Mixins and helpers that Tornado applications compose into their own handlers:

* :class:`HeartbeatMixin` -- keepalive, dead-peer detection and round-trip latency
  for ``WebSocketHandler``.
* :class:`StrictWebSocketMixin` -- RFC 6455 strictness: a connection breaking the
  protocol gets a close frame (1002, 1007, 1009), counted in :class:`ProtocolErrorCounters`.
* :class:`BroadcastHub` / :class:`BroadcastGroup` -- rooms of connections with
  encode-once, corked fan-out that slow and vanished clients cannot hurt.
* :class:`BackpressureWriter` -- flow control for one outgoing connection.
* :class:`ChunkedUploadSink`, :class:`TusUploadHandler`,
  :class:`WebSocketUploadHandler` -- resumable, checksummed uploads off the loop.
* :class:`LongPollWaiter`, :class:`LongPollHandler`, :class:`SSEHandler` -- HTTP
  fallbacks that resume from a cursor and never lose a message silently.
* :class:`SubscriptionMixin` -- client-driven subscriptions: many topics on one
  WebSocket, each with its own cursor, behind authorization hooks; the same topic
  sets over one SSE stream or long-poll (:class:`SubscriptionSSEHandler`,
  :class:`SubscriptionPollHandler`).
* :func:`start_server` / :class:`LongConnHTTPServer` -- an ``HTTPServer`` with
  production limits (:class:`ServerLimits`) that survives descriptor exhaustion.
* :class:`RateLimits`, :class:`TokenBucket` -- per-connection and per-user rate
  limits of the subscriptions protocol (:mod:`tornado_longconn.ratelimit`);
  :class:`ReadinessHandler` and ``tornado_longconn.drain.drain`` -- leave service
  without an error answer.
* Backends: :class:`MemoryBackend` (default) and ``RedisBackend``
  (``tornado_longconn.backends``, extra ``[redis]``), chosen with
  :func:`backend_from_url`.

Every part reports its counters the same way: ``stats()`` returns a frozen
snapshot dataclass; :func:`sum_stats` adds snapshots up and :func:`stats_dict`
makes one JSON-ready (:mod:`tornado_longconn.stats`).

Test helpers for your own applications live in :mod:`tornado_longconn.testing`.
"""

from __future__ import annotations

from .backends import Backend, BackendStats, MemoryBackend, Subscriber, backend_from_url
from .backpressure import BackpressureWriter, OverflowPolicy, SendResult, WriterStats
from .broadcast import BroadcastGroup, BroadcastHub, BroadcastStats, GapPolicy, PublishResult
from .codes import CloseCode
from .connections import ConnectionStats, connection_stats
from .drain import ReadinessHandler
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
from .gc_tuning import GCTuningStats, gc_tuning_stats, tune_gc, untune_gc
from .heartbeat import HeartbeatCounters, HeartbeatMixin, HeartbeatStats, heartbeat_stats
from .histogram import HistogramStats
from .log import Cursor, HistoryLimit, Message, SinceResult, parse_cursor
from .longpoll import LongPollHandler, LongPollMixin, LongPollStats, LongPollWaiter, PollResult
from .presence import (
    Member,
    MemberPage,
    MemoryPresence,
    PresenceEvent,
    PresenceStats,
    PresenceStore,
    presence_for,
)
from .presence_users import UserRegistry
from .ratelimit import RateLimits, TokenBucket
from .server import AcceptStats, LongConnHTTPServer, ServerLimits, start_server
from .sse import SSEHandler, SSEMixin
from .staticfiles import static_path, static_url_spec
from .stats import StatKind, counters_only, stats_dict, sum_stats
from .streaming import EarlyAnswer, EarlyAnswerMixin, EarlyAnswerStats
from .strict import (
    ProtocolErrorCounters,
    ProtocolErrorStats,
    StrictWebSocketMixin,
    protocol_error_stats,
)
from .subscriptions import (
    SubscriptionCounters,
    SubscriptionError,
    SubscriptionHooks,
    SubscriptionMixin,
    SubscriptionStats,
    subscription_group,
    subscription_stats,
)
from .subscriptions_http import (
    SubscriptionHTTPMixin,
    SubscriptionPollHandler,
    SubscriptionPublishHandler,
    SubscriptionSSEHandler,
)
from .upload import ChunkedUploadSink, UploadStats, UploadStore
from .upload_tus import TusUploadHandler
from .upload_ws import WebSocketUploadHandler, WebSocketUploadMixin

__version__ = "0.1.0.dev0"

__all__ = [
    "AcceptStats",
    "Backend",
    "BackendError",
    "BackendStats",
    "BackendUnavailableError",
    "BackpressureWriter",
    "BroadcastGroup",
    "BroadcastHub",
    "BroadcastStats",
    "ChunkedUploadSink",
    "CloseCode",
    "ConnectionClosedError",
    "ConnectionStats",
    "Cursor",
    "CursorError",
    "EarlyAnswer",
    "EarlyAnswerMixin",
    "EarlyAnswerStats",
    "GCTuningStats",
    "GapPolicy",
    "HeartbeatCounters",
    "HeartbeatMixin",
    "HeartbeatStats",
    "HistogramStats",
    "HistoryLimit",
    "LongConnError",
    "LongConnHTTPServer",
    "LongPollHandler",
    "LongPollMixin",
    "LongPollStats",
    "LongPollWaiter",
    "Member",
    "MemberPage",
    "MemoryBackend",
    "MemoryPresence",
    "Message",
    "OverflowPolicy",
    "PeerGoneError",
    "PollResult",
    "PresenceEvent",
    "PresenceStats",
    "PresenceStore",
    "ProtocolErrorCounters",
    "ProtocolErrorStats",
    "PublishResult",
    "RateLimits",
    "ReadinessHandler",
    "SSEHandler",
    "SSEMixin",
    "SendResult",
    "ServerLimits",
    "SinceResult",
    "SlowConsumerError",
    "StatKind",
    "StrictWebSocketMixin",
    "Subscriber",
    "SubscriptionCounters",
    "SubscriptionError",
    "SubscriptionHTTPMixin",
    "SubscriptionHooks",
    "SubscriptionMixin",
    "SubscriptionPollHandler",
    "SubscriptionPublishHandler",
    "SubscriptionSSEHandler",
    "SubscriptionStats",
    "TokenBucket",
    "TusUploadHandler",
    "UploadError",
    "UploadStats",
    "UploadStore",
    "UserRegistry",
    "WebSocketUploadHandler",
    "WebSocketUploadMixin",
    "WriterStats",
    "__version__",
    "backend_from_url",
    "connection_stats",
    "counters_only",
    "gc_tuning_stats",
    "heartbeat_stats",
    "parse_cursor",
    "presence_for",
    "protocol_error_stats",
    "start_server",
    "static_path",
    "static_url_spec",
    "stats_dict",
    "subscription_group",
    "subscription_stats",
    "sum_stats",
    "tune_gc",
    "untune_gc",
]
