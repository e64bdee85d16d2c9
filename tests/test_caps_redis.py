"""RedisConnectionCaps against a real Redis: counts of several stores, rewrite, fail-open."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
import tornado.web

from tests.helpers import REDIS_URL, free_port, require_redis
from tornado_longconn import BroadcastHub, MemoryBackend
from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.caps_redis import RedisConnectionCaps
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.ratelimit import (
    ConnectionCaps,
    ConnectionCapStore,
    connection_caps_for,
    connection_caps_of,
)
from tornado_longconn.subscriptions import subscription_stats
from tornado_longconn.subscriptions_http import SubscriptionPollHandler
from tornado_longconn.testing import AppServer, scaled

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


async def test_a_refresh_removes_the_counts_of_a_process_whose_deadline_passed(
    backend: RedisBackend,
) -> None:
    dead, live = RedisConnectionCaps(backend, ttl=30), RedisConnectionCaps(backend, ttl=30)
    await dead.start()
    await live.start()
    try:
        await dead.acquire_connection([("ip", "10.0.0.1", 5), ("user", "ann", 5)])
        await live.acquire_connection(IP)
        assert await live.count("ip", "10.0.0.1") == 2
        # the dead process's deadline passed (its refresh task stopped long ago)
        await dead._stop_refresher()
        procs = f"{backend.prefix}{{caps}}:procs"
        await backend.redis.zadd(procs, {dead.process: 0})
        await live.refresh()
        assert live.counts["reaped"] == 1
        assert await live.count("ip", "10.0.0.1") == 1
        hashes = [k async for k in backend.redis.scan_iter(match=backend.prefix + "{caps}:c:*")]
        for key in hashes:
            assert dead.process.encode() not in await backend.redis.hkeys(key)
        assert not await backend.redis.exists(f"{backend.prefix}{{caps}}:p:{dead.process}")
        assert await backend.redis.zscore(procs, dead.process) is None
    finally:
        await dead.close()
        await live.close()


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


class CappedPoll(SubscriptionPollHandler):
    max_connections_per_ip = 1


async def test_http_polls_count_against_other_processes(backend: RedisBackend) -> None:
    """A long-poll is refused (429) when another process holds the address's slot."""
    here = RedisConnectionCaps(backend, ttl=30)
    other = RedisConnectionCaps(backend, ttl=30)  # another process, same Redis
    await here.start()
    await other.start()
    hub = BroadcastHub(MemoryBackend(epoch="ep"), history=10)
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [(r"/poll", CappedPoll, {"hub": hub, "waiter": waiter})], longconn_connection_caps=here
    )
    try:
        async with AppServer(app) as server, httpx.AsyncClient(timeout=scaled(10)) as client:
            params = {"topics": "room", "timeout": "0"}
            held, refused = await other.acquire_connection([("ip", "127.0.0.1", 1)])
            assert refused is None
            answer = await client.get(server.url("/poll"), params=params)
            assert answer.status_code == 429 and answer.json()["code"] == "limit"
            assert dict(subscription_stats(app).refused) == {"ip": 1}
            other.release_connection(held)
            await other.close()  # waits for the release
            assert (await client.get(server.url("/poll"), params=params)).status_code == 200
            assert here.local_count("ip", "127.0.0.1") == 0  # the poll's slot was released
    finally:
        await waiter.close()
        await hub.close(spread=0)
        await here.close()
        await other.close()
