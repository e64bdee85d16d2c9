"""longconn.js in Chromium against a real server: ``LongConn.session()`` and ``LongConn.connect()``.

The server runs in the test's process on 127.0.0.1 and can be stopped and
started again on the same port: with the same backend (the page must resume
from its cursors: nothing lost, nothing twice) or with a fresh one (a new epoch:
the page must get a resync notice). It serves both client APIs over one hub:

* the subscriptions protocol v1 (``SubscriptionMixin`` on WebSocket,
  ``SubscriptionSSEHandler``, ``SubscriptionPollHandler``,
  ``SubscriptionPublishHandler``) for ``LongConn.session()``: three topics on
  one connection, each resumed from its own cursor;
* one stream (a group with ``cursor_envelope`` joined in ``open()``,
  ``SSEHandler``, ``LongPollHandler``) for ``LongConn.connect()``.

Every transport is covered: WebSocket, SSE and long-poll, chosen by hand and by
fallback.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.locks
import tornado.netutil
import tornado.web
import tornado.websocket

from tests.helpers import chromium, free_port, needs_chromium
from tornado_longconn import (
    BroadcastHub,
    LongPollWaiter,
    MemoryBackend,
    SubscriptionPollHandler,
    SubscriptionPublishHandler,
    SubscriptionSSEHandler,
    subscription_group,
)
from tornado_longconn.backends import Backend
from tornado_longconn.broadcast import BroadcastGroup, GapPolicy, cursor_envelope
from tornado_longconn.longpoll import LongPollHandler
from tornado_longconn.sse import SSEHandler
from tornado_longconn.staticfiles import static_url_spec
from tornado_longconn.subscriptions import SubscriptionError, SubscriptionMixin
from tornado_longconn.testing import AppServer, _TrackingHTTPServer, scaled

pytestmark = [pytest.mark.browser, pytest.mark.slow, needs_chromium, pytest.mark.timeout(120)]

TOPICS = ["room:lobby", "dm:ann", "notify"]


class Hooks:
    """The page may read anything but ``secret:*`` and publish anywhere but ``ro:*``."""

    def authorize_subscribe(self, topic: str, params: Any) -> bool:
        return not topic.startswith("secret:")

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return not topic.startswith("ro:")


class Live(Hooks, SubscriptionMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub

    async def on_call(self, method: str, params: Any) -> Any:
        if method == "echo":
            return {"params": params}
        if method == "never":  # answered by the client's own deadline
            await tornado.locks.Event().wait()
        raise SubscriptionError("not_found", f"no method {method!r}")


class Events(Hooks, SubscriptionSSEHandler):
    pass


class Poll(Hooks, SubscriptionPollHandler):
    pass


class Publish(Hooks, SubscriptionPublishHandler):
    pass


def stream_group(hub: BroadcastHub) -> BroadcastGroup:
    """The one topic of the single-stream endpoints (``LongConn.connect()``)."""
    return hub.group("stream", envelope=cursor_envelope, gap_policy=GapPolicy.NOTICE)


class StreamSocket(tornado.websocket.WebSocketHandler):
    """The single-stream WebSocket: joins the stream from ``?cursor=``."""

    def initialize(self, hub: BroadcastHub) -> None:
        self.hub = hub

    def open(self) -> None:
        stream_group(self.hub).join(self, cursor=self.get_query_argument("cursor", None) or None)


class Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish(
            '<!doctype html><meta charset="utf-8"><title>session</title>'
            '<script src="/longconn/longconn.js"></script>'
        )


class Server(AppServer):
    """The app on one fixed port, stopped and started again around a backend."""

    def __init__(self, backend: Backend) -> None:
        self.fixed_port = free_port()
        self.backend = backend
        self.hub = BroadcastHub(backend, history=1000)
        self.waiter = LongPollWaiter(backend, linger=0)
        super().__init__(self._app())

    def _app(self) -> tornado.web.Application:
        hub, waiter = self.hub, self.waiter
        return tornado.web.Application(
            [
                (r"/", Page),
                static_url_spec("/longconn/"),
                (r"/ws", Live, {"hub": hub}),
                (r"/sse", Events, {"hub": hub, "waiter": waiter}),
                (r"/poll", Poll, {"hub": hub, "waiter": waiter}),
                (r"/publish", Publish, {"hub": hub}),
                (r"/stream-ws", StreamSocket, {"hub": hub}),
                (r"/stream-sse", SSEHandler, {"waiter": waiter, "topic": "stream"}),
                (r"/stream-poll", LongPollHandler, {"waiter": waiter, "topic": "stream"}),
            ]
        )

    def start(self) -> Server:
        sockets = tornado.netutil.bind_sockets(self.fixed_port, self.host, family=socket.AF_INET)
        self.port = self.fixed_port
        self.server = _TrackingHTTPServer(self.app, **self._server_kwargs)
        self.server.add_sockets(sockets)
        return self

    async def swap_backend(self, backend: Backend) -> None:
        """Serve from ``backend`` from now on (a restarted in-memory server: a new epoch)."""
        await self.close_backend()
        self.backend = backend
        self.hub = BroadcastHub(backend, history=1000)
        self.waiter = LongPollWaiter(backend, linger=0)
        self.app = self._app()

    async def close_backend(self) -> None:
        await self.hub.close(spread=0)
        await self.waiter.close()

    async def publish(self, topic: str, data: Any) -> str:
        result = await subscription_group(self.hub, topic).publish(json.dumps(data))
        return str(result.cursor)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(MemoryBackend())
    srv.start()
    try:
        yield srv
    finally:
        await srv.stop()
        await srv.close_backend()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


NO_WEBSOCKET = "delete window.WebSocket;"
NO_WEBSOCKET_NO_SSE = "delete window.WebSocket; delete window.EventSource;"

# The page's side: one session, every topic recorded with its cursor and transport.
START = """
([options, topics]) => {
  window.got = {};
  window.resyncs = [];
  window.statuses = [];
  window.conn = LongConn.session(Object.assign({
    url: "/ws", sseUrl: "/sse", pollUrl: "/poll", publishUrl: "/publish",
    backoff: {base: 50, max: 250}, requestTimeout: 5000,
    onStatus: (s) => statuses.push(s.state + ":" + s.transport),
  }, options));
  for (const topic of topics) {
    got[topic] = [];
    conn.subscribe(topic, {
      onMessage: (data, cursor, meta) => got[topic].push({data, cursor, transport: meta.transport}),
      onResync: (info) => resyncs.push(info),
    });
  }
  return Promise.all(conn.subscriptions().map((s) => s.ready)).then(() => conn.transport);
}
"""


async def open_page(browser: Any, server: Server, init_script: str | None = None) -> Any:
    context = await browser.new_context()
    if init_script:
        await context.add_init_script(init_script)
    page = await context.new_page()
    page.set_default_timeout(scaled(15) * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(server.url("/"))
    return page


async def start(page: Any, options: dict[str, Any], topics: list[str] = TOPICS) -> str:
    transport: str = await page.evaluate(START, [options, topics])
    return transport


async def received(page: Any, expected: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Wait until every topic got at least its expected count; return the data per topic."""
    await page.wait_for_function(
        "counts => Object.entries(counts).every(([t, n]) => got[t].length >= n)",
        arg={t: len(v) for t, v in expected.items()},
    )
    data: dict[str, list[Any]] = await page.evaluate(
        "topics => Object.fromEntries(topics.map(t => [t, got[t].map(m => m.data)]))",
        list(expected),
    )
    return data


