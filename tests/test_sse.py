"""SSEHandler with a real SSE client (httpx-sse): events, resume, keep-alive, gaps."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import tornado.web
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse
from httpx_sse._decoders import SSEDecoder
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import WaiterServer, wait_until
from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.log import Cursor, HistoryLimit, Message
from tornado_longconn.longpoll import LongPollWaiter, PollResult
from tornado_longconn.sse import SSEHandler, format_comment, format_event, format_result
from tornado_longconn.testing import AppServer, scaled

HISTORY = HistoryLimit(max_messages=10)


class Server(WaiterServer):
    def url(self, path: str = "/events/room") -> str:
        return super().url(path)

    async def publish(self, data: str | bytes) -> Message:
        return await self.backend.publish("room", data, history=HISTORY)


@pytest.fixture
async def srv() -> AsyncIterator[Server]:
    backend = MemoryBackend(epoch="ep")
    waiter = LongPollWaiter(backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/events/(?P<topic>[a-z]+)", SSEHandler, {"waiter": waiter}),
            (
                r"/quick",
                SSEHandler,
                {"waiter": waiter, "topic": "room", "keepalive": scaled(0.02), "retry": 500},
            ),
            (
                r"/slow",
                SSEHandler,
                {
                    "waiter": waiter,
                    "topic": "big",
                    "high_water": 16 * 1024,
                    "stall_timeout": scaled(0.2),
                },
            ),
        ]
    )
    async with AppServer(app) as server:
        yield Server(server, backend, waiter)
    await waiter.close()


async def _next(source: AsyncIterator[ServerSentEvent]) -> ServerSentEvent:
    return await asyncio.wait_for(source.__anext__(), scaled(5))


def _events(es: EventSource) -> AsyncIterator[ServerSentEvent]:
    return es.aiter_sse().__aiter__()


async def test_stream_ready_messages_binary_multiline(srv: Server) -> None:
    await srv.publish("before")  # not sent: no cursor means from now on
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as client,
        aconnect_sse(client, "GET", srv.url()) as es,
    ):
        assert es.response.headers["content-type"].startswith("text/event-stream")
        events = _events(es)
        ready = await _next(events)
        assert ready.event == "ready" and ready.id == "ep-1" and ready.retry == 3000
        assert json.loads(ready.data) == {"cursor": "ep-1"}
        await srv.publish("one\ntwo\r\nthree")
        await srv.publish(b"\x00\xfe")
        text = await _next(events)
        assert (text.event, text.id, text.data) == ("message", "ep-2", "one\ntwo\nthree")
        binary = await _next(events)
        assert (binary.event, binary.id) == ("binary", "ep-3")
        assert base64.b64decode(binary.data) == b"\x00\xfe"
        await events.aclose()  # type: ignore[attr-defined]
    await wait_until(lambda: srv.waiter.stats().streams == 0 and srv.waiter.waiting == 0)


async def test_resume_with_last_event_id_after_reconnect(srv: Server) -> None:
    async with httpx.AsyncClient(timeout=scaled(10)) as client:
        async with aconnect_sse(client, "GET", srv.url()) as es:
            events = _events(es)
            last_id = (await _next(events)).id
            for word in ("a", "b"):
                await srv.publish(word)
            received = [await _next(events), await _next(events)]
            last_id = received[-1].id
            await events.aclose()  # type: ignore[attr-defined]
        # the client is away; three messages are published meanwhile
        await wait_until(lambda: srv.waiter.stats().streams == 0)
        for word in ("c", "d", "e"):
            await srv.publish(word)
        # reconnect like EventSource does: same URL plus Last-Event-ID
        async with aconnect_sse(client, "GET", srv.url(), headers={"Last-Event-ID": last_id}) as es:
            events = _events(es)
            ready = await _next(events)
            assert ready.event == "ready" and ready.id == last_id == "ep-2"
            received += [await _next(events) for _ in range(3)]
            await srv.publish("f")
            received.append(await _next(events))
            await events.aclose()  # type: ignore[attr-defined]
    assert [e.data for e in received] == ["a", "b", "c", "d", "e", "f"]
    assert [e.id for e in received] == [f"ep-{n}" for n in range(1, 7)]


async def test_header_wins_over_query_cursor(srv: Server) -> None:
    for word in ("a", "b", "c"):
        await srv.publish(word)
    async with httpx.AsyncClient(timeout=scaled(10)) as client:
        async with aconnect_sse(client, "GET", srv.url(), params={"cursor": "ep-1"}) as es:
            events = _events(es)
            assert (await _next(events)).id == "ep-1"
            assert [(await _next(events)).data for _ in range(2)] == ["b", "c"]
            await events.aclose()  # type: ignore[attr-defined]
        async with aconnect_sse(
            client, "GET", srv.url(), params={"cursor": "ep-0"}, headers={"Last-Event-ID": "ep-2"}
        ) as es:
            events = _events(es)
            await _next(events)
            assert (await _next(events)).data == "c"
            await events.aclose()  # type: ignore[attr-defined]


async def test_gap_is_a_resync_event(srv: Server) -> None:
    for i in range(15):
        await srv.publish(str(i))
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as client,
        aconnect_sse(client, "GET", srv.url(), headers={"Last-Event-ID": "old-3"}) as es,
    ):
        events = _events(es)
        assert (await _next(events)).event == "ready"
        resync = await _next(events)
        assert resync.event == "resync" and resync.id == "ep-15"
        assert json.loads(resync.data) == {"cursor": "ep-15", "reason": "epoch"}
        await srv.publish("after")
        after = await _next(events)
        assert (after.data, after.id) == ("after", "ep-16")
        await events.aclose()  # type: ignore[attr-defined]


async def test_evicted_cursor_is_a_resync_event(srv: Server) -> None:
    for i in range(15):
        await srv.publish(str(i))
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as client,
        aconnect_sse(client, "GET", srv.url(), params={"cursor": "ep-2"}) as es,
    ):
        events = _events(es)
        await _next(events)
        resync = await _next(events)
        assert resync.event == "resync" and json.loads(resync.data)["reason"] == "evicted"
        await events.aclose()  # type: ignore[attr-defined]


async def test_keepalive_comments_and_retry_hint(srv: Server) -> None:
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as client,
        client.stream("GET", srv.url("/quick")) as response,
    ):
        lines = response.aiter_lines().__aiter__()
        seen: list[str] = []
        while seen.count(": keep-alive") < 2:
            seen.append(await asyncio.wait_for(lines.__anext__(), scaled(5)))
        await lines.aclose()  # type: ignore[attr-defined]
    assert seen[0] == "retry: 500"
    assert seen[1:4] == ["id: ep-0", "event: ready", 'data: {"cursor":"ep-0"}']


async def test_malformed_cursor_is_400(srv: Server) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(srv.url(), headers={"Last-Event-ID": "not a cursor"})
        assert r.status_code == 400 and "cursor" in r.json()["error"]
        r = await client.get(srv.url(), params={"cursor": "x-"})
        assert r.status_code == 400
    assert srv.waiter.stats().streams == 0


async def test_stream_limit_is_503(srv: Server) -> None:
    srv.waiter.max_streams = 1
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as client,
        aconnect_sse(client, "GET", srv.url()) as es,
    ):
        events = _events(es)
        await _next(events)
        r = await client.get(srv.url())
        assert r.status_code == 503
        await events.aclose()  # type: ignore[attr-defined]
    assert srv.waiter.stats().rejected == 1


async def test_client_that_stops_reading_is_disconnected(srv: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await reader.readuntil(b"event: ready")
    await wait_until(lambda: srv.waiter.waiting == 1)
    # the client reads nothing more; publish until the socket buffers are full
    chunk = "x" * 256 * 1024
    for _ in range(200):
        await srv.backend.publish("big", chunk, history=HistoryLimit(max_messages=300))
        if srv.waiter.stats().streams == 0:
            break
        await asyncio.sleep(0)
    await wait_until(lambda: srv.waiter.stats().streams == 0)
    writer.close()
    await writer.wait_closed()


def test_format_helpers() -> None:
    assert format_comment("keep-alive") == b": keep-alive\n"
    assert format_comment("a\nb") == b": a\n: b\n"
    assert format_event("a\nb", id="e-1", event="x", retry=10) == (
        b"retry: 10\nid: e-1\nevent: x\ndata: a\ndata: b\n\n"
    )
    assert format_event("") == b"data: \n\n"
    with pytest.raises(ValueError, match="id"):
        format_event("x", id="a\nb")
    with pytest.raises(ValueError, match="event"):
        format_event("x", event="a\rb")
    result = PollResult([Message("t", "x", Cursor("e", 1))], Cursor("e", 1))
    assert result.encoded("sse", format_result) is result.encoded("sse", format_result)


def _decode(block: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = []
    text = block.decode("utf-8")
    assert text.endswith("\n\n")
    for line in text[:-1].split("\n"):
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


@given(
    data=st.text(),
    event=st.none()
    | st.text(st.characters(exclude_characters="\r\n:", exclude_categories=("Cs",)), min_size=1),
)
def test_any_text_survives_an_sse_client(data: str, event: str | None) -> None:
    (decoded,) = _decode(format_event(data, id="e-5", event=event))
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert decoded.data == expected
    assert decoded.id == "e-5"
    assert decoded.event == (event if event is not None else "message")


async def test_closing_the_waiter_ends_streams(srv: Server) -> None:
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as client,
        aconnect_sse(client, "GET", srv.url()) as es,
    ):
        events = _events(es)
        assert (await _next(events)).event == "ready"
        await wait_until(lambda: srv.waiter.stats().parked == 1)
        await srv.waiter.close()
        rest = [e async for e in events]  # the response ends: iteration stops
    assert rest == []
    assert srv.waiter.stats().streams == 0
