"""The NATS JetStream backend: many processes and hosts through a NATS server or cluster.

Install with ``pip install tornado-longconn[nats]`` (it needs ``nats-py`` and a
NATS server >= 2.9 with JetStream enabled: ``nats-server -js``). Like the Redis
backend, a message published in any process reaches the subscribers of every
process, and history (cursors) is shared, so a client may resume on another
process than the one it left.

How the NATS backend works
--------------------------

* **One stream per topic** (created on first use) holds the topic's history:
  stream ``<prefix>_<T>`` with the subject ``<prefix>.<T>.h``, where ``<T>`` is
  the topic with every byte outside ``[A-Za-z0-9-]`` written as ``_XX`` (hex).
  The stream keeps ``max_messages`` (``max_msgs``, discard old) and ``max_age``
  of the :class:`~tornado_longconn.log.HistoryLimit` the message was published
  with; ``max_bytes`` counts payload bytes and is applied when history is read.
* **Cursors are stream sequence numbers**: a history message's offset is the
  sequence JetStream gave it, so offsets of one topic run 1, 2, 3, ... in one
  order for every process. The topic's *epoch* lives in the stream's
  description and is made when the stream is created; a stream that was lost
  (a server without persistence restarted, the stream deleted) comes back with
  a new epoch, and old cursors get a gap answer (reason ``"epoch"``).
* **Publish with history** is one round trip: a JetStream publish, acknowledged
  with the sequence. **Live delivery** uses the stream's *republish*: once a
  message is stored, the server republishes it (with its sequence in the
  ``Nats-Sequence`` header) on ``<prefix>.<T>.r``, in stream order. Each
  process holds one plain NATS subscription per subscribed topic, so fan-out
  costs no consumer state on the server.
* **Publish without history** is a plain NATS publish on ``<prefix>.<T>.r``
  (no round trip). These messages are ordered among themselves per publishing
  process only; between processes, and relative to history messages, NATS
  gives no global order. Publish with history when the order matters.

NATS failures
-------------

* nats-py reconnects by itself and subscribes again. After a reconnect every
  local subscriber gets ``on_gap(topic, "reconnect")`` once the subscriptions
  are back, so a resync from history (:meth:`NatsBackend.since`) misses nothing.
* A live message whose sequence is not the previous one + 1 (a slow consumer
  whose messages nats-py dropped, a trimmed stream) gives ``on_gap(topic,
  "lost")``; a message of a new epoch gives ``on_gap(topic, "epoch")``.
* :meth:`NatsBackend.publish` is not retried after a lost acknowledgement (a
  retry could store the message twice); it raises
  :class:`~tornado_longconn.exceptions.BackendUnavailableError` when NATS is
  unreachable or does not answer within ``command_timeout``.
* A server killed without a clean shutdown may lose the last acknowledged
  messages of a file-backed stream (JetStream flushes to disk in the
  background) unless the stream is replicated (``replicas=3`` on a NATS
  cluster). Clients whose cursors then point past the head get a gap answer
  (reason ``"future"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from ..exceptions import BackendError, BackendUnavailableError, ConnectionClosedError
from ..histogram import HistogramStats, LatencyHistogram
from ..log import Cursor, HistoryLimit, Message, SinceResult, new_epoch
from ..logfields import log_fields
from ._tail import decode_tail, encode_tail
from .base import BackendStats, Subscriber

__all__ = ["DEFAULT_NATS_PREFIX", "NatsBackend", "topic_token"]

log = logging.getLogger("tornado_longconn.backends")

#: Subject and stream name prefix used when none is given.
DEFAULT_NATS_PREFIX = "longconn"

_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_DESCRIPTION_RE = re.compile(r"longconn epoch=(\w+) bytes=(\d+) age=([0-9.e+-]*)")
# A stream name must stay well under the server's limit (255 bytes) and a file name.
_MAX_TOKEN = 160
_NO_STREAM = 10059  # JetStream API error: stream not found
_STREAM_EXISTS = 10058  # JetStream API error: stream name already in use
_GET_BATCH = 256  # history reads ask for at most this many messages at once

_UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
    OSError,
)


def topic_token(topic: str) -> str:
    """The subject token and stream name part for ``topic``.

    Bytes of the UTF-8 topic outside ``[A-Za-z0-9-]`` are written ``_XX`` (two
    hex digits), so different topics always get different tokens. Raises
    :class:`ValueError` for an empty topic or one whose token would exceed 160
    characters.
    """
    if not topic:
        raise ValueError("a NATS topic must not be empty")
    token = "".join(chr(b) if b in _SAFE else f"_{b:02X}" for b in topic.encode("utf-8"))
    if len(token) > _MAX_TOKEN:
        raise ValueError(f"topic too long for a NATS stream name ({len(token)} > {_MAX_TOKEN})")
    return token


@dataclass
class _Stream:
    """What this process knows of a topic's stream."""

    epoch: str
    limit: tuple[int, int, float | None]  # max_messages, max_bytes (0: none), max_age