async def publish_round(server: Server, label: str, count: int = 3) -> dict[str, list[Any]]:
    sent: dict[str, list[Any]] = {t: [] for t in TOPICS}
    for i in range(count):
        for topic in TOPICS:
            data = {"n": f"{label}-{i}", "topic": topic}
            await server.publish(topic, data)
            sent[topic].append(data)
    return sent


def merge(*rounds: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {t: [m for r in rounds for m in r[t]] for t in TOPICS}


TRANSPORTS = [
    pytest.param({}, None, "websocket", id="websocket"),
    pytest.param({"transport": "sse"}, None, "sse", id="sse"),
    pytest.param({"transport": "longpoll"}, None, "longpoll", id="longpoll"),
    pytest.param({}, NO_WEBSOCKET, "sse", id="fallback-sse"),
    pytest.param({}, NO_WEBSOCKET_NO_SSE, "longpoll", id="fallback-longpoll"),
]


@pytest.mark.parametrize(("options", "script", "transport"), TRANSPORTS)
async def test_every_topic_resumes_from_its_own_cursor_after_a_restart(
    browser: Any, server: Server, options: dict[str, Any], script: str | None, transport: str
) -> None:
    page = await open_page(browser, server, script)
    assert await start(page, options) == transport
    first = await publish_round(server, "before")
    assert await received(page, first) == first

    await server.stop()
    await page.wait_for_function("conn.state === 'waiting'")
    # While the page is away, every topic gets messages (some more than others).
    away = await publish_round(server, "away")
    away["notify"].append({"n": "away-extra"})
    await server.publish("notify", {"n": "away-extra"})
    server.start()

    await page.wait_for_function("conn.state === 'open'")
    after = await publish_round(server, "after", 2)
    expected = merge(first, away, after)
    got = await received(page, expected)
    assert got == expected  # every message once, in order, per topic
    assert await page.evaluate("resyncs") == []
    transports = await page.evaluate(
        "[...new Set(Object.values(got).flat().map(m => m.transport))]"
    )
    assert transports == [transport]
    cursors = await page.evaluate("conn.subscriptions().map(s => [s.topic, s.cursor])")
    last = await page.evaluate(
        "Object.fromEntries(Object.entries(got).map(([t, m]) => [t, m.at(-1).cursor]))"
    )
    assert dict(cursors) == last
    assert page.errors == []


@pytest.mark.parametrize(("options", "script", "transport"), TRANSPORTS[:3])
async def test_a_new_epoch_is_a_resync_notice_per_topic(
    browser: Any, server: Server, options: dict[str, Any], script: str | None, transport: str
) -> None:
    page = await open_page(browser, server, script)
    assert await start(page, options) == transport
    first = await publish_round(server, "old", 2)
    await received(page, first)

    await server.stop()
    await page.wait_for_function("conn.state === 'waiting'")
    await server.swap_backend(MemoryBackend())  # the in-memory history is gone
    new = await publish_round(server, "new", 2)
    server.start()

    await page.wait_for_function(
        "n => resyncs.length >= n && conn.state === 'open'", arg=len(TOPICS)
    )
    resyncs = await page.evaluate("resyncs")
    assert sorted(r["topic"] for r in resyncs) == sorted(TOPICS)
    assert {r["reason"] for r in resyncs} == {"epoch"}
    assert {r["transport"] for r in resyncs} == {transport}
    # Delivery goes on in the new epoch: what it holds after the notice, then live.
    later = await publish_round(server, "later", 1)
    got = await received(page, merge(first, new, later))
    assert got == merge(first, new, later)
    assert page.errors == []


async def test_publish_call_and_errors_over_websocket(browser: Any, server: Server) -> None:
    page = await open_page(browser, server)
    assert await start(page, {}, [*TOPICS, "files"]) == "websocket"
    result = await page.evaluate(
        """async () => {
        const published = await conn.publish("room:lobby", {text: "from the page"});
        const echo = await conn.call("echo", {a: [1, 2]});
        const bytes = await conn.publish("files", new Uint8Array([0, 1, 254, 255]));
        const outcome = async (p) => p.then((v) => ({ok: v}), (e) => ({
            name: e.name, code: e.code, status: e.status, isError: e instanceof LongConn.LongConnError}));
        return {
            published, echo, bytes,
            unknown: await outcome(conn.call("nope")),
            late: await outcome(conn.call("never", null, {timeout: 300})),
            refused: await outcome(conn.subscribe("secret:x").ready),
            readOnly: await outcome(conn.publish("ro:x", 1)),
            conflict: await outcome(Promise.resolve().then(() => conn.subscribe("notify"))),
            clientId: conn.clientId, version: conn.protocolVersion,
        };
    }"""
    )
    assert result["published"]["topic"] == "room:lobby" and result["published"]["cursor"]
    assert result["echo"] == {"params": {"a": [1, 2]}}
    error = {"name": "LongConnError", "isError": True}
    assert result["unknown"] == {**error, "code": "not_found", "status": 404}
    assert result["late"] == {**error, "code": "timeout", "status": None}
    assert result["refused"] == {**error, "code": "forbidden", "status": 403}
    assert result["readOnly"] == {**error, "code": "forbidden", "status": 403}
    assert result["conflict"] == {**error, "code": "conflict", "status": 409}
    assert result["clientId"] and result["version"] == 1

    # The page's own publishes come back through its subscriptions, text and bytes.
    await page.wait_for_function("got['room:lobby'].length >= 1 && got['files'].length >= 1")
    mine = await page.evaluate(
        "[got['room:lobby'][0].data, got['room:lobby'][0].cursor,"
        " Array.from(got['files'][0].data), got['files'][0].data instanceof Uint8Array]"
    )
    assert mine == [
        {"text": "from the page"},
        result["published"]["cursor"],
        [0, 1, 254, 255],
        True,
    ]

    # Unsubscribed: no more messages of that topic; the others go on.
    await page.evaluate("conn.unsubscribe('room:lobby')")
    await server.publish("room:lobby", {"n": "not for me"})
    await server.publish("notify", {"n": "still here"})
    await page.wait_for_function("got['notify'].length >= 1")
    assert await page.evaluate("got['room:lobby'].length") == 1
    assert await page.evaluate("conn.subscriptions().map(s => s.topic)") == [
        "dm:ann",
        "notify",
        "files",
    ]
    assert page.errors == []


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_publish_over_http_and_no_call_without_websocket(
    browser: Any, server: Server, transport: str
) -> None:
    page = await open_page(browser, server)
    assert await start(page, {"transport": transport}) == transport
    result = await page.evaluate(
        """async () => {
        const published = await conn.publish("dm:ann", {text: "over HTTP"});
        const outcome = async (p) => p.then((v) => ({ok: v}), (e) => ({code: e.code, status: e.status}));
        return {
            published,
            call: await outcome(conn.call("echo", {})),
            readOnly: await outcome(conn.publish("ro:x", 1)),
            refused: await outcome(conn.subscribe("secret:y").ready),
        };
    }"""
    )
    assert result["published"]["topic"] == "dm:ann" and result["published"]["cursor"]
    assert result["call"] == {"code": "unsupported", "status": None}
    assert result["readOnly"] == {"code": "forbidden", "status": 403}
    assert result["refused"] == {"code": "forbidden", "status": 403}
    await page.wait_for_function("got['dm:ann'].length >= 1")
    assert await page.evaluate("got['dm:ann'][0]") == {
        "data": {"text": "over HTTP"},
        "cursor": result["published"]["cursor"],
        "transport": transport,
    }
    # Subscribing to another topic on the way restarts the request with every cursor.
    await page.evaluate(
        "conn.subscribe('late', {onMessage: (d) => (got.late = got.late || []).push({data: d})})"
    )
    await page.wait_for_function(
        "conn.subscriptions().find(s => s.topic === 'late').state === 'active'"
    )
    await server.publish("late", {"n": 1})
    await server.publish("notify", {"n": 2})
    await page.wait_for_function("got.late && got.late.length >= 1 && got['notify'].length >= 1")
    assert await page.evaluate("got['dm:ann'].length") == 1  # nothing replayed twice
    assert page.errors == []


# --------------------------------------------------------------------------- one stream

STREAM = """
(options) => {
  window.sgot = [];
  window.sresyncs = [];
  window.stream = LongConn.connect(Object.assign({
    url: "/stream-ws", sseUrl: "/stream-sse", pollUrl: "/stream-poll",
    backoff: {base: 50, max: 250},
    onMessage: (data, cursor, meta) => sgot.push({data, cursor, transport: meta.transport}),
    onResync: (info) => sresyncs.push(info),
  }, options));
  return new Promise((resolve) => stream.on("status", (s) => s.state === "open" && resolve(s.transport)));
}
"""


async def stream_received(page: Any, count: int) -> list[Any]:
    await page.wait_for_function("n => sgot.length >= n", arg=count)
    data: list[Any] = await page.evaluate("sgot.map(m => m.data)")
    return data


async def publish_stream(server: Server, label: str, count: int) -> list[Any]:
    sent = []
    for i in range(count):
        data = {"n": f"{label}-{i}"}
        await stream_group(server.hub).publish(json.dumps(data))
        sent.append(data)
    return sent


@pytest.mark.parametrize(("options", "script", "transport"), TRANSPORTS)
async def test_one_stream_resumes_from_its_cursor_after_a_restart(
    browser: Any, server: Server, options: dict[str, Any], script: str | None, transport: str
) -> None:
    page = await open_page(browser, server, script)
    assert await page.evaluate(STREAM, options) == transport
    first = await publish_stream(server, "before", 3)
    assert await stream_received(page, 3) == first

    await server.stop()
    await page.wait_for_function("stream.state === 'waiting'")
    away = await publish_stream(server, "away", 3)
    server.start()

    await page.wait_for_function("stream.state === 'open'")
    after = await publish_stream(server, "after", 2)
    expected = first + away + after
    assert await stream_received(page, len(expected)) == expected
    assert await page.evaluate("sresyncs") == []
    assert await page.evaluate("[...new Set(sgot.map(m => m.transport))]") == [transport]
    assert await page.evaluate("stream.cursor === sgot.at(-1).cursor")
    assert page.errors == []


@pytest.mark.parametrize(("options", "script", "transport"), TRANSPORTS[:3])
async def test_one_stream_gets_a_resync_notice_on_a_new_epoch(
    browser: Any, server: Server, options: dict[str, Any], script: str | None, transport: str
) -> None:
    page = await open_page(browser, server, script)
    assert await page.evaluate(STREAM, options) == transport
    await stream_received(page, len(await publish_stream(server, "old", 2)))

    await server.stop()
    await page.wait_for_function("stream.state === 'waiting'")
    await server.swap_backend(MemoryBackend())
    server.start()

    await page.wait_for_function("sresyncs.length >= 1 && stream.state === 'open'")
    assert {r["transport"] for r in await page.evaluate("sresyncs")} == {transport}
    later = await publish_stream(server, "new", 2)
    got = await stream_received(page, 4)
    assert got[-2:] == later
    assert page.errors == []
