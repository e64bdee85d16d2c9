"""LongPollHandler over real sockets: JSON shapes, errors, gaps, wake-ups, disconnects."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import tornado.web
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import WaiterServer as Server
from tests.helpers import run_on_suite_loop, wait_until
from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.log import HistoryLimit
from tornado_longconn.longpoll import LongPollHandler, LongPollMixin, LongPollWaiter
from tornado_longconn.testing import AppServer, scaled

HISTORY = HistoryLimit(max_messages=5)


class GuardedPoll(LongPollMixin):
    """A user handler: own authentication, then the mixin."""

    def initialize(self, waiter: LongPollWaiter) -> None:
        self.longpoll_waiter = waiter

    async def get(self) -> None:
        if self.get_query_argument("token", "") != "secret":
            raise tornado.web.HTTPError(403)
        await self.long_poll("room")


@pytest.fixture
async def srv() -> AsyncIterator[Server]:
    backend = MemoryBackend(epoch="ep")
    waiter = LongPollWaiter(backend, max_timeout=30, linger=0)
    app = tornado.web.Application(
        [
            (r"/poll/(?P<topic>[a-z]+)", LongPollHandler, {"waiter": waiter}),
            (r"/fixed", LongPollHandler, {"waiter": waiter, "topic": "room"}),
            (r"/guarded", GuardedPoll, {"waiter": waiter}),
        ]
    )
    async with AppServer(app) as server:
        yield Server(server, backend, waiter)
    await waiter.close()


async def _until_waiting(waiter: LongPollWaiter, n: int) -> None:
    await wait_until(lambda: waiter.waiting == n)


async def _until_parked_or_done(waiter: LongPollWaiter, pending: asyncio.Future[Any]) -> None:
    await wait_until(lambda: waiter.stats().parked == 1 or pending.done())


async def test_json_shape_text_and_binary(srv: Server) -> None:
    await srv.backend.publish("room", "hello", history=HISTORY)
    await srv.backend.publish("room", b"\x00\x01\xff", history=HISTORY)
    async with httpx.AsyncClient() as client:
        r = await client.get(srv.url("/poll/room"), params={"cursor": "ep-0", "timeout": "5"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["cache-control"] == "no-store"
    assert r.json() == {
        "messages": [
            {"cursor": "ep-1", "data": "hello"},
            {"cursor": "ep-2", "data": base64.b64encode(b"\x00\x01\xff").decode(), "binary": True},
        ],
        "cursor": "ep-2",
        "gap": False,
        "reason": None,
    }


async def test_timeout_and_no_cursor(srv: Server) -> None:
    await srv.backend.publish("room", "x", history=HISTORY)
    async with httpx.AsyncClient() as client:
        r = await client.get(srv.url("/fixed"), params={"timeout": "0"})
        assert r.json() == {"messages": [], "cursor": "ep-1", "gap": False, "reason": None}
        r = await client.get(srv.url("/fixed"), params={"cursor": "ep-1", "timeout": "0.02"})
        assert r.json() == {"messages": [], "cursor": "ep-1", "gap": False, "reason": None}


async def test_waits_then_answers_on_publish(srv: Server) -> None:
    async with httpx.AsyncClient(timeout=scaled(10)) as client:
        pending = asyncio.ensure_future(client.get(srv.url("/poll/room"), params={"timeout": "20"}))
        await wait_until(lambda: srv.waiter.stats().parked == 1)
        await srv.backend.publish("room", "now", history=HISTORY)
        r = await pending
    assert r.json()["messages"] == [{"cursor": "ep-1", "data": "now"}]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"cursor": "garbage"}, "cursor"),
        ({"cursor": "ep-01"}, "cursor"),
        ({"cursor": "ep-1", "timeout": "-1"}, "timeout"),
        ({"cursor": "ep-1", "timeout": "soon"}, "timeout"),
        ({"cursor": "ep-1", "timeout": "nan"}, "timeout"),
    ],
)
async def test_bad_arguments_are_400(srv: Server, params: dict[str, str], match: str) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(srv.url("/poll/room"), params=params)
    assert r.status_code == 400
    assert match in r.json()["error"]
    assert srv.waiter.waiting == 0


async def test_evicted_and_foreign_epoch_cursor_get_gap_answer(srv: Server) -> None:
    for i in range(8):
        await srv.backend.publish("room", str(i), history=HISTORY)
    async with httpx.AsyncClient() as client:
        for cursor, reason in (("ep-1", "evicted"), ("deadbeef-3", "epoch")):
            r = await client.get(srv.url("/poll/room"), params={"cursor": cursor})
            assert r.status_code == 200
            assert r.json() == {"messages": [], "cursor": "ep-8", "gap": True, "reason": reason}
        # the client resyncs and continues from the cursor it was given
        r = await client.get(srv.url("/poll/room"), params={"cursor": "ep-8", "timeout": "0"})
        assert r.json()["gap"] is False


async def test_user_mixin_handler(srv: Server) -> None:
    await srv.backend.publish("room", "x", history=HISTORY)
    async with httpx.AsyncClient() as client:
        assert (await client.get(srv.url("/guarded"))).status_code == 403
        r = await client.get(srv.url("/guarded"), params={"token": "secret", "cursor": "ep-0"})
    assert r.json()["messages"] == [{"cursor": "ep-1", "data": "x"}]


async def test_full_waiter_is_503(srv: Server) -> None:
    srv.waiter.max_waiters = 1
    async with httpx.AsyncClient(timeout=scaled(10)) as client:
        first = asyncio.ensure_future(client.get(srv.url("/poll/room"), params={"timeout": "20"}))
        await wait_until(lambda: srv.waiter.stats().parked == 1)
        r = await client.get(srv.url("/poll/room"))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        await srv.backend.publish("room", "x", history=HISTORY)
        assert (await first).status_code == 200


async def _raw_get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _read_response(reader: asyncio.StreamReader) -> Any:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    return json.loads(await reader.readexactly(length))


async def test_1000_abandoned_polls_leave_no_waiters(srv: Server) -> None:
    conns = []
    for start in range(0, 1000, 100):  # connect in batches; the backlog is finite
        conns += await asyncio.gather(
            *(_raw_get(srv.server.port, "/poll/room?timeout=30") for _ in range(start, start + 100))
        )
        await _until_waiting(srv.waiter, len(conns))
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    await wait_until(lambda: srv.waiter.waiting == 0)
    stats = srv.waiter.stats()
    assert stats.cancelled == 1000 and stats.waiting == 0
    assert stats.parked == 0
    # nothing is answered to the gone clients, and a later publish finds nobody
    await srv.backend.publish("room", "late", history=HISTORY)
    assert srv.waiter.stats().woken == 0


async def test_one_publish_answers_500_http_polls(srv: Server) -> None:
    conns = []
    for start in range(0, 500, 100):
        conns += await asyncio.gather(
            *(
                _raw_get(srv.server.port, "/poll/room?cursor=ep-0&timeout=30")
                for _ in range(start, start + 100)
            )
        )
        await _until_waiting(srv.waiter, len(conns))
    await srv.backend.publish("room", "go", history=HISTORY)
    bodies = await asyncio.wait_for(
        asyncio.gather(*(_read_response(r) for r, _ in conns)), scaled(30)
    )
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    assert len(bodies) == 500
    assert all(
        b
        == {
            "messages": [{"cursor": "ep-1", "data": "go"}],
            "cursor": "ep-1",
            "gap": False,
            "reason": None,
        }
        for b in bodies
    )
    assert srv.waiter.stats().woken == 500


# publish n messages | poll and keep the answer | poll and lose the answer |
# start a waiting poll, publish, and the client hangs up before the answer
_http_step = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 4)),
    st.tuples(st.just("poll"), st.booleans()),
    st.just(("hang_up", None)),
    st.tuples(st.just("wait_then_publish"), st.booleans()),
)


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(_http_step, max_size=12))
def test_http_client_losing_answers_gets_every_message_once_in_order(
    steps: list[tuple[str, Any]],
) -> None:
    async def scenario() -> None:
        backend = MemoryBackend(epoch="ep")
        waiter = LongPollWaiter(backend, "room", recent=4, max_batch=3, linger=0)
        app = tornado.web.Application([(r"/poll", LongPollHandler, {"waiter": waiter})])
        published: list[str] = []
        received: list[str] = []
        cursor: str | None = None

        async def pub(n: int) -> None:
            for _ in range(n):
                published.append(f"m{len(published)}")
                await backend.publish("room", published[-1], history=HistoryLimit(1000))

        def take(body: dict[str, Any], lost: bool) -> None:
            nonlocal cursor
            assert body["gap"] is False
            if not lost:
                received.extend(m["data"] for m in body["messages"])
                cursor = body["cursor"]

        def params(timeout: float) -> dict[str, str]:
            return {"timeout": str(timeout)} | ({"cursor": cursor} if cursor else {})

        async with AppServer(app) as server, httpx.AsyncClient(timeout=scaled(10)) as client:
            url = server.url("/poll")
            take((await client.get(url, params=params(0))).json(), lost=False)
            for kind, arg in steps:
                if kind == "publish":
                    await pub(arg)
                elif kind == "poll":
                    take((await client.get(url, params=params(0))).json(), lost=arg)
                elif kind == "hang_up":
                    async with httpx.AsyncClient(timeout=scaled(10)) as other:
                        pending = asyncio.ensure_future(other.get(url, params=params(30)))
                        # (it may have been answered at once: that answer is lost too)
                        await _until_parked_or_done(waiter, pending)
                        pending.cancel()  # the client goes away; so does its answer
                        with contextlib.suppress(asyncio.CancelledError):
                            await pending
                    await wait_until(lambda: waiter.waiting == 0)
                else:
                    pending = asyncio.ensure_future(client.get(url, params=params(30)))
                    await _until_parked_or_done(waiter, pending)
                    await pub(1)
                    take((await pending).json(), lost=arg)
            while True:
                body = (await client.get(url, params=params(0))).json()
                take(body, lost=False)
                if not body["messages"]:
                    break
        assert received == published
        await waiter.close()

    run_on_suite_loop(scenario())
