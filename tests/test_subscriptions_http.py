"""Many topics over one SSE stream and one long-poll, and publish over HTTP (real sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import tornado.web

from tornado_longconn import (
    BroadcastHub,
    LongPollWaiter,
    MemoryBackend,
    SubscriptionPollHandler,
    SubscriptionPublishHandler,
    SubscriptionSSEHandler,
    subscription_group,
)
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(60)


class Hooks:
    def authorize_subscribe(self, topic: str, params: Any) -> bool:
        return not topic.startswith("secret:")

    async def authorize_publish(self, topic: str, data: Any) -> bool:
        return topic != "ro"


class SSE(Hooks, SubscriptionSSEHandler):
    pass


class Poll(Hooks, SubscriptionPollHandler):
    pass


class Publish(Hooks, SubscriptionPublishHandler):
    pass


@pytest.fixture
async def served() -> AsyncIterator[tuple[BroadcastHub, AppServer]]:
    hub = BroadcastHub(MemoryBackend(epoch="ep1"), history=100)
    waiter = LongPollWaiter(hub.backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/events", SSE, {"hub": hub, "waiter": waiter}),
            (r"/poll", Poll, {"hub": hub, "waiter": waiter}),
            (r"/publish", Publish, {"hub": hub}),
        ]
    )
    async with AppServer(app) as server:
        yield hub, server
    await waiter.close()
    await hub.close(spread=0)


async def publish(client: httpx.AsyncClient, server: AppServer, topic: str, data: Any) -> Any:
    response = await client.post(server.url("/publish"), json={"topic": topic, "data": data})
    return response.status_code, response.json()


async def test_publish_over_http(served: tuple[BroadcastHub, AppServer]) -> None:
    _, server = served
    async with httpx.AsyncClient() as client:
        assert await publish(client, server, "room:1", {"a": 1}) == (
            200,
            {"topic": "room:1", "cursor": "ep1-1"},
        )
        status, body = await publish(client, server, "ro", 1)
        assert status == 403 and body["code"] == "forbidden"
        response = await client.post(server.url("/publish"), content=b"{nope")
        assert response.status_code == 400 and response.json()["code"] == "bad_request"
        response = await client.post(server.url("/publish"), json={"topic": "a,b", "data": 1})
        assert response.status_code == 400


async def test_long_poll_many_topics(served: tuple[BroadcastHub, AppServer]) -> None:
    hub, server = served
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        await publish(client, server, "room:1", "old")
        url = server.url("/poll")
        first = await client.get(
            url, params={"topics": "room:1,dm:ann,secret:x", "cursors": "room:1=ep1-0"}
        )
        body = first.json()
        assert body["messages"] == [{"topic": "room:1", "cursor": "ep1-1", "data": "old"}]
        assert body["cursors"] == {"room:1": "ep1-1", "dm:ann": "ep1-0"}
        assert [e["topic"] for e in body["errors"]] == ["secret:x"]
        assert body["errors"][0]["status"] == 403 and body["resync"] == []
        cursors = ",".join(f"{t}={c}" for t, c in body["cursors"].items())
        poll = asyncio.ensure_future(
            client.get(url, params={"topics": "room:1,dm:ann", "cursors": cursors, "timeout": 30})
        )
        # Published before or after the poll parks: either way it is in the answer.
        await publish(client, server, "dm:ann", [1, 2])
        body = (await poll).json()
        assert body["messages"] == [{"topic": "dm:ann", "cursor": "ep1-1", "data": [1, 2]}]
        assert body["cursors"] == {"room:1": "ep1-1", "dm:ann": "ep1-1"}
        # timeout 0 with nothing new: empty answer, cursors unchanged
        cursors = "room:1=ep1-1,dm:ann=ep1-1"
        body = (
            await client.get(
                url, params={"topics": "room:1,dm:ann", "cursors": cursors, "timeout": 0}
            )
        ).json()
        assert body["messages"] == [] and body["cursors"] == {"room:1": "ep1-1", "dm:ann": "ep1-1"}
        # another epoch: resync from the current epoch's start, then its messages
        body = (
            await client.get(url, params={"topics": "room:1", "cursors": "room:1=old9-4"})
        ).json()
        assert body["resync"] == [
            {"type": "resync", "topic": "room:1", "cursor": "ep1-0", "reason": "epoch"}
        ]
        body = (
            await client.get(url, params={"topics": "room:1", "cursors": "room:1=ep1-0"})
        ).json()
        assert [m["data"] for m in body["messages"]] == ["old"]
        for bad in ("room:1=x", "a=b=c", "room:1=ep1-1,room:1=ep1-2", "sp ace="):
            response = await client.get(url, params={"topics": "room:1", "cursors": bad})
            assert response.status_code == 400, bad
        many = ",".join(f"t{i}" for i in range(101))
        response = await client.get(url, params={"topics": many})
        assert response.status_code == 429 and response.json()["code"] == "limit"
    assert hub is not None


async def read_events(lines: AsyncIterator[str], count: int) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    event: dict[str, str] = {}
    async for line in lines:
        if not line:
            if event:
                events.append(event)
                event = {}
                if len(events) == count:
                    return events
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        event[key] = value
    raise AssertionError("stream ended")


async def test_sse_many_topics_resume_with_last_event_id(
    served: tuple[BroadcastHub, AppServer],
) -> None:
    hub, server = served
    group = subscription_group(hub, "room:1")
    await group.publish(json.dumps("a"))
    url = server.url("/events")
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        params = {"topics": "room:1,dm:ann,secret:x", "cursors": "room:1=ep1-0"}
        async with client.stream("GET", url, params=params) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            ready, error, first = await read_events(lines, 3)
            assert ready["event"] == "ready" and ready["id"] == "room:1=ep1-0,dm:ann=ep1-0"
            assert json.loads(error["data"])["topic"] == "secret:x"
            assert json.loads(first["data"]) == {"topic": "room:1", "cursor": "ep1-1", "data": "a"}
            assert first["id"] == "room:1=ep1-1,dm:ann=ep1-0"
            await subscription_group(hub, "dm:ann").publish(json.dumps({"x": 1}))
            (second,) = await read_events(lines, 1)
            assert json.loads(second["data"])["data"] == {"x": 1}
            last_id = second["id"]
        assert last_id == "room:1=ep1-1,dm:ann=ep1-1"
        await group.publish(json.dumps("b"))
        headers = {"Last-Event-ID": last_id}
        params = {"topics": "room:1,dm:ann"}
        async with client.stream("GET", url, params=params, headers=headers) as response:
            lines = response.aiter_lines()
            ready, message = await read_events(lines, 2)
            assert ready["id"] == last_id
            assert json.loads(message["data"])["data"] == "b"
            assert message["id"] == "room:1=ep1-2,dm:ann=ep1-1"
        headers = {"Last-Event-ID": "room:1=zz-1,dm:ann=ep1-1"}
        async with client.stream("GET", url, params=params, headers=headers) as response:
            lines = response.aiter_lines()
            _, resync, m1, m2 = await read_events(lines, 4)
            assert resync["event"] == "resync"
            assert json.loads(resync["data"])["reason"] == "epoch"
            assert [json.loads(m["data"])["data"] for m in (m1, m2)] == ["a", "b"]
        response = await client.get(url, params=params, headers={"Last-Event-ID": "room:1"})
        assert response.status_code == 400
