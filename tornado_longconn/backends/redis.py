"""The Redis backend: many processes and hosts behave as one application.

Install with ``pip install tornado-longconn[redis]`` (it needs ``redis`` >= 5, the
``redis.asyncio`` client). Every process that serves a topic connects to the same
Redis; a message published in any process reaches the subscribers of every
process, in one global order per topic, and history (cursors) is shared, so a
client may resume on another process than the one it left.

How it works
------------

* **Publish** is one round-trip: a Lua script (``EVALSHA``) that, atomically,
  reads or creates the topic's *epoch*, assigns the next offset, appends the
  message to the topic's history (a Redis Stream whose entry ID is
  ``0-<offset>``, trimmed to ``max_messages`` and, when asked, ``max_bytes``)
  and ``PUBLISH``-es the encoded message on the topic's channel. Redis runs
  scripts one at a time, so every process receives the same order.
* **Live delivery** uses ONE pub/sub connection per backend (per process),
  shared by all topics. A topic is ``SUBSCRIBE``-d when it gains its first local
  subscriber and ``UNSUBSCRIBE``-d when it loses its last.
* **History reads** (:meth:`RedisBackend.since`) are one script call that reads
  the epoch, the head offset and the stream range (``XRANGE``) together. When
  the topic has local subscribers, the script also publishes a marker on this
  process's private channel ``Psync:<random>``, and a read that returned
  messages waits until the marker comes back on the pub/sub connection: live
  delivery has then caught up, so history never runs ahead of it.
* **Epochs.** Each topic's epoch is kept in Redis and made on first use. When
  the key is missing (Redis restarted without persistence, flushed, or evicted
  under ``maxmemory``) a new epoch is made and the old history dropped: clients
  holding old cursors get a gap answer (reason ``"epoch"``) and resync.

Keys and channels
-----------------

For a topic ``T`` and the key prefix ``P`` (default ``"longconn:"``):

=====================  ==========================================================
``P{T}:m``             hash: ``e`` epoch, ``o`` last history offset, ``n`` live
                       sequence (every publish), ``b`` kept bytes (only with
                       ``max_bytes``), ``a`` max age in seconds (only with
                       ``max_age``)
``P{T}:h``             stream: the history; entry ID ``0-<offset>``, fields
                       ``s`` (payload size) and ``m`` (the message *tail*, below)
``P{T}``               the pub/sub channel
``Psync:<random>``     one per backend object: markers of its history reads
=====================  ==========================================================

All keys of a topic share the hash tag ``{T}``, so a script touches one Redis
Cluster slot. (The backend talks to one Redis endpoint; use a
:class:`redis.asyncio.Redis` client for it.)

Message encoding (version 1)
----------------------------

A pub/sub payload is ASCII header fields separated by ``:``, then raw bytes::

    1:<epoch>:<seq>:<offset>:<kind><time_us>:<taglen>:<tag><data>

``seq`` is the topic's live sequence (+1 on every publish, used to detect lost
live messages), ``offset`` the history offset (``0`` when the message keeps no
history), ``kind`` is ``t`` (text, ``data`` is UTF-8) or ``b`` (binary),
``time_us`` the publisher's wall clock in integer microseconds, ``taglen`` the
byte length of the UTF-8 ``tag`` (empty when there is no tag). Everything from
``<kind>`` on is the *tail*, which is also what the history stream stores.

Failure handling
----------------

* The pub/sub connection is re-established after any error with exponential
  backoff and full jitter (:class:`ReconnectBackoff`, 50 ms doubling up to 5 s
  by default), and every topic is subscribed again. Because messages may have
  been published meanwhile, each local subscriber then gets
  ``on_gap(topic, "reconnect")`` -- after the new subscription is confirmed, so
  a resync from history misses nothing.
* A live message whose sequence is not the previous one + 1 (Redis dropped
  messages, e.g. at ``client-output-buffer-limit pubsub``) gives
  ``on_gap(topic, "lost")``; a message from a new epoch gives
  ``on_gap(topic, "epoch")``.
* An idle pub/sub connection is checked with ``PING`` every ``ping_interval``
  seconds; no answer within ``ping_timeout`` counts as a lost connection.
* :meth:`RedisBackend.publish` is not retried by the backend (a retry after a
  lost reply could publish the message twice): it raises
  :class:`~tornado_longconn.exceptions.BackendUnavailableError` when Redis
  cannot be reached or does not answer within ``command_timeout``. A client
  object you pass in keeps its own retry policy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._tornado.redispy import RawConnection, check_redispy, pubsub_connection
from ..backoff import ReconnectBackoff
from ..exceptions import BackendError, BackendUnavailableError, ConnectionClosedError
from ..histogram import HistogramStats, LatencyHistogram
from ..log import Cursor, HistoryLimit, Message, SinceResult, new_epoch
from ..logfields import log_fields
from .base import BackendStats, Subscriber

check_redispy()  # a redis-py that renamed what the listener uses fails here, loudly

__all__ = [
    "DEFAULT_PREFIX",
    "ReconnectBackoff",
    "RedisBackend",
    "decode_payload",
    "encode_tail",
]

log = logging.getLogger("tornado_longconn.backends")

#: Key prefix used when none is given.
DEFAULT_PREFIX = "longconn:"

#: Version tag of the pub/sub payload encoding.
_VERSION = b"1"

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)

# KEYS: meta, history. ARGV: channel, epoch candidate, max_messages (0: no history),
# max_bytes (0: none), payload size, tail, max_age ("" : none).
_PUBLISH_LUA = """
local meta, hist = KEYS[1], KEYS[2]
local maxlen, maxbytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'e', epoch, 'o', 0, 'n', 0)
end
local n = redis.call('HINCRBY', meta, 'n', 1)
local off = 0
if maxlen > 0 then
  off = redis.call('HINCRBY', meta, 'o', 1)
  local id = '0-' .. off
  if maxbytes > 0 then
    local size = tonumber(ARGV[5])
    local len = redis.call('XLEN', hist)
    local b = redis.call('HINCRBY', meta, 'b', size)
    redis.call('XADD', hist, id, 's', size, 'm', ARGV[6])
    len = len + 1
    while len > 1 and (len > maxlen or b > maxbytes) do
      local first = redis.call('XRANGE', hist, '-', '+', 'COUNT', 1)[1]
      redis.call('XDEL', hist, first[1])
      b = redis.call('HINCRBY', meta, 'b', -tonumber(first[2][2]))
      len = len - 1
    end
  else
    redis.call('XADD', hist, 'MAXLEN', maxlen, id, 's', ARGV[5], 'm', ARGV[6])
  end
  if ARGV[7] == '' then
    redis.call('HDEL', meta, 'a')
  else
    redis.call('HSET', meta, 'a', ARGV[7])
  end
