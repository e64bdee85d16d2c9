"""RedisConnectionCaps against a real Redis: counts of several stores, rewrite, fail-open."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from tests.helpers import REDIS_URL, free_port, require_redis
from tornado_longconn import MemoryBackend
from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.caps_redis import RedisConnectionCaps
from tornado_longconn.ratelimit import (
    ConnectionCaps,
    ConnectionCapStore,
    connection_caps_for,
    connection_caps_of,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]


@pytest.fixture
async def backend() -> AsyncIterator[RedisBackend]:
    await require_redis()
    prefix = f"test:capsr:{secrets.token_hex(4)}:"
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    await backend.start()
    yield backend
    client = backend.redis
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await backend.close()


IP = [("ip", "10.0.0.1", 2)]


async def test_two_stores_share_the_count_and_close_frees_it(backend: RedisBackend) -> None:
    one, two = RedisConnectionCaps(backend, ttl=30), RedisConnectionCaps(backend, ttl=30)
    await one.start()
    await two.start()
    try:
        h1, r1 = await one.acquire_connection(IP)
        h2, r2 = await two.acquire_connection(IP)
        assert (r1, r2) == (None, None)
        assert await two.acquire_connection(IP) == ([], "ip")
        assert await one.count("ip", "10.0.0.1") == 2
        # the first full cap is named, and nothing is left counted under the others
        both = [("user", "ann", 5), ("ip", "10.0.0.1", 2)]
        assert await one.acquire_connection(both) == ([], "ip")
        assert await one.count("user", "ann") == 0
        one.release_connection(h1)
        await one.close()  # waits for the release task, then forgets this process
        assert await two.count("ip", "10.0.0.1") == 1
        held, refused = await two.acquire_connection(IP)
        assert refused is None and two.local_count("ip", "10.0.0.1") == 2
        assert two.counts["acquired"] == 2 and two.counts["refused"] == one.counts["refused"] == 1
        assert two.counts["round_trips"] >= 4
        del h2, held
    finally:
        await one.close()
        await two.close()


async def test_counts_lost_by_redis_are_written_again_at_the_next_refresh(
    backend: RedisBackend,
) -> None:
    caps = RedisConnectionCaps(backend, ttl=30)
    await caps.start()
    try:
        await caps.acquire_connection(IP)
        await caps.acquire_connection([("ip", "10.0.0.1", 2), ("user", "ann", 3)])
        # Redis restarted empty (or reaped us after a stall): our keys are gone
        keys = [k async for k in backend.redis.scan_iter(match=backend.prefix + "*")]
        await backend.redis.delete(*keys)
        assert await caps.count("ip", "10.0.0.1") == 0
        await caps.refresh()
        assert caps.counts["rewrites"] == 1
        assert await caps.count("ip", "10.0.0.1") == 2
        assert await caps.count("user", "ann") == 1
        assert await caps.acquire_connection(IP) == ([], "ip")
    finally:
        await caps.close()


async def test_a_store_that_never_refreshed_is_not_counted(backend: RedisBackend) -> None:
    """A process is alive only while its deadline is ahead (start() sets the first)."""
    dead = RedisConnectionCaps(backend, ttl=30)
    await dead.acquire_connection(IP)  # never started: no deadline
    await dead.acquire_connection(IP)
    live = RedisConnectionCaps(backend, ttl=30)
    await live.start()
    try:
        held, refused = await live.acquire_connection(IP)
        assert refused is None and held == [("ip", "10.0.0.1")]
        await live.refresh()
        assert await live.count("ip", "10.0.0.1") == 1
    finally:
        await live.close()
        await dead.close()


async def test_redis_unreachable_lets_connections_through_and_counts_them() -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    caps = RedisConnectionCaps(backend, ttl=30)
    held, refused = await caps.acquire_connection(IP)
    assert refused is None and held == [("ip", "10.0.0.1")]
    assert caps.counts["unavailable"] == 1 and caps.local_count("ip", "10.0.0.1") == 1
    caps.release_connection(held)
    await caps.close()
    assert caps.local_count("ip", "10.0.0.1") == 0
    await backend.close()


async def test_store_selection() -> None:
    memory = connection_caps_for(MemoryBackend())
    assert isinstance(memory, ConnectionCaps) and isinstance(memory, ConnectionCapStore)
    settings: dict[str, object] = {}
    assert isinstance(connection_caps_of(settings), ConnectionCaps)
    assert connection_caps_of(settings) is settings["longconn_connection_caps"]
    with pytest.raises(TypeError):
        connection_caps_of({"longconn_connection_caps": object()})
    with pytest.raises(TypeError):
        connection_caps_for(object())
    redis_caps = connection_caps_for(RedisBackend(REDIS_URL), ttl=3)
    assert isinstance(redis_caps, RedisConnectionCaps) and redis_caps.ttl == 3
    with pytest.raises(ValueError, match="ttl"):
        RedisConnectionCaps(RedisBackend(REDIS_URL), ttl=0)
