"""The Python client across a server restart on the Redis backend: nothing is lost."""

from __future__ import annotations

import secrets

import pytest

from tests.helpers import REDIS_URL, require_redis, wait_until
from tests.test_client import FAST, Proxy, make_app, publish, take, values
from tornado_longconn import BroadcastHub
from tornado_longconn.client import TopicMessage, connect
from tornado_longconn.testing import AppServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]


async def test_redis_server_restart_loses_nothing_and_needs_no_resync() -> None:
    await require_redis()
    from tornado_longconn.backends.redis import RedisBackend

    prefix = f"test-client-{secrets.token_hex(4)}:"
    hub1 = BroadcastHub(RedisBackend(REDIS_URL, prefix=prefix), history=100)
    server1 = AppServer(make_app(hub1)).start()
    async with Proxy(server1.port) as proxy, connect(proxy.ws_url("/ws"), **FAST) as client:
        room = await client.subscribe("room:1")
        await publish(hub1, "room:1", 1)
        assert values(await take(room, 1)) == [1]
        await server1.stop()
        await hub1.close(spread=0)
        await hub1.backend.close()
        await wait_until(lambda: client.transport is None)
        # Another process takes over; messages published while the client is away
        # are in Redis' history, with the same epoch.
        hub2 = BroadcastHub(RedisBackend(REDIS_URL, prefix=prefix), history=100)
        try:
            await publish(hub2, "room:1", 2)
            await publish(hub2, "room:1", 3)
            async with AppServer(make_app(hub2)) as server2:
                proxy.target = server2.port
                events = await take(room, 2)
                assert all(isinstance(e, TopicMessage) for e in events)
                assert values(events) == [2, 3]
                await publish(hub2, "room:1", 4)
                assert values(await take(room, 1)) == [4]
                stats = client.stats()
                assert stats.resyncs == 0 and stats.connects == 2 and stats.dropped == 0
        finally:
            await hub2.close(spread=0)
            await hub2.backend.close()
