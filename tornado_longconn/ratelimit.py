"""Rate limits as I/O-free rule objects: token buckets that take ``now``.

:class:`TokenBucket` is the rule (``rate`` tokens a second, at most ``burst``
saved up); it never reads a clock, so it is tested without an event loop.
:class:`RateLimits` is the settings object a handler carries
(``SubscriptionMixin.rate_limits``); :class:`ConnectionRateLimiter` applies it
to one connection (messages/s, bytes/s, publishes/s per topic) and
:class:`ConnectionCap` counts open connections per key (an IP address, a user).

>>> bucket = TokenBucket(rate=2.0, burst=3)
>>> [bucket.try_take(0.0) for _ in range(4)]
[True, True, True, False]
>>> bucket.wait_time(0.0)
0.5
>>> bucket.try_take(0.5)
True
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_MAX_BREACHES",
    "ConnectionCap",
    "ConnectionCapStore",
    "ConnectionCaps",
    "ConnectionRateLimiter",
    "KeyedBuckets",
    "RateLimits",
    "TokenBucket",
    "connection_caps_for",
    "connection_caps_of",
    "user_publish_buckets",
]

#: Rate-limit breaches answered with ``limit`` before the next one closes with 4429.
DEFAULT_MAX_BREACHES: Final = 10
#: The application setting that holds the :class:`ConnectionCaps`.
_CAPS_SETTING: Final = "longconn_connection_caps"
#: The application setting that holds the per-user publish buckets.
_USER_SETTING: Final = "longconn_user_publish_buckets"
# (user, topic) buckets kept per application for the per-user publish limit.
_MAX_USER_KEYS: Final = 100_000
# Per-topic publish buckets kept per connection; a new topic beyond it is refused
# unless an idle (full) bucket can be dropped, so a client cannot grow the table.
_MAX_PUBLISH_TOPICS: Final = 256


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full.

    Over any interval of length ``t`` it grants at most ``burst + rate * t``
    tokens. ``now`` is any monotonic clock in seconds (``time.monotonic()``);
    a ``now`` earlier than the last one is treated as the last one. Raises
    ``ValueError`` when ``rate`` is not positive or ``burst`` is below 1.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        last = self._last
        if last is None or now > last:
            if last is not None:
                self._tokens = min(self.burst, self._tokens + (now - last) * self.rate)
            self._last = now

    def tokens(self, now: float) -> float:
        """The tokens available at ``now`` (refills first)."""
        self._refill(now)
        return self._tokens

    def try_take(self, now: float, n: float = 1) -> bool:
        """Take ``n`` tokens at ``now`` if there are; False (nothing taken) otherwise.

        ``n`` larger than ``burst`` never succeeds.
        """
        self._refill(now)
        if n <= self._tokens:
            self._tokens -= n
            return True
        return False

    def wait_time(self, now: float, n: float = 1) -> float:
        """Seconds from ``now`` until ``n`` tokens are there (0: now; ``inf`` if ``n > burst``)."""
        self._refill(now)
        if n > self.burst:
            return float("inf")
        missing = n - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket holds ``burst`` tokens at ``now`` (an idle sender)."""
        return self.tokens(now) >= self.burst


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-connection rate limits of the subscriptions protocol (None: no limit).

    * ``messages_per_second`` / ``message_burst`` -- inbound frames.
    * ``bytes_per_second`` / ``byte_burst`` -- inbound bytes (``byte_burst``
      should be at least the largest frame you accept, else that frame is
      always refused).
    * ``publishes_per_second`` / ``publish_burst`` -- ``publish`` requests per
      topic.
    * ``user_publishes_per_second`` / ``user_publish_burst`` -- ``publish``
      requests per topic per user (``presence_user()``), summed over the user's
      connections in this process (and the HTTP publish handler's requests).
    * ``max_breaches`` (:data:`DEFAULT_MAX_BREACHES`) -- breaches answered with
      the error ``limit``; the next one closes the connection with 4429
      (``CloseCode.RATE_LIMITED``).

    A burst left as None is one second's worth (at least 1).

    >>> RateLimits(messages_per_second=50).message_burst_or_default()
    50.0
    """

    messages_per_second: float | None = None
    message_burst: float | None = None
    bytes_per_second: float | None = None
    byte_burst: float | None = None
    publishes_per_second: float | None = None
    publish_burst: float | None = None
    user_publishes_per_second: float | None = None
    user_publish_burst: float | None = None
    max_breaches: int = DEFAULT_MAX_BREACHES

    def message_burst_or_default(self) -> float:
        """``message_burst``, else one second of ``messages_per_second``."""
        return _burst(self.messages_per_second, self.message_burst)

    def byte_burst_or_default(self) -> float:
        """``byte_burst``, else one second of ``bytes_per_second``."""
        return _burst(self.bytes_per_second, self.byte_burst)

    def publish_burst_or_default(self) -> float:
        """``publish_burst``, else one second of ``publishes_per_second``."""
        return _burst(self.publishes_per_second, self.publish_burst)

    def user_publish_burst_or_default(self) -> float:
        """``user_publish_burst``, else one second of ``user_publishes_per_second``."""
        return _burst(self.user_publishes_per_second, self.user_publish_burst)


def _burst(rate: float | None, burst: float | None) -> float:
    if burst is not None:
        return float(burst)
    return max(1.0, float(rate or 0.0))


class ConnectionRateLimiter:
    """:class:`RateLimits` applied to one connection (I/O-free: pass ``now``).

    :meth:`check_message` charges an inbound frame, :meth:`check_publish` a
    publish to a topic; each returns None when allowed, else the limit broken
    (``"messages"``, ``"bytes"`` or ``"publishes"``), and counts the breach.
    :attr:`exhausted` is True once more than ``max_breaches`` breaches happened:
    close the connection.

    >>> limiter = ConnectionRateLimiter(RateLimits(messages_per_second=1, max_breaches=1))
    >>> limiter.check_message(0.0, 10), limiter.check_message(0.0, 10)
    (None, 'messages')
    >>> limiter.exhausted, limiter.check_message(0.0, 10), limiter.exhausted
    (False, 'messages', True)
    """

    __slots__ = ("_bytes", "_messages", "_publishes", "breaches", "limits")

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self.breaches = 0
        self._messages = (
            None
            if limits.messages_per_second is None
            else TokenBucket(limits.messages_per_second, limits.message_burst_or_default())
        )
        self._bytes = (
            None
            if limits.bytes_per_second is None
            else TokenBucket(limits.bytes_per_second, limits.byte_burst_or_default())
        )
        self._publishes: dict[str, TokenBucket] | None = None

    @property
    def exhausted(self) -> bool:
        """True when the breaches passed ``max_breaches`` (close with 4429)."""
        return self.breaches > self.limits.max_breaches

    def _breach(self, kind: str) -> str:
        self.breaches += 1
        return kind

    def check_message(self, now: float, size: int) -> str | None:
        """Charge one inbound frame of ``size`` bytes; the broken limit, or None.

        A refused frame takes nothing from either bucket.
        """
        messages, sizes = self._messages, self._bytes
        if messages is not None and messages.wait_time(now) > 0:
            return self._breach("messages")
        if sizes is not None and not sizes.try_take(now, size):
            return self._breach("bytes")
        if messages is not None:
            messages.try_take(now)
        return None

    def check_publish(self, now: float, topic: str) -> str | None:
        """Charge one publish to ``topic``; ``"publishes"`` when refused, else None."""
        rate = self.limits.publishes_per_second
        if rate is None:
            return None
        buckets = self._publishes
        if buckets is None:
            buckets = self._publishes = {}
        bucket = buckets.get(topic)
        if bucket is None:
            if len(buckets) >= _MAX_PUBLISH_TOPICS:
                for key in [k for k, b in buckets.items() if b.full(now)]:
                    del buckets[key]
                if len(buckets) >= _MAX_PUBLISH_TOPICS:
                    return self._breach("publishes")
            bucket = buckets[topic] = TokenBucket(rate, self.limits.publish_burst_or_default())
        if bucket.try_take(now):
            return None
        return self._breach("publishes")


class ConnectionCap:
    """At most ``limit`` open connections per key (an IP address, a user id).

    :meth:`acquire` returns False (nothing counted) when the key is at the
    limit; every True must be matched by one :meth:`release`. Keys with no
    connection are forgotten, so the table holds only open connections.

    >>> cap = ConnectionCap(2)
    >>> cap.acquire("10.0.0.1"), cap.acquire("10.0.0.1"), cap.acquire("10.0.0.1")
    (True, True, False)
    >>> cap.release("10.0.0.1"); cap.acquire("10.0.0.1")
    True
    """

    __slots__ = ("_open", "limit", "refused")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._open: dict[str, int] = {}
        #: Connections refused so far.
        self.refused = 0

    def acquire(self, key: str) -> bool:
        """Count one connection of ``key`` in; False when ``key`` is at the limit."""
        count = self._open.get(key, 0)
        if count >= self.limit:
            self.refused += 1
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        """Count one connection of ``key`` out."""
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def count(self, key: str) -> int:
        """Open connections of ``key``."""
        return self._open.get(key, 0)


class ConnectionCaps:
    """The connection caps of one application: one :class:`ConnectionCap` per (kind, limit).

    Stored at ``application.settings["longconn_connection_caps"]`` (see
    :meth:`for_settings`), so every handler of the application with the same
    limit shares one count: a WebSocket and an SSE stream from one address
    both count against ``max_connections_per_ip``.

    >>> caps = ConnectionCaps()
    >>> held, refused = caps.acquire([("ip", "10.0.0.1", 1), ("user", None, 5)])
    >>> refused, caps.acquire([("ip", "10.0.0.1", 1)])[1]
    (None, 'ip')
    >>> caps.release(held); caps.acquire([("ip", "10.0.0.1", 1)])[1] is None
    True
    """

    __slots__ = ("_caps",)

    def __init__(self) -> None:
        self._caps: dict[tuple[str, int], ConnectionCap] = {}

    @classmethod
    def for_settings(cls, settings: MutableMapping[str, Any]) -> ConnectionCaps:
        """The caps in an application's ``settings``, created if missing."""
        caps = settings.get(_CAPS_SETTING)
        if caps is None:
            caps = settings[_CAPS_SETTING] = cls()
        if not isinstance(caps, ConnectionCaps):
            raise TypeError(f"settings[{_CAPS_SETTING!r}] must be a ConnectionCaps")
        return caps

    def acquire(
        self, wanted: Iterable[tuple[str, str | None, int | None]]
    ) -> tuple[list[tuple[ConnectionCap, str]], str | None]:
        """Count a connection in under every ``(kind, key, limit)`` (a None key or limit: skipped).

        Returns what was held (give it to :meth:`release` when the connection
        ends) and None, or ``([], kind)`` with the first cap that refused
        (nothing is held then).
        """
        held: list[tuple[ConnectionCap, str]] = []
        for kind, key, limit in wanted:
            if key is None or limit is None:
                continue
            cap = self._caps.get((kind, limit))
            if cap is None:
                cap = self._caps[kind, limit] = ConnectionCap(limit)
            if not cap.acquire(key):
                self.release(held)
                return [], kind
            held.append((cap, key))
        return held, None

    def release(self, held: Iterable[tuple[ConnectionCap, str]]) -> None:
        """Count out what :meth:`acquire` held."""
        for cap, key in held:
            cap.release(key)

    async def acquire_connection(
        self, wanted: Sequence[tuple[str, str | None, int | None]]
    ) -> tuple[Any, str | None]:
        """:meth:`acquire` as a :class:`ConnectionCapStore` (no I/O: this process only)."""
        return self.acquire(wanted)

    def release_connection(self, held: Any) -> None:
        """:meth:`release` as a :class:`ConnectionCapStore`."""
        self.release(held)


@runtime_checkable
class ConnectionCapStore(Protocol):
    """Where the connection caps are counted: this process, or every process of a backend.

    :class:`ConnectionCaps` counts in this process (the memory backend);
    :class:`~tornado_longconn.caps_redis.RedisConnectionCaps` counts the
    connections of every process sharing a Redis server. Get the right one with
    :func:`connection_caps_for` and put it in the application setting
    ``longconn_connection_caps`` (where the mixins look, see
    :func:`connection_caps_of`).
    """

    async def acquire_connection(
        self, wanted: Sequence[tuple[str, str | None, int | None]]
    ) -> tuple[Any, str | None]:
        """Count one connection in under every ``(kind, key, limit)`` (None key or limit: skipped).

        Returns ``(held, None)`` -- give ``held`` to :meth:`release_connection`
        when the connection ends -- or ``(held, kind)`` naming the first cap
        that was full (nothing is counted then; ``held`` is empty).
        """
        ...

    def release_connection(self, held: Any) -> None:
        """Count out what :meth:`acquire_connection` held (never blocks, never raises)."""
        ...


def connection_caps_of(settings: MutableMapping[str, Any]) -> ConnectionCapStore:
    """The application's cap store: ``settings["longconn_connection_caps"]``.

    A process-local :class:`ConnectionCaps` is created there when the setting is
    missing. Raises ``TypeError`` when it holds something that is not a
    :class:`ConnectionCapStore`.
    """
    store = settings.get(_CAPS_SETTING)
    if store is None:
        store = settings[_CAPS_SETTING] = ConnectionCaps()
    if not isinstance(store, ConnectionCapStore):
        raise TypeError(f"settings[{_CAPS_SETTING!r}] must be a ConnectionCapStore")
    return store


def connection_caps_for(backend: Any, **options: Any) -> ConnectionCapStore:
    """A cap store for ``backend``: counts of this process on the memory backend,
    of every process on a Redis backend (one server or Sentinel).

    ``options`` go to :class:`~tornado_longconn.caps_redis.RedisConnectionCaps`
    (``ttl``, ``refresh_interval``, ``process``); call its ``start()`` once the
    loop runs and ``close()`` at shutdown. Raises ``TypeError`` for other
    backends (NATS, Redis Cluster): process-local caps would silently let N
    processes accept N times the cap.
    """
    from .backends.memory import MemoryBackend

    if isinstance(backend, MemoryBackend):
        return ConnectionCaps()
    try:
        from .backends.redis import RedisBackend
        from .backends.redis_cluster import ClusterRedisBackend
    except ImportError:  # the redis extra is not installed: not a Redis backend
        pass
    else:
        if isinstance(backend, RedisBackend) and not isinstance(backend, ClusterRedisBackend):
            from .caps_redis import RedisConnectionCaps

            return RedisConnectionCaps(backend, **options)
    raise TypeError(
        f"no connection cap store for {type(backend).__name__} (in memory: MemoryBackend; "
        "many processes: RedisBackend on one Redis server or Sentinel)"
    )


class KeyedBuckets:
    """One :class:`TokenBucket` per key, at most ``max_keys`` of them (I/O-free).

    A new key beyond ``max_keys`` first drops the buckets that are full again
    (idle senders lose nothing), then the least recently created one: the table
    stays bounded and no key is refused because of others.

    >>> buckets = KeyedBuckets(rate=1, burst=1, max_keys=2)
    >>> buckets.try_take("a", 0.0), buckets.try_take("a", 0.0), buckets.try_take("b", 0.0)
    (True, False, True)
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = _MAX_USER_KEYS) -> None:
        TokenBucket(rate, burst)  # validates
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[Any, TokenBucket] = {}

    def try_take(self, key: Any, now: float, n: float = 1) -> bool:
        """Take ``n`` tokens from ``key``'s bucket at ``now`` (see :meth:`TokenBucket.try_take`)."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                for old in [k for k, b in buckets.items() if b.full(now)]:
                    del buckets[old]
                while len(buckets) >= self.max_keys:
                    del buckets[next(iter(buckets))]
            bucket = buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.try_take(now, n)

    def __len__(self) -> int:
        return len(self._buckets)


def user_publish_buckets(
    settings: MutableMapping[str, Any], limits: RateLimits
) -> KeyedBuckets | None:
    """The application's per-user publish buckets for ``limits`` (None: no such limit).

    Kept in ``settings["longconn_user_publish_buckets"]``, one table per rate and
    burst, shared by every handler of the application.
    """
    rate = limits.user_publishes_per_second
    if rate is None:
        return None
    burst = limits.user_publish_burst_or_default()
    tables = settings.get(_USER_SETTING)
    if tables is None:
        tables = settings[_USER_SETTING] = {}
    table = tables.get((rate, burst))
    if table is None:
        table = tables[rate, burst] = KeyedBuckets(rate, burst)
    assert isinstance(table, KeyedBuckets)
    return table
