"""The in-memory backend: one process, the default.

Subscribers are called synchronously inside :meth:`MemoryBackend.publish`, in
publish order. History lives in a bounded :class:`~tornado_longconn.log.TopicLog`
per topic; all topics of one backend share one epoch, made fresh when the
backend is created, so cursors handed out before a process restart are answered
with a gap afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..histogram import HistogramStats, LatencyHistogram
from ..log import Cursor, HistoryLimit, Message, SinceResult, TopicLog, new_epoch
from ..logfields import log_fields
from .base import BackendStats, Subscriber

__all__ = ["MemoryBackend"]

log = logging.getLogger("tornado_longconn.backends")


class MemoryBackend:
    """Fan-out and history inside one process.

    ``clock`` (default :func:`time.time`) stamps messages and ages history; tests
    pass a fake one. ``epoch`` defaults to a fresh random string.
    """

    def __init__(self, *, epoch: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.epoch = epoch or new_epoch()
        self._clock = clock
        self._subscribers: dict[str, dict[Subscriber, None]] = {}
        self._logs: dict[str, TopicLog] = {}
        self._subscriber_errors = 0
        self._publish_latency = LatencyHistogram()
        self.closed = False

    def __repr__(self) -> str:
        return f"<MemoryBackend epoch={self.epoch} topics={len(self._subscribers)}>"

    async def start(self) -> None:
        """Nothing to connect; present for the interface."""

    async def close(self) -> None:
        """Drop all subscriptions. History is kept until the object is freed."""
        self._subscribers.clear()
        self.closed = True

    async def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Deliver ``topic``'s messages to ``subscriber`` from now on (idempotent)."""
        self._subscribers.setdefault(topic, {})[subscriber] = None

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Stop delivering ``topic`` to ``subscriber`` (no error if it was not subscribed)."""
        subs = self._subscribers.get(topic)
        if subs is not None:
            subs.pop(subscriber, None)
            if not subs:
                del self._subscribers[topic]

    def subscriber_count(self, topic: str) -> int:
        """How many subscribers ``topic`` has in this process."""
        return len(self._subscribers.get(topic, ()))

    def stats(self) -> BackendStats:
        """A snapshot (:class:`~tornado_longconn.backends.BackendStats`, ``kind="memory"``).

        Messages are not counted (``published`` and ``received`` are ``None``:
        nothing is added per subscriber); :class:`~tornado_longconn.BroadcastStats`
        counts the publishes of groups, :meth:`publish_latency` times each publish.
        """
        return BackendStats(
            kind="memory",
            connected=not self.closed,
            topics=len(self._subscribers),
            subscribers=sum(len(subs) for subs in self._subscribers.values()),
            history_topics=len(self._logs),
            published=None,
            received=None,
            gaps=0,  # never: every message is delivered in the publishing call
            reconnects=None,
            subscriber_errors=self._subscriber_errors,
            decode_errors=None,
        )

    def publish_latency(self) -> HistogramStats:
        """Seconds each publish took, in fixed buckets (:class:`~tornado_longconn.histogram.HistogramStats`).

        In memory a publish returns once every local subscriber has been handed
        the message, so this is the time of the local hand-off (two clock reads
        per publish; nothing per subscriber).
        """
        return self._publish_latency.stats()

    async def publish(
        self,
        topic: str,
        data: str | bytes,
        *,
        history: HistoryLimit | None = None,
        tag: str | None = None,
    ) -> Message:
        """Deliver to every subscriber now; with ``history`` record it first."""
        return self.publish_nowait(topic, data, history=history, tag=tag)

    def publish_nowait(
        self,
        topic: str,
        data: str | bytes,
        *,
        history: HistoryLimit | None = None,
        tag: str | None = None,
    ) -> Message:
        """Synchronous :meth:`publish` (the in-memory backend never waits)."""
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"backend data must be str or bytes, not {type(data).__name__}")
        start = time.perf_counter()
        now = self._clock()
        if history is not None:
            topic_log = self._logs.get(topic)
            if topic_log is None:
                topic_log = self._logs[topic] = TopicLog(topic, history, epoch=self.epoch)
            message = topic_log.append(data, now=now, tag=tag, limit=history)
        else:
            message = Message(topic, data, None, tag, now)
        subs = self._subscribers.get(topic)
        if subs:
            for subscriber in list(subs):
                try:
                    subscriber.on_message(message)
                except Exception:
                    self._subscriber_errors += 1
                    log.exception(
                        "subscriber %r failed on a message of %r",
                        subscriber,
                        topic,
                        extra=log_fields(topic=topic),
                    )
        self._publish_latency.observe(time.perf_counter() - start)
        return message

    async def since(
        self, topic: str, cursor: Cursor | None, *, limit: int | None = None
    ) -> SinceResult:
        """Kept messages after ``cursor``, or a gap answer (see :class:`SinceResult`)."""
        return self.since_nowait(topic, cursor, limit=limit)

    def since_nowait(
        self, topic: str, cursor: Cursor | None, *, limit: int | None = None
    ) -> SinceResult:
        """Synchronous :meth:`since`."""
        topic_log = self._logs.get(topic)
        if topic_log is None:
            topic_log = TopicLog(topic, epoch=self.epoch)
            head = topic_log.head
            if cursor is None or cursor == head:
                return SinceResult((), head)
            return SinceResult(
                (), head, gap=True, reason="epoch" if cursor.epoch != self.epoch else "future"
            )
        return topic_log.since(cursor, now=self._clock(), limit=limit)

    async def head(self, topic: str) -> Cursor:
        """The newest message's cursor (offset 0 when the topic has none)."""
        topic_log = self._logs.get(topic)
        return topic_log.head if topic_log is not None else Cursor(self.epoch, 0)
