"""Fixtures for the backend tests: every contract test runs on every backend.

``backend`` is parametrized over ``memory``, ``redis`` and ``nats``. Redis tests use the
server at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) with a unique key
prefix per test, and are skipped with the reason when no server answers there.
``make_peer()`` returns a second backend on the same bus: for Redis a new
``RedisBackend`` with the same prefix (it stands for another process); for the
in-memory backend the same object (one process is all it serves).

NATS tests use a ``nats-server -js`` started once per session on a free port
(:mod:`serverprocs`), with a unique stream prefix per test; they are skipped
with the reason when ``nats-py`` or the ``nats-server`` binary is missing.
``sentinel`` runs on a Sentinel set (a master, a replica, three sentinels) and
``cluster`` on a 3-master Redis Cluster (six nodes), each started once per
session; peers are further backend objects on the same servers.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from backend_helpers import REDIS_URL, require_redis
from serverprocs import NatsServer, RedisCluster, SentinelSet, which

from tornado_longconn.backends import Backend, MemoryBackend


class BackendFactory:
    """Makes backends of one kind on one shared bus and closes them all at the end."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.redis_url: str | None = None  # where to delete this test's keys
        self.prefix = f"test:{secrets.token_hex(6)}:"
        self.made: list[Any] = []

    async def make(self, **kwargs: Any) -> Any:
        if self.kind == "memory":
            if self.made:
                return self.made[0]
            backend: Any = MemoryBackend(**kwargs)
        elif self.kind == "nats":
            from tornado_longconn.backends.nats import NatsBackend

            prefix = self.prefix.replace(":", "")
            backend = NatsBackend(self.url or "", prefix=prefix, storage="memory", **kwargs)
        elif self.kind == "cluster":
            from tornado_longconn.backends.redis_cluster import ClusterRedisBackend

            backend = ClusterRedisBackend(self.url or "", prefix=self.prefix, **kwargs)
        elif self.kind == "sentinel":
            from tornado_longconn.backends.redis_sentinel import SentinelRedisBackend

            backend = SentinelRedisBackend(self.url or "", prefix=self.prefix, **kwargs)
        else:
            from tornado_longconn.backends.redis import RedisBackend

            backend = RedisBackend(REDIS_URL, prefix=self.prefix, **kwargs)
        await backend.start()
        self.made.append(backend)
        return backend

    async def close(self) -> None:
        for backend in self.made:
            await backend.close()
        if self.kind in ("redis", "sentinel") and self.made:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(self.redis_url or REDIS_URL)
            keys = [k async for k in client.scan_iter(match=self.prefix + "*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()
        if self.kind == "nats":
            await _delete_streams(self.url or "", self.prefix.replace(":", "") + "_")


async def _delete_streams(url: str, name_prefix: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if (info.config.name or "").startswith(name_prefix):
                await js.delete_stream(info.config.name or "")
    finally:
        await nc.close()


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A ``nats-server -js`` of this test session (skips when it cannot run)."""
    pytest.importorskip("nats", reason="nats-py is not installed (pip install nats-py)")
    binary = which("nats-server")
    if binary is None:
        pytest.skip("no nats-server binary on PATH (apt-get install nats-server)")
    server = NatsServer(binary)
    server.start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def sentinel_set() -> Iterator[SentinelSet]:
    """A Sentinel set of this test session (skips when it cannot run)."""
    pytest.importorskip("redis.asyncio", reason="the redis package is not installed")
    binary = which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on PATH (apt-get install redis-server)")
    servers = SentinelSet(binary)
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster of this test session (skips when it cannot run)."""
    pytest.importorskip("redis.asyncio.cluster", reason="the redis package is not installed")
    binary, cli = which("redis-server"), which("redis-cli")
    if binary is None or cli is None:
        pytest.skip("no redis-server/redis-cli binary on PATH (apt-get install redis-server)")
    cluster = RedisCluster(binary, cli)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(
    params=["memory", pytest.param("redis", marks=pytest.mark.redis), "nats", "sentinel", "cluster"]
)
async def backends(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """A :class:`BackendFactory` for each backend kind."""
    url = None
    if request.param == "redis":
        await require_redis()
    elif request.param == "nats":
        url = request.getfixturevalue("nats_url")
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    elif request.param == "sentinel":
        sentinels: SentinelSet = request.getfixturevalue("sentinel_set")
        url = sentinels.url
    factory = BackendFactory(request.param, url)
    if request.param == "sentinel":
        factory.redis_url = f"redis://127.0.0.1:{sentinels.master.port}/0"
    try:
        yield factory
    finally:
        await factory.close()


@pytest.fixture
async def backend(backends: BackendFactory) -> Backend:
    """A started backend of each kind (closed at the end of the test)."""
    made: Backend = await backends.make()
    return made


@pytest.fixture
def make_peer(backends: BackendFactory) -> Callable[[], Awaitable[Any]]:
    """Another backend on the same bus ("another process" for Redis)."""
    return backends.make
