"""The backend interface: where fan-out and history live.

A backend carries messages between every process that serves a topic and keeps
the topic's history. :class:`BroadcastGroup`, the long-poll waiter and the SSE
handler talk only to this interface, so the in-memory backend (one process,
the default) and the Redis backend (many processes and hosts) are
interchangeable. ``tests/backends/`` runs one contract suite against every
backend.

Contract:

* ``subscribe(topic, subscriber)`` -- from when the returned awaitable resolves,
  ``subscriber.on_message(message)`` is called on the event loop for every
  message published to ``topic`` by any process, in one global order per topic
  (the same order in every process). Subscribing twice with the same subscriber
  is a no-op; ``unsubscribe`` stops delivery to that subscriber.
* ``publish(topic, data, history=..., tag=...)`` -- delivers ``data`` to every
  subscriber of ``topic`` in every process. With ``history`` it is appended to the
  topic's history and gets the next :class:`~tornado_longconn.log.Cursor`; the
  returned :class:`~tornado_longconn.log.Message` carries it. Raises
  :class:`~tornado_longconn.exceptions.BackendUnavailableError` when the message
  cannot be published.
* ``since(topic, cursor)`` -- the kept messages after ``cursor``, or a gap answer
  (see :class:`~tornado_longconn.log.SinceResult`). A topic never published to
  answers an empty result at offset 0 of its epoch (the epoch its first message
  will have, so the cursor stays valid).
* History never runs ahead of live delivery in the calling process: when
  ``topic`` has subscribers in this process, every message ``since`` returns has
  already been delivered to them. So code that replays history and then goes
  live (drop live messages at or before the last replayed cursor) sees neither a
  gap nor a duplicate at the seam. (In memory this holds because ``publish``
  records and delivers at once; Redis waits for its pub/sub stream to catch up.)
* When a backend cannot guarantee that a subscriber saw every message (e.g. the
  connection to Redis dropped and came back), it calls
  ``subscriber.on_gap(topic, reason)`` once; the subscriber must resync from
  history (``since``) or tell its clients to.
* A subscriber's callbacks must not raise and must not block; a backend logs and
  swallows an exception from one subscriber so the others still get the message.
* ``stats()`` -- a :class:`BackendStats` snapshot, built when called; a backend
  adds no work per message to count (fields it does not count are ``None``).
  The library's backends also time each publish (``publish_latency()``, a
  :class:`~tornado_longconn.histogram.HistogramStats`: one bucket increment per
  publish, never per subscriber); it is optional for other backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..log import Cursor, HistoryLimit, Message, SinceResult
from ..stats import COUNTER, FLAG, GAUGE, LABEL

__all__ = ["Backend", "BackendStats", "Subscriber"]


@dataclass(frozen=True, slots=True)
class BackendStats:
    """A snapshot of a backend's counters (see :meth:`Backend.stats`).

    ``None`` means "not counted by this backend": the in-memory backend adds no
    work per message, so it leaves ``published``, ``received`` and
    ``reconnects`` / ``decode_errors`` (which cannot happen) at ``None``, and the
    Redis backend does not know its topics' history (``history_topics``).
    Snapshots of one kind add up with :func:`~tornado_longconn.stats.sum_stats`
    (several processes' Redis backends); ``kind`` must be equal.
    """

    #: The backend: ``"memory"``, ``"redis"`` (single server, Sentinel and Cluster)
    #: or ``"nats"`` (label).
    kind: str = field(metadata=LABEL)
    #: Whether the backend can deliver now: open, and for Redis its pub/sub
    #: connection up (flag).
    connected: bool = field(metadata=FLAG)
    #: Topics with subscribers in this process (gauge).
    topics: int = field(metadata=GAUGE)
    #: Subscriptions in this process, over all topics (gauge).
    subscribers: int = field(metadata=GAUGE)
    #: Topics with history kept in this process (gauge; None: kept elsewhere).
    history_topics: int | None = field(metadata=GAUGE)
    #: Messages published by this process (counter; None: not counted).
    published: int | None = field(metadata=COUNTER)
    #: Messages received for local subscribers (counter; None: not counted).
    received: int | None = field(metadata=COUNTER)
    #: ``on_gap`` calls made to subscribers (counter).
    gaps: int = field(metadata=COUNTER)
    #: Times the connection to the server was made again (counter; None: no server).
    reconnects: int | None = field(metadata=COUNTER)
    #: Exceptions raised by subscriber callbacks, logged and swallowed (counter).
    subscriber_errors: int = field(metadata=COUNTER)
    #: Messages dropped because they could not be decoded (counter; None: never decoded).
    decode_errors: int | None = field(metadata=COUNTER)


class Subscriber(Protocol):
    """Receives the messages of the topics it subscribed to."""

    def on_message(self, message: Message) -> None:
        """Called on the event loop for each message, in order. Must not raise or block."""

    def on_gap(self, topic: str, reason: str) -> None:
        """Messages of ``topic`` may have been missed (``reason`` says why); resync."""


@runtime_checkable
class Backend(Protocol):
    """What every backend implements (see the module docstring for the contract)."""

    async def start(self) -> None:
        """Connect / start background tasks. Idempotent."""

    async def close(self) -> None:
        """Stop background tasks and release connections. Idempotent."""

    async def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Start delivering ``topic``'s messages to ``subscriber``."""

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Stop delivering ``topic``'s messages to ``subscriber``."""

    async def publish(
        self,
        topic: str,
        data: str | bytes,
        *,
        history: HistoryLimit | None = None,
        tag: str | None = None,
    ) -> Message:
        """Publish ``data`` (text ``str`` or binary ``bytes``) to ``topic`` everywhere."""

    async def since(
        self, topic: str, cursor: Cursor | None, *, limit: int | None = None
    ) -> SinceResult:
        """Kept messages of ``topic`` after ``cursor`` (at most ``limit``), or a gap answer."""

    async def head(self, topic: str) -> Cursor:
        """The cursor of ``topic``'s newest message (offset 0 when it has none)."""

    def stats(self) -> BackendStats:
        """A snapshot of the backend's counters, built now (:class:`BackendStats`)."""
