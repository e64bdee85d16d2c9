"""Long-poll and SSE across processes: two Redis backends stand for two processes."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import tornado.web
from httpx_sse import aconnect_sse

from tests.helpers import REDIS_URL, require_redis
from tornado_longconn.log import HistoryLimit
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.sse import SSEHandler
from tornado_longconn.testing import AppServer, scaled

redis_backend = pytest.importorskip("tornado_longconn.backends.redis")
RedisBackend = redis_backend.RedisBackend

pytestmark = pytest.mark.redis

HISTORY = HistoryLimit(max_messages=50)


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Any, Any]]:
    await require_redis()
    prefix = f"test-lp-{secrets.token_hex(4)}:"
    a = RedisBackend(REDIS_URL, prefix=prefix)
    b = RedisBackend(REDIS_URL, prefix=prefix)
    await asyncio.wait_for(asyncio.gather(a.start(), b.start()), scaled(10))
    yield a, b
    await a.close()
    await b.close()


async def test_poll_in_one_process_woken_by_publish_in_another(
    backends: tuple[Any, Any],
) -> None:
    a, b = backends
    waiter = LongPollWaiter(a, "room")
    first = await b.publish("room", "one", history=HISTORY)
    got = await waiter.wait(None, timeout=0)
    assert got.cursor == first.cursor
    pending = asyncio.ensure_future(waiter.wait(got.cursor, timeout=30))
    # whether the wait registered before the publish or not, it sees message two
    await b.publish("room", "two", history=HISTORY)
    result = await asyncio.wait_for(pending, scaled(5))
    assert [m.data for m in result.messages] == ["two"]
    # three more while nobody waits: the next poll reads them from Redis history
    for word in ("3", "4", "5"):
        await b.publish("room", word, history=HISTORY)
    # (live delivery is asynchronous on Redis: an answer may hold a prefix of them,
    # the next poll with the returned cursor gets the rest, each exactly once)
    got_later: list[str | bytes] = []
    cursor = result.cursor
    while len(got_later) < 3:
        later = await asyncio.wait_for(waiter.wait(cursor, timeout=5), scaled(10))
        assert later.messages and not later.gap
        got_later += [m.data for m in later.messages]
        cursor = later.cursor
    assert got_later == ["3", "4", "5"]
    await waiter.close()


async def test_sse_resumes_on_another_process_from_a_long_poll_cursor(
    backends: tuple[Any, Any],
) -> None:
    a, b = backends
    wa = LongPollWaiter(a)
    wb = LongPollWaiter(b)
    app_a = tornado.web.Application([(r"/poll/(?P<topic>\w+)", LongPollHandler, {"waiter": wa})])
    app_b = tornado.web.Application([(r"/events/(?P<topic>\w+)", SSEHandler, {"waiter": wb})])
    for word in ("a", "b", "c"):
        await a.publish("feed", word, history=HISTORY)
    async with (
        AppServer(app_a) as server_a,
        AppServer(app_b) as server_b,
        httpx.AsyncClient(timeout=scaled(10)) as client,
    ):
        r = await client.get(server_a.url("/poll/feed"), params={"timeout": "0"})
        head = r.json()["cursor"]
        epoch, offset = head.split("-")
        r = await client.get(
            server_a.url("/poll/feed"), params={"cursor": f"{epoch}-1", "timeout": "0"}
        )
        assert [m["data"] for m in r.json()["messages"]] == ["b", "c"]
        async with aconnect_sse(
            client, "GET", server_b.url("/events/feed"), headers={"Last-Event-ID": f"{epoch}-2"}
        ) as es:
            events = es.aiter_sse().__aiter__()
            assert (await asyncio.wait_for(events.__anext__(), scaled(5))).event == "ready"
            first = await asyncio.wait_for(events.__anext__(), scaled(5))
            assert (first.data, first.id) == ("c", head)
            await a.publish("feed", "live", history=HISTORY)
            live = await asyncio.wait_for(events.__anext__(), scaled(5))
            assert (live.data, live.id) == ("live", f"{epoch}-{int(offset) + 1}")
            await events.aclose()  # type: ignore[attr-defined]
    await wa.close()
    await wb.close()
