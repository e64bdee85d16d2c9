"""The Redis backend on a Redis Cluster: sharded pub/sub, one slot per topic.

``ClusterRedisBackend`` keeps the keys, encoding and one-round-trip scripts of
:class:`~tornado_longconn.backends.redis.RedisBackend`, on a Redis Cluster
(Redis >= 7):

* **One slot per topic.** Every key of a topic and its channel carry the hash tag
  ``{T}`` (``P{T}:m``, ``P{T}:h``, channel ``P{T}``), so the publish script runs on
  the one master that owns the topic's slot, in one round trip.
* **Sharded pub/sub.** The script ``SPUBLISH``-es instead of ``PUBLISH``-ing, so
  fan-out traffic stays on the shard that owns the topic (plain ``PUBLISH`` is
  copied to every node of the cluster). Each process holds one pub/sub
  connection per master that owns a subscribed topic, and ``SSUBSCRIBE``-s there.
* **History reads** publish their catch-up marker on the topic's own channel
  (a marker other processes ignore), since a script may only touch its slot.
* **Slot migration and failover.** When a master dies, its pub/sub connection
  drops; when a slot moves, the node ends its subscriptions (``sunsubscribe``).
  Either way the backend asks the cluster for the new slot owners
  (``CLUSTER SLOTS``), subscribes there, and every local subscriber of the
  affected topics gets ``on_gap(topic, "reconnect")`` once the new subscription
  is confirmed.
* **Nothing lost silently on failover.** As with Sentinel
  (:mod:`~tornado_longconn.backends.redis_sentinel`), each topic records the
  master's replication ID with its epoch; a promoted replica (which may lack the
  last writes of the old master) starts a new epoch for each topic it serves,
  and clients holding old cursors get an explicit gap (reason ``"epoch"``).

Needs redis-py's ``redis.asyncio.RedisCluster`` (redis-py >= 5).
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
from typing import Any, cast
from urllib.parse import unquote

from redis.asyncio import Connection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisError, SlotNotCoveredError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._tornado.redispy import RawConnection, pubsub_connection
from ..exceptions import BackendError, BackendUnavailableError
from ..logfields import log_fields
from .base import Subscriber
from .redis import _PUBLISH_LUA, _SINCE_LUA, _UNAVAILABLE, DEFAULT_PREFIX, RedisBackend, _Topic
from .redis_sentinel import _checked

__all__ = ["ClusterRedisBackend", "parse_cluster_url"]

log = logging.getLogger("tornado_longconn.backends")

_PUBLISH_CALL = "redis.call('PUBLISH', ARGV[1], "
_SYNC_CALL = "redis.call('PUBLISH', ARGV[5], ARGV[6])"


def _sharded(publish: str, since: str) -> tuple[str, str]:
    if publish.count(_PUBLISH_CALL) != 1 or since.count(_SYNC_CALL) != 1:
        raise RuntimeError("the Redis backend's scripts changed: update redis_cluster.py")
    return (
        _checked(publish).replace(_PUBLISH_CALL, "redis.call('SPUBLISH', ARGV[1], "),
        _checked(since).replace(
            _SYNC_CALL,
            # The marker goes on the topic's channel (the script's slot): "S<sync> <token>".
            "redis.call('SPUBLISH', string.sub(meta, 1, -3), 'S' .. ARGV[5] .. ' ' .. ARGV[6])",
        ),
    )


_CLUSTER_PUBLISH_LUA, _CLUSTER_SINCE_LUA = _sharded(_PUBLISH_LUA, _SINCE_LUA)

Address = tuple[str, int]


def parse_cluster_url(url: str) -> tuple[list[Address], str | None]:
    """Split ``redis+cluster://[:password@]host:port[,host:port...]``.

    Returns ``(startup nodes, password)``; a node without a port is on 6379.
    Raises :class:`ValueError` for another scheme or no node.
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "redis+cluster" or not sep:
        raise ValueError(f"not a redis+cluster:// URL: {url!r}")
    netloc = rest.partition("/")[0]
    password: str | None = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        password = unquote(auth.partition(":")[2]) or None
    nodes: list[Address] = []
    for host in netloc.split(","):
        if not host:
            continue
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "6379")
        if not port.isdigit():
            raise ValueError(f"bad node address {host!r} in {url!r}")
        nodes.append((name, int(port)))
    if not nodes:
        raise ValueError(f"no cluster node in {url!r}")
    return nodes, password


