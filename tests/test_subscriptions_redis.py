"""The subscriptions protocol on the Redis backend: two processes' hubs, resume across them."""

from __future__ import annotations

import json
import secrets

import pytest
import tornado.web

from tests.helpers import REDIS_URL, require_redis
from tests.test_subscriptions import Live, connect
from tornado_longconn import BroadcastHub, subscription_group
from tornado_longconn.testing import AppServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


async def test_resume_on_another_process_over_redis() -> None:
    await require_redis()
    from tornado_longconn.backends.redis import RedisBackend

    prefix = f"test-subs-{secrets.token_hex(4)}:"
    hubs = [BroadcastHub(RedisBackend(REDIS_URL, prefix=prefix), history=100) for _ in range(2)]
    try:
        first = tornado.web.Application([(r"/ws", Live, {"hub": hubs[0]})])
        second = tornado.web.Application([(r"/ws", Live, {"hub": hubs[1]})])
        async with AppServer(first) as one, AppServer(second) as two:
            a = await connect(one)
            await a.request("subscribe", topic="room:r")
            subscribed = await a.recv()
            assert subscribed["type"] == "subscribed"
            epoch = subscribed["cursor"].split("-")[0]
            b = await connect(two)
            await b.request("publish", topic="room:r", data={"n": 1})
            frames = [await b.recv()]
            assert frames[0]["type"] == "published"
            message = await a.recv()
            assert message == {"topic": "room:r", "cursor": f"{epoch}-1", "data": {"n": 1}}
            await a.ws.close()
            # Published while the client is away, from the first process.
            for n in (2, 3):
                await subscription_group(hubs[0], "room:r").publish(json.dumps({"n": n}))
            # It comes back on the second process with its cursor: 2, 3, then live 4.
            c = await connect(two)
            await c.request("subscribe", topic="room:r", cursor=message["cursor"])
            assert (await c.recv())["cursor"] == f"{epoch}-3"
            await b.request("publish", topic="room:r", data={"n": 4})
            got = [await c.recv() for _ in range(3)]
            assert [m["data"]["n"] for m in got] == [2, 3, 4]
            assert [m["cursor"] for m in got] == [f"{epoch}-{n}" for n in (2, 3, 4)]
            await b.ws.close()
            await c.ws.close()
    finally:
        for hub in hubs:
            await hub.close(spread=0)
            await hub.backend.close()