@dataclass
class _Topic:
    """Local state of one subscribed topic."""

    subject: str
    subscribers: dict[Subscriber, None] = field(default_factory=dict)
    sub: Subscription | None = None
    epoch: str | None = None  # of the last live message
    seen: int = 0  # sequence of the last live history message (0: none since (re)subscribe)
    floor: int = 0  # the stream's last sequence when the subscription was (re)made
    resync: bool = False  # the connection dropped: on_gap("reconnect") before the next message
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def _describe(epoch: str, limit: tuple[int, int, float | None]) -> str:
    age = "" if limit[2] is None else repr(limit[2])
    return f"longconn epoch={epoch} bytes={limit[1]} age={age}"


class NatsBackend:
    """Fan-out and shared history through NATS JetStream (see the module docs).

    ``servers`` is a NATS URL or a list of them (default
    ``"nats://127.0.0.1:4222"``; ``nats://user:pass@host:port``, ``tls://``), or a
    connected :class:`nats.aio.client.Client`. A client you pass in is used as it
    is and not closed by :meth:`close`; its reconnect settings are its own (the
    backend then learns of reconnects only through the sequence check).

    Keyword arguments:

    * ``prefix`` (default ``"longconn"``) -- first subject token and stream name
      prefix; 1-32 characters of ``[A-Za-z0-9_-]``.
    * ``storage`` (``"file"``, default, or ``"memory"``) and ``replicas`` (1) --
      of the streams this backend creates.
    * ``connect_timeout`` (2 s), ``command_timeout`` (5 s) -- the first connection,
      and every JetStream request.
    * ``reconnect_wait`` (0.25 s) -- between reconnect attempts (nats-py retries
      for ever; a failing publish raises meanwhile).
    * ``clock`` (default :func:`time.time`) -- stamps messages and ages history.

    Raises :class:`ValueError` for a bad prefix or storage.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | NatsClient = "nats://127.0.0.1:4222",
        *,
        prefix: str = DEFAULT_NATS_PREFIX,
        storage: str = "file",
        replicas: int = 1,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        reconnect_wait: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"prefix must be 1-32 characters of [A-Za-z0-9_-]: {prefix!r}")
        if storage not in ("file", "memory"):
            raise ValueError(f"storage must be 'file' or 'memory', not {storage!r}")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if isinstance(servers, NatsClient):
            self._nc: NatsClient | None = servers
            self._owns_client = False
            self.servers: list[str] = []
        else:
            self._nc = None
            self._owns_client = True
            self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.prefix = prefix
        self.storage = api.StorageType.FILE if storage == "file" else api.StorageType.MEMORY
        self.replicas = replicas
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.reconnect_wait = reconnect_wait
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._topics: dict[str, _Topic] = {}
        self._connected = False
        self._start_lock = asyncio.Lock()
        self._resync_task: asyncio.Task[None] | None = None
        self.closed = False
        self._stats = {
            "published": 0,
            "received": 0,
            "gaps": 0,
            "reconnects": 0,
            "subscriber_errors": 0,
            "decode_errors": 0,
        }
        self._publish_latency = LatencyHistogram()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<NatsBackend {self.prefix!r} {state} topics={len(self._topics)}>"

    # -- names ------------------------------------------------------------------

    def _names(self, topic: str) -> tuple[str, str, str]:
        """(stream, history subject, live subject) of ``topic``."""
        token = topic_token(topic)
        base = f"{self.prefix}.{token}"
        return f"{self.prefix}_{token}", base + ".h", base + ".r"

    # -- lifecycle ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up right now."""
        return self._nc is not None and self._nc.is_connected

    def stats(self) -> BackendStats:
        """A snapshot (:class:`~tornado_longconn.backends.BackendStats`, ``kind="nats"``).

        ``published`` counts this process's publishes, ``received`` the live
        messages delivered to it; ``history_topics`` is ``None`` (history lives
        in JetStream).
        """
        counts = self._stats
        return BackendStats(
            kind="nats",
            connected=self.connected and not self.closed,
            topics=len(self._topics),
            subscribers=sum(len(state.subscribers) for state in self._topics.values()),
            history_topics=None,
            published=counts["published"],
            received=counts["received"],
            gaps=counts["gaps"],
            reconnects=counts["reconnects"],
            subscriber_errors=counts["subscriber_errors"],
            decode_errors=counts["decode_errors"],
        )

    def publish_latency(self) -> HistogramStats:
        """Seconds each successful publish took, round trip to NATS included (:class:`~tornado_longconn.histogram.HistogramStats`)."""
        return self._publish_latency.stats()

    def subscriber_count(self, topic: str) -> int:
        """How many subscribers ``topic`` has in this process."""
        state = self._topics.get(topic)
        return len(state.subscribers) if state is not None else 0

    async def start(self) -> None:
        """Connect to NATS (idempotent).

        Raises :class:`BackendUnavailableError` when no server answers within
        ``connect_timeout``, :class:`ConnectionClosedError` after :meth:`close`.
        """
        if self.closed:
            raise ConnectionClosedError("the NATS backend is closed")
        async with self._start_lock:  # one connection, however many callers start()
            if self._nc is None:
                self._nc = await self._connect()

    async def _connect(self) -> NatsClient:
        nc = NatsClient()
        try:
            # nats-py keeps trying the servers (max_reconnect_attempts=-1): bound it here.
            await asyncio.wait_for(
                nc.connect(
                    self.servers,
                    connect_timeout=max(1, round(self.connect_timeout)),
                    reconnect_time_wait=self.reconnect_wait,  # type: ignore[arg-type,unused-ignore]
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                ),
                self.connect_timeout,
            )
        except (nats.errors.NoServersError, *_UNAVAILABLE) as exc:
            with contextlib.suppress(*_UNAVAILABLE, nats.errors.Error):
                await nc.close()
            raise BackendUnavailableError(f"NATS is unavailable: {exc!r}") from exc
        return nc

    async def close(self) -> None:
        """Unsubscribe, and close the connection when the backend made it. Idempotent."""
        if self.closed:
            return
        self.closed = True
        task, self._resync_task = self._resync_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        topics = list(self._topics.values())
        self._topics.clear()
        for state in topics:
            if state.sub is not None:
                with contextlib.suppress(*_UNAVAILABLE, nats.errors.BadSubscriptionError):
                    await state.sub.unsubscribe()
        if self._owns_client and self._nc is not None:
            with contextlib.suppress(*_UNAVAILABLE):
                await self._nc.close()

    def _client(self) -> NatsClient:
        if self.closed:
            raise ConnectionClosedError("the NATS backend is closed")
        if self._nc is None:
            raise BackendUnavailableError("the NATS backend is not started (await start())")
        return self._nc

    async def _on_disconnected(self) -> None:
        log.warning("NATS connection lost; reconnecting", extra=log_fields())
        self._streams.clear()  # a restarted server may have lost streams: ask again
        for state in self._topics.values():
            state.resync = True

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            log.warning(
                "NATS slow consumer: %s; the sequence check reports the loss",
                exc,
                extra=log_fields(),
            )
        else:
            log.info("NATS client error: %s", exc, extra=log_fields())

    async def _on_reconnected(self) -> None:
        self._stats["reconnects"] += 1
        log.info("NATS connection is back; subscribers resync", extra=log_fields())
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.create_task(self._resync(), name=f"{self!r} resync")

    async def _resync(self) -> None:
        """After a reconnect: learn each topic's new floor, then tell subscribers."""
        for topic, state in list(self._topics.items()):
            if state.resync:  # no message came on the new connection yet
                state.resync = False
                state.seen = 0
                state.epoch = None
                self._gap(topic, state, "reconnect")
            with contextlib.suppress(BackendError):
                state.floor = (await self._ensure_stream(topic)).state.last_seq or 0
            state.changed.set()

    # -- streams --------------------------------------------------------------------

    async def _request(self, coro: Any) -> Any:
        try:
            return await coro
        except _UNAVAILABLE as exc:
            raise BackendUnavailableError(f"NATS is unavailable: {exc!r}") from exc
        except nats.js.errors.Error as exc:
            raise BackendError(f"NATS JetStream refused the operation: {exc}") from exc
        except nats.errors.Error as exc:
            raise BackendError(f"NATS refused the operation: {exc}") from exc

    async def _ensure_stream(
        self, topic: str, limit: tuple[int, int, float | None] | None = None
    ) -> api.StreamInfo:
        """The stream's info, creating it (or updating its limits) as needed."""
        js = self._client().jetstream(timeout=self.command_timeout)
        name, subject, live = self._names(topic)
        try:
            info: api.StreamInfo = await self._request(js.stream_info(name))
        except BackendError as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                raise
            want = limit or (HistoryLimit().max_messages, 0, None)
            config = api.StreamConfig(
                name=name,
                description=_describe(new_epoch(), want),
                subjects=[subject],
                max_msgs=want[0],
                max_age=want[2],
                storage=self.storage,
                num_replicas=self.replicas,
                discard=api.DiscardPolicy.OLD,
                allow_direct=True,
                republish=api.RePublish(src=subject, dest=live),
            )
            try:
                info = await self._request(js.add_stream(config))
            except BackendError as exc2:
                cause = exc2.__cause__
                if getattr(cause, "err_code", None) != _STREAM_EXISTS:
                    raise
                info = await self._request(js.stream_info(name))  # another process won
        epoch, current = self._parse(info)
        if limit is not None and limit != current:
            config = info.config.evolve(
                description=_describe(epoch, limit), max_msgs=limit[0], max_age=limit[2]
            )
            info = await self._request(js.update_stream(config))
            current = limit
        self._streams[topic] = _Stream(epoch, current)
        return info

    @staticmethod
    def _parse(info: api.StreamInfo) -> tuple[str, tuple[int, int, float | None]]:
        match = _DESCRIPTION_RE.fullmatch(info.config.description or "")
        if match is None:
            raise BackendError(
                f"stream {info.config.name!r} was not made by tornado-longconn "
                f"(description {info.config.description!r})"
            )
        max_msgs = info.config.max_msgs or HistoryLimit().max_messages
        age = float(match.group(3)) if match.group(3) else None
        return match.group(1), (max_msgs, int(match.group(2)), age)

    # -- subscriptions ----------------------------------------------------------------

    async def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Deliver ``topic``'s messages to ``subscriber`` from now on (idempotent).

        The first local subscriber of a topic makes a NATS subscription and waits
        (at most ``command_timeout``) until the server has it; the topic's stream
        is created when missing. Raises :class:`BackendUnavailableError` when NATS
        does not answer, :class:`ConnectionClosedError` after :meth:`close`.
        """
        await self.start()
        state = self._topics.get(topic)
        if state is not None:
            state.subscribers[subscriber] = None
            return
        _name, _subject, live = self._names(topic)
        state = self._topics[topic] = _Topic(live)
        state.subscribers[subscriber] = None
        nc = self._client()

        async def deliver(msg: Msg) -> None:
            self._on_msg(topic, state, msg)

        try:
            state.sub = await self._request(nc.subscribe(live, cb=deliver))
            await self._request(nc.flush(timeout=max(1, round(self.command_timeout))))
            info = await self._ensure_stream(topic)
        except BaseException:
            if self._topics.get(topic) is state:
                del self._topics[topic]
            if state.sub is not None:
                with contextlib.suppress(*_UNAVAILABLE, nats.errors.BadSubscriptionError):
                    await state.sub.unsubscribe()
            raise
        state.floor = info.state.last_seq or 0

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Stop delivering ``topic`` to ``subscriber`` (no error if it was not subscribed).

        The last local subscriber of a topic ends the NATS subscription.
        """
        state = self._topics.get(topic)
        if state is None:
            return
        state.subscribers.pop(subscriber, None)
        if state.subscribers:
            return
        del self._topics[topic]
        state.changed.set()
        if state.sub is not None:
            with contextlib.suppress(*_UNAVAILABLE, nats.errors.BadSubscriptionError):
                await state.sub.unsubscribe()

    def _gap(self, topic: str, state: _Topic, reason: str) -> None:
        log.info(
            "topic %r: possible message loss (%s); subscribers resync",
            topic,
            reason,
            extra=log_fields(topic=topic),
        )
        for subscriber in list(state.subscribers):
            self._stats["gaps"] += 1
            try:
                subscriber.on_gap(topic, reason)
            except Exception:
                self._stats["subscriber_errors"] += 1
                log.exception(
                    "subscriber %r failed on a gap of %r",
                    subscriber,
                    topic,
                    extra=log_fields(topic=topic),
                )

    def _on_msg(self, topic: str, state: _Topic, msg: Msg) -> None:
        if self._topics.get(topic) is not state:
            return  # unsubscribed meanwhile
        headers = msg.headers
        try:
            epoch_b, tail = msg.data.split(b":", 1)
            data, tag, time_s, _size = decode_tail(tail)
            epoch = epoch_b.decode("ascii")
            seq = int(headers["Nats-Sequence"]) if headers else 0
            cursor = Cursor(epoch, seq) if seq else None
        except (ValueError, UnicodeDecodeError, KeyError):
            self._stats["decode_errors"] += 1
            log.warning(
                "topic %r: undecodable message dropped; subscribers resync",
                topic,
                extra=log_fields(topic=topic),
            )
            self._gap(topic, state, "lost")
            return
        self._stats["received"] += 1
        if state.resync:
            # The first message on a new connection: whatever came meanwhile was missed.
            state.resync = False
            state.seen = 0
            state.epoch = None
            self._gap(topic, state, "reconnect")
        if cursor is not None:
            if state.epoch is not None and epoch != state.epoch:
                self._gap(topic, state, "epoch")
            elif state.seen and seq != state.seen + 1:
                self._gap(topic, state, "lost")
            state.epoch = epoch
            state.seen = seq
            state.changed.set()
        message = Message(topic, data, cursor, tag, time_s)
        for subscriber in list(state.subscribers):
            try:
                subscriber.on_message(message)
            except Exception:
                self._stats["subscriber_errors"] += 1
                log.exception(
                    "subscriber %r failed on a message of %r",
                    subscriber,
                    topic,
                    extra=log_fields(topic=topic),
                )

    # -- publish and history ------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        data: str | bytes,
        *,
        history: HistoryLimit | None = None,
        tag: str | None = None,
    ) -> Message:
        """Publish ``data`` to ``topic`` in every process.

        With ``history``: a JetStream publish (one round trip; one more the first
        time this process publishes to the topic, or when the limit changes);
        the returned :class:`Message` carries the cursor. Without: a plain NATS
        publish, no round trip. Subscribers in this process get the message
        through NATS like everyone else, i.e. after this returns.

        Raises :class:`TypeError` for data that is not ``str``/``bytes``,
        :class:`ValueError` for a topic :func:`topic_token` refuses,
        :class:`BackendUnavailableError` when NATS cannot be reached (the message
        may or may not have been stored if the connection broke mid-call),
        :class:`BackendError` when JetStream refuses, :class:`ConnectionClosedError`
        after :meth:`close`.
        """
        start = time.perf_counter()
        now = self._clock()
        tail, _size = encode_tail(data, tag, now)
        nc = self._client()
        _name, subject, live = self._names(topic)
        if history is None:
            if not nc.is_connected:
                raise BackendUnavailableError("NATS is unavailable: not connected")
            await self._request(nc.publish(live, b":" + tail))
            self._stats["published"] += 1
            self._publish_latency.observe(time.perf_counter() - start)
            return Message(topic, data, None, tag, now)
        limit = (history.max_messages, history.max_bytes or 0, history.max_age)
        stream = self._streams.get(topic)
        if stream is None or stream.limit != limit:
            await self._ensure_stream(topic, limit)
            stream = self._streams[topic]
        js = nc.jetstream(timeout=self.command_timeout)
        try:
            ack: api.PubAck = await self._request(
                js.publish(subject, stream.epoch.encode("ascii") + b":" + tail)
            )
        except BackendUnavailableError as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NoStreamResponseError):
                raise
            # The stream is gone (nothing was stored): make it again, with a new epoch.
            self._streams.pop(topic, None)
            await self._ensure_stream(topic, limit)
            stream = self._streams[topic]
            ack = await self._request(
                js.publish(subject, stream.epoch.encode("ascii") + b":" + tail)
            )
        self._stats["published"] += 1
        self._publish_latency.observe(time.perf_counter() - start)
        return Message(topic, data, Cursor(stream.epoch, ack.seq), tag, now)

    async def since(
        self, topic: str, cursor: Cursor | None, *, limit: int | None = None
    ) -> SinceResult:
        """Kept messages of ``topic`` after ``cursor`` (at most ``limit``), or a gap answer.

        One round trip for the stream's state, then the messages (direct gets,
        sent together). Gap reasons: ``"epoch"``, ``"future"``, ``"evicted"`` (as
        on the Redis backend). When ``topic`` has subscribers in this process,
        this waits (at most ``command_timeout``) until live delivery has reached
        the newest message it returns. Raises like :meth:`publish`.
        """
        if limit is not None and limit <= 0:
            limit = None  # as on Redis: no limit
        info = await self._ensure_stream(topic)
        epoch, (_max_msgs, max_bytes, max_age) = self._parse(info)
        first, last = info.state.first_seq or 0, info.state.last_seq or 0
        head = Cursor(epoch, last)
        if cursor is None:
            return SinceResult((), head)
        if cursor.epoch != epoch:
            return SinceResult((), head, gap=True, reason="epoch")
        if cursor.offset > last:
            return SinceResult((), head, gap=True, reason="future")
        if cursor.offset == last:
            return SinceResult((), cursor)
        start = cursor.offset + 1
        if start < first:
            return SinceResult((), head, gap=True, reason="evicted")
        end = last if (limit is None or max_bytes) else min(last, cursor.offset + limit)
        try:
            entries = await self._read(topic, info.config.name or "", start, end)
        except LookupError:
            return SinceResult((), head, gap=True, reason="evicted")
        if max_bytes and sum(size for _m, size in entries) > max_bytes and len(entries) > 1:
            return SinceResult((), head, gap=True, reason="evicted")
        messages = [m for m, _size in entries]
        if limit is not None:
            messages = messages[:limit]
        if max_age is not None and messages[0].time < self._clock() - max_age:
            return SinceResult((), head, gap=True, reason="evicted")
        await self._caught_up(topic, messages[-1].cursor)
        return SinceResult(messages, messages[-1].cursor or cursor)

    async def _read(
        self, topic: str, stream: str, start: int, end: int
    ) -> list[tuple[Message, int]]:
        """Messages ``start..end`` of the stream; :class:`LookupError` when one is gone."""
        js = self._client().jetstream(timeout=self.command_timeout)
        out: list[tuple[Message, int]] = []
        for low in range(start, end + 1, _GET_BATCH):
            seqs = range(low, min(end, low + _GET_BATCH - 1) + 1)
            try:
                raws = await self._request(
                    asyncio.gather(*(js.get_msg(stream, seq, direct=True) for seq in seqs))
                )
            except BackendError as exc:
                if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                    raise LookupError(f"message gone from {stream!r}") from exc
                raise
            for seq, raw in zip(seqs, raws, strict=True):
                try:
                    epoch_b, tail = (raw.data or b"").split(b":", 1)
                    data, tag, time_s, size = decode_tail(tail)
                except (ValueError, UnicodeDecodeError) as exc:
                    self._stats["decode_errors"] += 1
                    raise BackendError(f"stream {stream!r}: undecodable message {seq}") from exc
                epoch = self._streams[topic].epoch if topic in self._streams else epoch_b.decode()
                out.append((Message(topic, data, Cursor(epoch, seq), tag, time_s), size))
        return out

    async def _caught_up(self, topic: str, cursor: Cursor | None) -> None:
        state = self._topics.get(topic)
        if state is None or cursor is None or cursor.offset <= state.floor:
            return

        async def wait() -> None:
            while self._topics.get(topic) is state and state.seen < cursor.offset:
                state.changed.clear()
                await state.changed.wait()

        try:
            await asyncio.wait_for(wait(), self.command_timeout)
        except asyncio.TimeoutError:
            log.warning(
                "topic %r: live delivery is behind a history read",
                topic,
                extra=log_fields(topic=topic),
            )

    async def head(self, topic: str) -> Cursor:
        """The cursor of ``topic``'s newest message (offset 0 when it has none).

        Creates the topic's stream (and so its epoch) when missing. Raises like
        :meth:`publish`.
        """
        return (await self.since(topic, None)).cursor
