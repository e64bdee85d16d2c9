"""The Redis backend on a Sentinel-managed Redis: the master is found, and followed.

``SentinelRedisBackend`` is :class:`~tornado_longconn.backends.redis.RedisBackend`
(same keys, scripts, encoding, one round trip per publish) whose connections ask
the sentinels for the current master of a service name. When Sentinel promotes a
replica, the pub/sub connection and the command connections reconnect to the
new master (every local subscriber gets ``on_gap(topic, "reconnect")``; a publish
in flight raises :class:`~tornado_longconn.exceptions.BackendUnavailableError`).

Failover loses nothing silently
-------------------------------

Redis replicates asynchronously: the promoted replica may lack the last messages
the old master stored (and published to subscribers). Were the topic's offsets
simply continued, a new message could get the offset of a lost one, and a client
holding that cursor would skip it without knowing. So each topic records the
master's replication ID (``master_replid``, from ``INFO replication``, read
inside the scripts) with its epoch; a promoted replica has a new replication ID,
and the first publish or history read of each topic on it makes a new epoch.
Clients then get an explicit gap (reason ``"epoch"``) and resync: a failover
costs one resync per topic and client, never a silent loss. The same happens
when a master restarts (its replication ID changes too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from .redis import _PUBLISH_LUA, _SINCE_LUA, DEFAULT_PREFIX, RedisBackend

__all__ = ["SentinelRedisBackend", "parse_sentinel_url"]

_EPOCH_READ = "local epoch = redis.call('HGET', meta, 'e')\nif not epoch then\n"
_EPOCH_READ_CHECKED = (
    "local epoch = redis.call('HGET', meta, 'e')\n"
    "local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')\n"
    "if epoch and redis.call('HGET', meta, 'r') ~= rid then\n"
    "  epoch = false\n"
    "  redis.call('HDEL', meta, 'b', 'a')\n"
    "end\n"
    "if not epoch then\n"
)
_EPOCH_WRITE = "redis.call('HSET', meta, 'e', epoch, 'o', 0, 'n', 0)"
_EPOCH_WRITE_CHECKED = "redis.call('HSET', meta, 'e', epoch, 'o', 0, 'n', 0, 'r', rid)"


def _checked(script: str) -> str:
    """``script`` with the replication-ID check added to its epoch handling."""
    if script.count(_EPOCH_READ) != 1 or script.count(_EPOCH_WRITE) != 1:
        raise RuntimeError("the Redis backend's scripts changed: update redis_sentinel.py")
    return script.replace(_EPOCH_READ, _EPOCH_READ_CHECKED).replace(
        _EPOCH_WRITE, _EPOCH_WRITE_CHECKED
    )


_SENTINEL_PUBLISH_LUA = _checked(_PUBLISH_LUA)
_SENTINEL_SINCE_LUA = _checked(_SINCE_LUA)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """Split ``redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]``.

    Returns ``(sentinels, service, db, password)``; a sentinel without a port is
    on 26379. The password (if any) is the Redis servers' (``requirepass``).
    Raises :class:`ValueError` for another scheme, no sentinel, no service or a
    db that is not a number.
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "redis+sentinel" or not sep:
        raise ValueError(f"not a redis+sentinel:// URL: {url!r}")
    netloc, _, path = rest.partition("/")
    password: str | None = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        password = unquote(auth.partition(":")[2]) or None
    sentinels: list[tuple[str, int]] = []
    for host in netloc.split(","):
        if not host:
            continue
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "26379")
        if not port.isdigit():
            raise ValueError(f"bad sentinel address {host!r} in {url!r}")
        sentinels.append((name, int(port)))
    if not sentinels:
        raise ValueError(f"no sentinel in {url!r}")
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError(f"no service name in {url!r} (redis+sentinel://host:port/service)")
    if db and not db.isdigit():
        raise ValueError(f"db must be a number in {url!r}")
    return sentinels, unquote(service), int(db or 0), password


class SentinelRedisBackend(RedisBackend):
    """:class:`RedisBackend` on the master Sentinel names for ``service``.

    ``url`` is ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``
    (every sentinel listed, so any of them can answer). Keyword arguments as for
    :class:`RedisBackend` (``prefix``, ``connect_timeout``, ``command_timeout``,
    ``ping_interval``, ``ping_timeout``, ``reconnect_base``, ``reconnect_cap``,
    ``max_connections``, ``clock``), plus ``sentinel_password`` for sentinels
    that require one. Past ``max_connections`` concurrent commands a command
    fails with :class:`~tornado_longconn.exceptions.BackendUnavailableError`
    (redis-py's Sentinel pool does not wait).

    Raises :class:`ValueError` for a bad URL (see :func:`parse_sentinel_url`).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float = 5.0,
        reconnect_base: float = 0.05,
        reconnect_cap: float = 5.0,
        max_connections: int = 64,
        sentinel_password: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        sentinels, service, db, password = parse_sentinel_url(url)
        self.service = service
        self.sentinels: Sequence[tuple[str, int]] = sentinels
        sentinel_kwargs = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": command_timeout,
            "password": sentinel_password,
        }
        self._sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
        client: aioredis.Redis = self._sentinel.master_for(
            service,
            db=db,
            password=password,
            max_connections=max_connections,
            socket_connect_timeout=connect_timeout,
            socket_timeout=command_timeout,
            protocol=2,  # RESP2, as the plain Redis backend (see there)
            retry=Retry(NoBackoff(), 0),
        )
        super().__init__(
            client,
            prefix=prefix,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            reconnect_base=reconnect_base,
            reconnect_cap=reconnect_cap,
            max_connections=max_connections,
            clock=clock,
        )
        self._owns_client = True  # made here: close() closes it
        self.url = url
        self._publish_script = self._client.register_script(_SENTINEL_PUBLISH_LUA)
        self._since_script = self._client.register_script(_SENTINEL_SINCE_LUA)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<SentinelRedisBackend {self.service!r} {self.prefix!r} {state}>"

    async def close(self) -> None:
        """As :meth:`RedisBackend.close`; also closes the connections to the sentinels."""
        if self.closed:
            return
        await super().close()
        for sentinel in self._sentinel.sentinels:
            await sentinel.aclose()