@dataclass
class _NodePool:
    """What :func:`pubsub_connection` reads to make a connection to one node."""

    connection_kwargs: dict[str, Any]
    connection_class: type[Any] = Connection


@dataclass
class _Shard:
    """This process's pub/sub connection to one master and the channels it holds there."""

    address: Address
    channels: dict[bytes, None] = field(default_factory=dict)
    conn: RawConnection | None = None
    task: asyncio.Task[None] | None = None
    # SUNSUBSCRIBEs sent and not yet confirmed, per channel (any other is a slot move).
    leaving: collections.Counter[bytes] = field(default_factory=collections.Counter)


class ClusterRedisBackend(RedisBackend):
    """:class:`RedisBackend` on a Redis Cluster, with sharded pub/sub (see the module docs).

    ``url`` is ``redis+cluster://[:password@]host:port[,host:port...]`` (startup
    nodes; any reachable one is enough). Keyword arguments as for
    :class:`RedisBackend` (``max_connections`` is per node).

    Raises :class:`ValueError` for a bad URL (see :func:`parse_cluster_url`).
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        nodes, password = parse_cluster_url(url)
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            password=password,
            max_connections=max_connections,
            socket_connect_timeout=connect_timeout,
            socket_timeout=command_timeout,
            protocol=2,
            # No retry after a connection error: a publish whose reply was lost could
            # run twice. MOVED/ASK redirects are still followed (nothing ran yet).
            retry=Retry(NoBackoff(), 0),
        )
        super().__init__(
            cast(Any, client),
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
        self._owns_client = True
        self.url = url
        self._publish_script = self._client.register_script(_CLUSTER_PUBLISH_LUA)
        self._since_script = self._client.register_script(_CLUSTER_SINCE_LUA)
        self._startup = nodes
        self._node_kwargs: dict[str, Any] = {
            "password": password,
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": command_timeout,
            "protocol": 2,
            "decode_responses": False,
            "retry": Retry(NoBackoff(), 0),
        }
        self._slots: list[tuple[int, int, Address]] = []
        self._shards: dict[Address, _Shard] = {}
        self._refreshing: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<ClusterRedisBackend {self.prefix!r} shards={len(self._shards)}>"

    @property
    def connected(self) -> bool:
        """Whether every shard holding a subscribed topic has its pub/sub connection up."""
        return all(shard.conn is not None for shard in self._shards.values()) and bool(self._slots)

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """As :meth:`RedisBackend._call`; a cluster in failover is "unavailable", not an error."""
        try:
            return await super()._call(script, keys, args)
        except BackendError as exc:
            if isinstance(exc.__cause__, (ClusterDownError, SlotNotCoveredError, TryAgainError)):
                raise BackendUnavailableError(f"Redis Cluster is failing over: {exc}") from exc
            raise

    # -- topology -------------------------------------------------------------------

    async def _refresh_slots(self) -> None:
        """Ask a reachable node for the slot owners (``CLUSTER SLOTS``)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            candidates = list(dict.fromkeys([*self._startup, *(s[2] for s in self._slots)]))
            last: Exception | None = None
            for host, port in candidates:
                conn = pubsub_connection(_NodePool(dict(self._node_kwargs, host=host, port=port)))
                try:
                    await asyncio.wait_for(conn.connect(), self.command_timeout)
                    await conn.send_command("CLUSTER", "SLOTS", check_health=False)
                    reply = await conn.read_response(
                        timeout=self.command_timeout, disconnect_on_error=False
                    )
                except (*_UNAVAILABLE, RedisError) as exc:
                    last = exc
                    continue
                finally:
                    await conn.disconnect(nowait=True)
                slots = []
                for entry in reply:
                    host_b, port_n = entry[2][0], entry[2][1]
                    owner = (host_b.decode() if isinstance(host_b, bytes) else host_b) or host
                    slots.append((int(entry[0]), int(entry[1]), (owner, int(port_n))))
                if slots:
                    self._slots = sorted(slots)
                    return
            raise RedisTimeoutError(f"no cluster node answered CLUSTER SLOTS: {last}")

    def _owner(self, channel: bytes) -> Address | None:
        slot = key_slot(channel)
        for low, high, address in self._slots:
            if low <= slot <= high:
                return address
        return None

    def _shard_for(self, channel: bytes) -> _Shard | None:
        """The shard that should hold ``channel`` (started when new); None: owner unknown."""
        address = self._owner(channel)
        if address is None:
            return None
        shard = self._shards.get(address)
        if shard is None:
            shard = self._shards[address] = _Shard(address)
            shard.task = asyncio.create_task(self._shard_run(shard), name=f"{self!r} {address}")
        shard.channels[channel] = None
        return shard

    # -- lifecycle ------------------------------------------------------------------------

    async def _run(self) -> None:
        """Learn the slot owners, then wait: each shard runs its own task."""
        assert self._first_attempt is not None
        try:
            await self._refresh_slots()
        except (*_UNAVAILABLE, RedisError) as exc:
            log.warning("Redis Cluster topology unavailable: %s", exc, extra=log_fields())
        finally:
            self._first_attempt.set()
        await asyncio.Event().wait()  # until close() cancels it

    async def close(self) -> None:
        """As :meth:`RedisBackend.close`; also closes every shard's pub/sub connection."""
        if self.closed:
            return
        shards = list(self._shards.values())
        self._shards.clear()
        for shard in shards:
            if shard.task is not None:
                shard.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await shard.task
        await super().close()

    # -- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Deliver ``topic``'s messages to ``subscriber`` from now on (idempotent).

        The first local subscriber of a topic makes the backend ``SSUBSCRIBE`` on
        the master owning the topic's slot and wait (at most ``command_timeout``)
        for it to confirm. When that master is unreachable the subscription is
        kept and made when it (or its successor) answers; the subscriber then
        gets ``on_gap(topic, "reconnect")``. Raises
        :class:`~tornado_longconn.exceptions.ConnectionClosedError` after :meth:`close`.
        """
        await self.start()
        state = self._topics.get(topic)
        if state is not None:
            state.subscribers[subscriber] = None
            pending = self._pending.get(state.channel)
            if pending:
                await self._wait_confirmed(topic, pending[-1])
            return
        channel = self._channel(topic)
        state = self._topics[topic] = _Topic(channel)
        state.subscribers[subscriber] = None
        self._by_channel[channel] = topic
        if not self._slots:
            with contextlib.suppress(*_UNAVAILABLE, RedisError):
                await self._refresh_slots()
        shard = self._shard_for(channel)
        if shard is None:
            state.resync = True  # no owner known yet: subscribed when the topology is back
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, collections.deque()).append(future)
        conn = shard.conn
        if conn is not None:
            try:
                await conn.send_command("SSUBSCRIBE", channel, check_health=False)
            except _UNAVAILABLE:
                state.resync = True
                return
        # else the shard's task is connecting and subscribes every channel it holds.
        await self._wait_confirmed(topic, future)

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Stop delivering ``topic`` to ``subscriber`` (no error if it was not subscribed).

        The last local subscriber of a topic makes the backend ``SUNSUBSCRIBE``.
        """
        state = self._topics.get(topic)
        if state is None:
            return
        state.subscribers.pop(subscriber, None)
        if state.subscribers:
            return
        del self._topics[topic]
        self._by_channel.pop(state.channel, None)
        for shard in self._shards.values():
            if state.channel in shard.channels:
                del shard.channels[state.channel]
                if shard.conn is not None:
                    shard.leaving[state.channel] += 1
                    with contextlib.suppress(*_UNAVAILABLE):
                        await shard.conn.send_command(
                            "SUNSUBSCRIBE", state.channel, check_health=False
                        )

    # -- one shard's pub/sub connection --------------------------------------------------------

    async def _shard_run(self, shard: _Shard) -> None:
        """Keep the shard's connection up; move its channels when their slots move."""
        while shard.channels and self._shards.get(shard.address) is shard:
            conn: RawConnection | None = None
            try:
                host, port = shard.address
                conn = pubsub_connection(_NodePool(dict(self._node_kwargs, host=host, port=port)))
                await asyncio.wait_for(conn.connect(), self.command_timeout)
                shard.conn = conn
                shard.leaving.clear()
                self._conn = conn  # "some pub/sub is up": history reads wait for markers
                for channel in list(shard.channels):
                    await conn.send_command("SSUBSCRIBE", channel, check_health=False)
                await self._shard_read(shard, conn)
            except _UNAVAILABLE as exc:
                log.warning(
                    "Redis Cluster pub/sub to %s:%s lost or refused: %s",
                    *shard.address,
                    exc,
                    extra=log_fields(),
                )
            except RedisError as exc:
                log.warning(
                    "Redis Cluster pub/sub to %s:%s: %s", *shard.address, exc, extra=log_fields()
                )
            finally:
                shard.conn = None
                if self._conn is conn:
                    self._conn = next(
                        (s.conn for s in self._shards.values() if s.conn is not None), None
                    )
                self._lost(shard.channels)
                if conn is not None:
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(self._backoff.next_delay())  # a deadline, not a poll
            with contextlib.suppress(*_UNAVAILABLE, RedisError):
                await self._refresh_slots()
            self._reassign(shard)
        if self._shards.get(shard.address) is shard:
            del self._shards[shard.address]

    def _lost(self, channels: dict[bytes, None]) -> None:
        """The subscriptions of ``channels`` are gone: gap when they are made again."""
        for channel in channels:
            topic = self._by_channel.get(channel)
            state = self._topics.get(topic) if topic is not None else None
            if state is not None:
                state.resync = True
                state.last = None
            for future in self._pending.pop(channel, ()):
                if not future.done():
                    future.set_result(None)

    def _reassign(self, shard: _Shard) -> None:
        """Move the channels whose slot another master owns now to that master's shard."""
        for channel in list(shard.channels):
            owner = self._owner(channel)
            if owner is not None and owner != shard.address:
                del shard.channels[channel]
                target = self._shard_for(channel)
                if target is not None and target.conn is not None:
                    self._tasks.add(asyncio.create_task(self._resubscribe(target.conn, channel)))

    async def _resubscribe(self, conn: RawConnection, channel: bytes) -> None:
        # A failure drops that connection; its task subscribes everything again.
        with contextlib.suppress(*_UNAVAILABLE, RedisError):
            await conn.send_command("SSUBSCRIBE", channel, check_health=False)

    async def _shard_read(self, shard: _Shard, conn: RawConnection) -> None:
        waiting_pong = False
        idle = math.inf if self.ping_interval is None else self.ping_interval
        while True:
            response = await conn.read_response(
                timeout=self.ping_timeout if waiting_pong else idle, disconnect_on_error=False
            )
            if response is None:
                if waiting_pong:
                    raise RedisTimeoutError(f"no PONG within {self.ping_timeout} s")
                await conn.send_command("PING", check_health=False)
                waiting_pong = True
                continue
            waiting_pong = False
            self._backoff.reset()
            if isinstance(response, RedisError):
                raise response  # e.g. MOVED for an SSUBSCRIBE: ask for the slots again
            kind = response[0]
            if kind == b"smessage":
                self._on_payload(response[1], response[2])
            elif kind == b"ssubscribe":
                self._on_subscribed(response[1])
            elif kind == b"sunsubscribe":
                if shard.leaving[response[1]] > 0:
                    shard.leaving[response[1]] -= 1
                elif response[1] in shard.channels:
                    # Not asked for: the slot moved to another master.
                    raise RedisError(f"slot of {response[1]!r} moved")

    def _on_payload(self, channel: bytes, payload: bytes) -> None:
        if payload[:1] == b"S":  # a history read's marker (see since())
            sync_channel, _, token = payload[1:].rpartition(b" ")
            if sync_channel == self._sync_channel:
                future = self._syncs.get(token)
                if future is not None and not future.done():
                    future.set_result(None)
            return
        super()._on_payload(channel, payload)