end
redis.call('PUBLISH', ARGV[1], '1:' .. epoch .. ':' .. n .. ':' .. off .. ':' .. ARGV[6])
return {epoch, n, off}
"""

# KEYS: meta, history. ARGV: epoch candidate, cursor epoch ("": head only),
# first wanted offset, count (0: all), sync channel ("": none), sync token.
_SINCE_LUA = """
local meta, hist = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'e', epoch, 'o', 0, 'n', 0)
end
local head = tonumber(redis.call('HGET', meta, 'o'))
local age = redis.call('HGET', meta, 'a')
local start = tonumber(ARGV[3])
local entries = {}
if ARGV[2] == epoch and start <= head then
  if tonumber(ARGV[4]) > 0 then
    entries = redis.call('XRANGE', hist, '0-' .. start, '+', 'COUNT', ARGV[4])
  else
    entries = redis.call('XRANGE', hist, '0-' .. start, '+')
  end
end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {epoch, head, age, entries}
"""


def encode_tail(data: str | bytes, tag: str | None, time_s: float) -> bytes:
    """Encode the part of a message the publisher knows (see the module docs).

    Raises :class:`TypeError` when ``data`` is neither ``str`` nor ``bytes``.
    """
    return _encode(data, tag, time_s)[0]


def _encode(data: str | bytes, tag: str | None, time_s: float) -> tuple[bytes, int]:
    if isinstance(data, str):
        kind, raw = b"t", data.encode("utf-8")
    elif isinstance(data, bytes):
        kind, raw = b"b", data
    else:
        raise TypeError(f"backend data must be str or bytes, not {type(data).__name__}")
    if tag is None:
        return b"%s%d::%s" % (kind, round(time_s * 1_000_000), raw), len(raw)
    btag = tag.encode("utf-8")
    tail = b"%s%d:%d:%s%s" % (kind, round(time_s * 1_000_000), len(btag), btag, raw)
    return tail, len(raw)


def _decode_tail(tail: bytes) -> tuple[str | bytes, str | None, float]:
    kind = tail[:1]
    colon = tail.index(b":", 1)
    time_s = int(tail[1:colon]) / 1_000_000
    colon2 = tail.index(b":", colon + 1)
    taglen = tail[colon + 1 : colon2]
    if taglen:
        end = colon2 + 1 + int(taglen)
        tag: str | None = tail[colon2 + 1 : end].decode("utf-8")
    else:
        end = colon2 + 1
        tag = None
    raw = tail[end:]
    if kind == b"t":
        return raw.decode("utf-8"), tag, time_s
    if kind == b"b":
        return raw, tag, time_s
    raise ValueError(f"unknown message kind {kind!r}")


def decode_payload(payload: bytes) -> tuple[str, int, int, str | bytes, str | None, float]:
    """Decode a pub/sub payload into ``(epoch, seq, offset, data, tag, time)``.

    Raises :class:`ValueError` for a payload not in the version 1 format.
    """
    version, epoch, seq, offset, tail = payload.split(b":", 4)
    if version != _VERSION:
        raise ValueError(f"unknown payload version {version!r}")
    data, tag, time_s = _decode_tail(tail)
    return epoch.decode("ascii"), int(seq), int(offset), data, tag, time_s


@dataclass
class _Topic:
    """Local state of one subscribed topic."""

    channel: bytes
    subscribers: dict[Subscriber, None] = field(default_factory=dict)
    last: tuple[str, int] | None = None  # (epoch, seq) of the last live message
    resync: bool = False  # tell subscribers on_gap("reconnect") when the SUBSCRIBE is confirmed


class RedisBackend:
    """Fan-out and shared history through Redis (see the module docs).

    ``redis`` is a URL (``redis://[:password@]host[:port][/db]``, ``rediss://``
    for TLS, ``unix:///path/to/socket``; default ``redis://127.0.0.1:6379/0``)
    or a :class:`redis.asyncio.Redis` client. A client you pass is used for
    commands as it is (decoding is bypassed, so ``decode_responses`` does not
    matter) and is not closed by :meth:`close`; the pub/sub connection is a new
    connection made with the client's connection settings.

    Keyword arguments:

    * ``prefix`` (default ``"longconn:"``) -- prepended to every key and channel;
      must not contain ``{`` or ``}``.
    * ``connect_timeout`` (2 s), ``command_timeout`` (5 s) -- socket timeouts of a
      client made from a URL; ``command_timeout`` also bounds how long
      :meth:`subscribe` waits for Redis to confirm.
    * ``ping_interval`` (10 s; ``None`` disables), ``ping_timeout`` (5 s) -- the
      liveness check of an idle pub/sub connection.
    * ``reconnect_base`` (0.05 s), ``reconnect_cap`` (5 s) -- see
      :class:`ReconnectBackoff`.
    * ``max_connections`` (64) -- command connections of a client made from a URL;
      past it, a command waits up to ``pool_timeout`` for a free connection
      (then :class:`~tornado_longconn.exceptions.BackendUnavailableError`).
    * ``pool_timeout`` (30 s) -- that wait. Longer than ``command_timeout`` on
      purpose: a burst of commands (every client resuming after a restart) queues
      for the pool instead of failing, while ``command_timeout`` still bounds each
      command once it has a connection, so a Redis that stops answering is
      noticed as fast as before. History reads (:meth:`since`, :meth:`head`)
      use at most half of ``max_connections`` at once and queue (also up to
      ``pool_timeout``) for the rest, so publishes keep the other half during a
      storm of resumes.
    * ``clock`` (default :func:`time.time`) -- stamps messages and ages history.

    Raises :class:`ValueError` for a bad prefix, URL scheme, ``max_connections`` or
    ``pool_timeout``.
    """

    def __init__(
        self,
        redis: str | aioredis.Redis = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 5.0,
        reconnect_base: float = 0.05,
        reconnect_cap: float = 5.0,
        max_connections: int = 64,
        pool_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not pool_timeout > 0:
            raise ValueError(f"pool_timeout must be > 0, got {pool_timeout}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must not contain '{{' or '}}': {prefix!r}")
        if isinstance(redis, str):
            if not redis.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(f"not a Redis URL: {redis!r}")
            # A blocking pool: past ``max_connections`` concurrent commands a command
            # waits (bounded by ``pool_timeout``) for a free connection instead of
            # failing with "Too many connections".
            pool = aioredis.BlockingConnectionPool.from_url(
                redis,
                max_connections=max_connections,
                timeout=pool_timeout,
                socket_connect_timeout=connect_timeout,
                socket_timeout=command_timeout,
                # RESP2: the pool then checks a pooled connection for EOF before use,
                # so the first command after a Redis restart gets a fresh connection.
                protocol=2,
                retry=Retry(NoBackoff(), 0),
            )
            self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
            self._owns_client = True
            self.url: str | None = redis
        else:
            self._client = redis
            self._owns_client = False
            self.url = None
        self.prefix = prefix
        self.command_timeout = command_timeout
        self.pool_timeout = pool_timeout
        # History reads (resumes, heads) hold at most half of the command connections
        # at once and queue for the rest here, so that publishes are never starved by
        # a storm of resumes queued ahead of them in the pool.
        self._read_slots = max(1, max_connections // 2)
        self._read_gate: asyncio.Semaphore | None = None
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._clock = clock
        self._backoff = ReconnectBackoff(reconnect_base, reconnect_cap)
        self._publish_script = self._client.register_script(_PUBLISH_LUA)
        self._since_script = self._client.register_script(_SINCE_LUA)
        self._epoch_candidate = new_epoch()
        # The channel on which history reads publish a marker to this process's own
        # pub/sub connection (see since()).
        self._sync_channel = f"{prefix}sync:{new_epoch()}{new_epoch()}".encode()
        self._sync_seq = 0
        self._syncs: dict[bytes, asyncio.Future[None]] = {}
        self._topics: dict[str, _Topic] = {}
        self._by_channel: dict[bytes, str] = {}
        # Futures of SUBSCRIBE commands sent and not yet confirmed, per channel, in
        # the order sent (Redis confirms in that order).
        self._pending: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        self._conn: RawConnection | None = None  # the pub/sub connection while it is up
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Event | None = None
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
        state = "connected" if self._conn is not None else "disconnected"
        return f"<RedisBackend {self.prefix!r} {state} topics={len(self._topics)}>"

    # -- keys ---------------------------------------------------------------

    def _keys(self, topic: str) -> tuple[str, str]:
        base = f"{self.prefix}{{{topic}}}"
        return base + ":m", base + ":h"

    def _channel(self, topic: str) -> bytes:
        return f"{self.prefix}{{{topic}}}".encode()

    def _candidate(self) -> str:
        return self._epoch_candidate

    def _used_candidate(self, epoch: str) -> None:
        # An epoch value is never offered twice, so a topic recreated after a
        # flush can never get its old epoch back.
        if epoch == self._epoch_candidate:
            self._epoch_candidate = new_epoch()

    # -- lifecycle ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the pub/sub connection is up right now."""
        return self._conn is not None

    def stats(self) -> BackendStats:
        """A snapshot (:class:`~tornado_longconn.backends.BackendStats`, ``kind="redis"``).

        ``published`` counts this process's publishes, ``received`` the live
        messages its pub/sub connection delivered; ``history_topics`` is ``None``
        (history lives in Redis).
        """
        counts = self._stats
        return BackendStats(
            kind="redis",
            connected=self._conn is not None and not self.closed,
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
        """Seconds each successful publish took, round trip to Redis included (:class:`~tornado_longconn.histogram.HistogramStats`)."""
        return self._publish_latency.stats()

    def subscriber_count(self, topic: str) -> int:
        """How many subscribers ``topic`` has in this process."""
        state = self._topics.get(topic)
        return len(state.subscribers) if state is not None else 0

    @property
    def redis(self) -> aioredis.Redis:
        """The client of the backend's commands (shared with the Redis presence store)."""
        return self._client

    def channel_of(self, topic: str) -> bytes:
        """The pub/sub channel of ``topic`` (``P{T}``; its meta hash is that name + ``:m``)."""
        return self._channel(topic)

    async def start(self) -> None:
        """Start the pub/sub connection task and wait for its first connection attempt.

        Idempotent. Never raises when Redis is down: the task keeps retrying (and
        subscribers registered meanwhile get ``on_gap`` when delivery starts).
        Raises :class:`ConnectionClosedError` after :meth:`close`.
        """
        if self.closed:
            raise ConnectionClosedError("the Redis backend is closed")
        if self._task is None:
            self._first_attempt = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"{self!r} pub/sub")
        assert self._first_attempt is not None
        await self._first_attempt.wait()

    async def close(self) -> None:
        """Cancel the pub/sub task, drop local subscriptions, close connections.

        Idempotent. A client passed to the constructor is left open.
        """
        if self.closed:
            return
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._release_pending()
        self._topics.clear()
        self._by_channel.clear()
        if self._owns_client:
            await self._client.aclose()

    # -- subscriptions --------------------------------------------------------

    async def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Deliver ``topic``'s messages to ``subscriber`` from now on (idempotent).

        The first local subscriber of a topic makes the backend ``SUBSCRIBE``; this
        waits (at most ``command_timeout``) for Redis to confirm. When Redis is
        unreachable the subscription is kept and made when the connection comes
        back; the subscriber then gets ``on_gap(topic, "reconnect")``.
        Raises :class:`ConnectionClosedError` after :meth:`close`.
        """
        await self.start()
        state = self._topics.get(topic)
        if state is not None:
            state.subscribers[subscriber] = None
            pending = self._pending.get(state.channel)
            if pending:
                await self._wait_confirmed(topic, pending[-1])
            return
        state = self._topics[topic] = _Topic(self._channel(topic))
        state.subscribers[subscriber] = None
        self._by_channel[state.channel] = topic
        conn = self._conn
        if conn is None:
            state.resync = True
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(state.channel, collections.deque()).append(future)
        try:
            await conn.send_command("SUBSCRIBE", state.channel, check_health=False)
        except _UNAVAILABLE:
            state.resync = True  # the pub/sub task reconnects and subscribes again
            return
        await self._wait_confirmed(topic, future)

    async def _wait_confirmed(self, topic: str, future: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), self.command_timeout)
        except asyncio.TimeoutError:
            # Redis is slow or gone: delivery starts when the subscription is made,
            # and on_gap tells the subscriber it started late.
            state = self._topics.get(topic)
            if state is not None:
                state.resync = True

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Stop delivering ``topic`` to ``subscriber`` (no error if it was not subscribed).

        The last local subscriber of a topic makes the backend ``UNSUBSCRIBE``.
        """
        state = self._topics.get(topic)
        if state is None:
            return
        state.subscribers.pop(subscriber, None)
        if state.subscribers:
            return
        del self._topics[topic]
        self._by_channel.pop(state.channel, None)
        conn = self._conn
        if conn is not None:
            try:
                await conn.send_command("UNSUBSCRIBE", state.channel, check_health=False)
            except _UNAVAILABLE:
                pass  # a new connection does not subscribe to it again

    # -- publish and history ----------------------------------------------------

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a registered script with EVALSHA (EVAL when Redis lost the script cache)."""
        if self.closed:
            raise ConnectionClosedError("the Redis backend is closed")
        client: Any = self._client  # execute_command is untyped in redis-py
        try:
            try:
                return await client.execute_command(
                    "EVALSHA", script.sha, len(keys), *keys, *args, NEVER_DECODE=True
                )
            except NoScriptError:
                return await client.execute_command(
                    "EVAL", script.script, len(keys), *keys, *args, NEVER_DECODE=True
                )
        except _UNAVAILABLE as exc:
            raise BackendUnavailableError(f"Redis is unavailable: {exc}") from exc
        except RedisError as exc:
            raise BackendError(f"Redis refused the operation: {exc}") from exc

    async def publish(
        self,
        topic: str,
        data: str | bytes,
        *,
        history: HistoryLimit | None = None,
        tag: str | None = None,
    ) -> Message:
        """Publish ``data`` to ``topic`` in every process, in one round-trip.

        With ``history`` the message is appended to the topic's stream and the
        returned :class:`Message` carries its cursor. ``max_messages`` and
        ``max_bytes`` are enforced at append time; ``max_age`` when history is read.
        Subscribers in this process get the message through Redis like everyone
        else (so all processes see one order), i.e. after this returns.

        Raises :class:`TypeError` for data that is not ``str``/``bytes``,
        :class:`BackendUnavailableError` when Redis cannot be reached (the message
        may or may not have been published if the connection broke mid-call),
        :class:`BackendError` when Redis refuses, :class:`ConnectionClosedError`
        after :meth:`close`.
        """
        now = self._clock()
        tail, size = _encode(data, tag, now)
        meta, hist = self._keys(topic)
        if history is None:
            maxlen, maxbytes, age = 0, 0, ""
        else:
            maxlen = history.max_messages
            maxbytes = history.max_bytes or 0
            age = repr(history.max_age) if history.max_age is not None else ""
        start = time.perf_counter()
        result = await self._call(
            self._publish_script,
            (meta, hist),
            (self._channel(topic), self._candidate(), maxlen, maxbytes, size, tail, age),
        )
        self._publish_latency.observe(time.perf_counter() - start)
        epoch = result[0].decode("ascii")
        self._used_candidate(epoch)
        self._stats["published"] += 1
        cursor = Cursor(epoch, int(result[2])) if history is not None else None
        return Message(topic, data, cursor, tag, now)

    async def since(
        self, topic: str, cursor: Cursor | None, *, limit: int | None = None
    ) -> SinceResult:
        """Kept messages of ``topic`` after ``cursor`` (at most ``limit``), or a gap answer.

        One round-trip. Gap reasons: ``"epoch"`` (the cursor is from another
        epoch: Redis lost the topic's keys, or the cursor is foreign), ``"future"``
        (offset beyond the head), ``"evicted"`` (trimmed by the history limit, by
        ``max_age``, or the stream key was evicted). Raises like :meth:`publish`.

        When ``topic`` has subscribers in this process, the returned messages have
        already been delivered to them (as on the in-memory backend): the read
        publishes a marker to this process's own pub/sub connection, and when it
        returned messages, this waits (at most ``command_timeout``) until the marker
        arrives, i.e. until live delivery has caught up with the read. So code
        that replays history and then goes live sees no duplicate at the seam.
        """
        meta, hist = self._keys(topic)
        sync: tuple[bytes, bytes] = (b"", b"")
        future: asyncio.Future[None] | None = None
        if topic in self._topics and self._conn is not None:
            self._sync_seq += 1
            token = b"%d" % self._sync_seq
            future = asyncio.get_running_loop().create_future()
            self._syncs[token] = future
            sync = (self._sync_channel, token)
        if cursor is None:
            args: tuple[Any, ...] = (self._candidate(), "", 0, 0, *sync)
        else:
            args = (self._candidate(), cursor.epoch, cursor.offset + 1, limit or 0, *sync)
        try:
            gate = self._read_gate
            if gate is None:
                gate = self._read_gate = asyncio.Semaphore(self._read_slots)
            try:
                await asyncio.wait_for(gate.acquire(), self.pool_timeout)
            except asyncio.TimeoutError:
                raise BackendUnavailableError(
                    f"history reads queued for more than {self.pool_timeout} s"
                ) from None
            try:
                result = await self._call(self._since_script, (meta, hist), args)
            finally:
                gate.release()
            if future is not None and result[3]:
                try:
                    await asyncio.wait_for(asyncio.shield(future), self.command_timeout)
                except asyncio.TimeoutError:
                    log.warning(
                        "topic %r: live delivery is behind a history read",
                        topic,
                        extra=log_fields(topic=topic),
                    )
        finally:
            if future is not None:
                self._syncs.pop(sync[1], None)
        epoch_b, head_off, age_b, entries = result
        epoch = epoch_b.decode("ascii")
        self._used_candidate(epoch)
        head = Cursor(epoch, int(head_off))
        if cursor is None:
            return SinceResult((), head)
        if cursor.epoch != epoch:
            return SinceResult((), head, gap=True, reason="epoch")
        if cursor.offset > head.offset:
            return SinceResult((), head, gap=True, reason="future")
        if cursor.offset == head.offset:
            return SinceResult((), cursor)
        messages = [self._entry(topic, epoch, entry) for entry in entries]
        if not messages or messages[0].cursor != cursor.next():
            return SinceResult((), head, gap=True, reason="evicted")
        if age_b is not None:
            horizon = self._clock() - float(age_b)
            if messages[0].time < horizon:
                return SinceResult((), head, gap=True, reason="evicted")
        return SinceResult(messages, messages[-1].cursor or cursor)

    @staticmethod
    def _entry(topic: str, epoch: str, entry: Sequence[Any]) -> Message:
        entry_id, fields = entry
        offset = int(entry_id.split(b"-", 1)[1])
        tail = fields[fields.index(b"m") + 1]
        data, tag, time_s = _decode_tail(tail)
        return Message(topic, data, Cursor(epoch, offset), tag, time_s)

    async def head(self, topic: str) -> Cursor:
        """The cursor of ``topic``'s newest message (offset 0 when it has none).

        Makes the topic's epoch when Redis has none yet, so the cursor stays valid
        for the messages published next. Raises like :meth:`publish`.
        """
        return (await self.since(topic, None)).cursor

    # -- the pub/sub connection --------------------------------------------------

    def _release_pending(self) -> None:
        for future in self._syncs.values():
            if not future.done():
                future.set_result(None)  # the connection is gone: on_gap follows
        self._syncs.clear()
        for queue in self._pending.values():
            for future in queue:
                if not future.done():
                    future.set_result(None)
        self._pending.clear()

    async def _run(self) -> None:
        """Keep one pub/sub connection up; reconnect with backoff until cancelled."""
        assert self._first_attempt is not None
        ever_connected = False
        while True:
            conn: RawConnection | None = None
            try:
                conn = self._make_connection()
                await asyncio.wait_for(conn.connect(), self.command_timeout)
                if ever_connected:
                    self._stats["reconnects"] += 1
                    log.info(
                        "Redis pub/sub connection is back; subscribing again", extra=log_fields()
                    )
                ever_connected = True
                self._conn = conn
                self._first_attempt.set()
                channels = [self._sync_channel]
                channels += [state.channel for state in self._topics.values()]
                for i in range(0, len(channels), 1000):
                    await conn.send_command(
                        "SUBSCRIBE", *channels[i : i + 1000], check_health=False
                    )
                if len(channels) == 1:
                    self._backoff.reset()
                await self._read(conn)
            except _UNAVAILABLE as exc:
                log.warning("Redis pub/sub connection lost or refused: %s", exc, extra=log_fields())
            except RedisError as exc:
                log.warning("Redis pub/sub connection error: %s", exc, extra=log_fields())
            except Exception:
                log.exception("Redis pub/sub task failed; reconnecting", extra=log_fields())
            finally:
                self._conn = None
                self._first_attempt.set()
                for state in self._topics.values():
                    state.resync = True
                    state.last = None
                self._release_pending()
                if conn is not None:
                    await conn.disconnect(nowait=True)
            # A timer for the backoff deadline (not a poll); close() cancels it.
            await asyncio.sleep(self._backoff.next_delay())

    def _make_connection(self) -> RawConnection:
        # RESP2, raw bytes, no hidden retries: this task owns reconnecting.
        return pubsub_connection(
            self._client.connection_pool,
            protocol=2,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
        )

    async def _read(self, conn: RawConnection) -> None:
        waiting_pong = False
        idle = math.inf if self.ping_interval is None else self.ping_interval
        while True:
            response = await conn.read_response(
                timeout=self.ping_timeout if waiting_pong else idle,
                disconnect_on_error=False,
            )
            if response is None:
                if waiting_pong:
                    raise RedisTimeoutError(f"no PONG within {self.ping_timeout} s")
                await conn.send_command("PING", check_health=False)
                waiting_pong = True
                continue
            waiting_pong = False
            self._backoff.reset()
            kind = response[0]
            if kind == b"message":
                if response[1] == self._sync_channel:
                    future = self._syncs.get(response[2])
                    if future is not None and not future.done():
                        future.set_result(None)
                else:
                    self._on_payload(response[1], response[2])
            elif kind == b"subscribe":
                self._on_subscribed(response[1])
            # "unsubscribe" needs nothing; "pong" only proves liveness.

    def _on_subscribed(self, channel: bytes) -> None:
        queue = self._pending.get(channel)
        if queue:
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
            if not queue:
                del self._pending[channel]
        topic = self._by_channel.get(channel)
        if topic is None:
            return  # unsubscribed meanwhile
        state = self._topics.get(topic)
        if state is not None and state.resync:
            state.resync = False
            state.last = None
            self._gap(topic, state, "reconnect")

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

    def _on_payload(self, channel: bytes, payload: bytes) -> None:
        topic = self._by_channel.get(channel)
        if topic is None:
            return  # unsubscribed; Redis has not confirmed yet
        state = self._topics[topic]
        try:
            epoch, seq, offset, data, tag, time_s = decode_payload(payload)
        except (ValueError, UnicodeDecodeError):
            self._stats["decode_errors"] += 1
            log.warning(
                "topic %r: undecodable message dropped; subscribers resync",
                topic,
                extra=log_fields(topic=topic),
            )
            self._gap(topic, state, "lost")
            return
        self._stats["received"] += 1
        last = state.last
        state.last = (epoch, seq)
        if last is not None:
            if epoch != last[0]:
                self._gap(topic, state, "epoch")
            elif seq != last[1] + 1:
                self._gap(topic, state, "lost")
        message = Message(topic, data, Cursor(epoch, offset) if offset else None, tag, time_s)
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
