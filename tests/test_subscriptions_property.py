"""Property tests of the subscriptions protocol: the parser, fuzzed frames, random interleavings.

* The parser (:func:`parse_frame`, the cursor map) answers any input with a
  value or a :class:`ProtocolError` / ``ValueError``, never anything else.
* Fuzzed frames (any JSON type, sizes, unicode, deep nesting, broken binary
  headers) sent to a real server never crash it: every frame is answered, the
  connection stays usable until the protocol-error limit closes it with 1008,
  and nothing is logged as an exception.
* Random interleavings of subscribe (from the last cursor seen, or from now),
  unsubscribe, publish and reconnect (after the answers, or abruptly with
  requests in flight) across 3 topics and 2 clients: in every
  subscription, every message arrives exactly once and in order after the
  subscription's start cursor, or after an explicit resync; at the end every
  open subscription has reached the topic's head.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado.web
import tornado.websocket
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import run_on_suite_loop, wait_until
from tornado_longconn import BroadcastHub, MemoryBackend, subscription_group
from tornado_longconn._subproto import (
    ProtocolError,
    binary_frame,
    format_cursor_map,
    parse_binary_frame,
    parse_cursor_map,
    parse_frame,
)
from tornado_longconn.log import Cursor, parse_cursor
from tornado_longconn.subscriptions import SubscriptionMixin
from tornado_longconn.testing import AppServer, scaled

EXAMPLES = int(os.environ.get("LONGCONN_HYPOTHESIS_EXAMPLES", "100"))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
field_values = st.one_of(
    json_values,
    st.integers(-(2**60), 2**60),
    st.text(alphabet="ab:/+-_.@,= \u00e9\u2603\U0001f600\x00", max_size=140),
    st.sampled_from(["room:1", "e-1", "x" * 129, "", "subscribe", "publish"]),
)
frames_obj = st.dictionaries(
    st.sampled_from(["type", "id", "topic", "cursor", "params", "data", "method", "zz"]),
    field_values,
    max_size=7,
) | st.fixed_dictionaries(
    {
        "type": st.sampled_from(["subscribe", "unsubscribe", "publish", "call", "pong", "nope"]),
        "id": st.one_of(st.integers(-5, 2**54), st.text(max_size=70), st.none(), st.booleans()),
        "topic": field_values,
    },
    optional={"cursor": field_values, "data": json_values, "method": field_values},
)


def deep(n: int) -> str:
    return "[" * n + "]" * n


raw_frames = st.one_of(
    frames_obj.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.integers(1, 100_000).map(deep),
    st.tuples(frames_obj, st.binary(max_size=50)).map(
        lambda p: binary_frame(p[0], p[1]) if len(json.dumps(p[0])) < 60_000 else b"\x00"
    ),
    st.just('{"type":"publish","id":1,"topic":"t","data":' + "1" * 5000 + "}"),
    st.just('{"type":"subscribe","id":1,"topic":"t","cursor":"NaN"}'),
    st.just('{"type":"call","id":1,"method":"m","params":NaN}'),
)


@settings(max_examples=EXAMPLES * 5, deadline=None)
@given(raw_frames)
def test_parser_answers_anything_with_a_request_or_a_protocol_error(frame: str | bytes) -> None:
    try:
        request = parse_frame(frame, max_size=64 * 1024)
    except ProtocolError as exc:
        assert exc.code in ("bad_request", "too_large") and exc.reason
    else:
        assert request.type in ("subscribe", "unsubscribe", "publish", "call", "pong")
        if request.type != "pong":
            assert request.id is not None


@settings(max_examples=EXAMPLES * 5, deadline=None)
@given(st.text(alphabet="ab:=,-0123456789e\u00e9 ", max_size=300))
def test_cursor_map_parser_raises_only_value_error(text: str) -> None:
    try:
        parsed = parse_cursor_map(text, max_topics=5)
    except ValueError:
        return
    assert parse_cursor_map(format_cursor_map(parsed), max_topics=5) == parsed


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_\-.:@/+]{1,128}", fullmatch=True),
        st.none()
        | st.builds(
            Cursor, st.from_regex(r"[0-9a-z]{1,32}", fullmatch=True), st.integers(0, 2**62)
        ),
        max_size=100,
    )
)
def test_cursor_map_round_trips(cursors: dict[str, Cursor | None]) -> None:
    assert parse_cursor_map(format_cursor_map(cursors), max_topics=100) == cursors


class Open(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub, max_protocol_errors: int = 10) -> None:
        self.subscription_hub = hub
        self.max_protocol_errors = max_protocol_errors

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return True

    def on_call(self, method: str, params: Any) -> Any:
        return {"method": method, "params": params}


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@settings(
    max_examples=max(10, EXAMPLES // 4),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(raw_frames, min_size=1, max_size=30))
def test_fuzzed_frames_never_crash_the_server(frames: list[str | bytes]) -> None:
    errors = Errors()
    watched = [logging.getLogger(n) for n in ("tornado_longconn", "tornado", "asyncio")]
    for logger in watched:
        logger.addHandler(errors)
    try:
        run_on_suite_loop(_fuzz(frames))
    finally:
        for logger in watched:
            logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


async def _fuzz(frames: list[str | bytes]) -> None:
    hub = BroadcastHub(MemoryBackend(epoch="f"), history=10)
    app = tornado.web.Application(
        [(r"/ws", Open, {"hub": hub, "max_protocol_errors": 1000})],
        websocket_max_message_size=1 << 20,
    )
    async with (
        AppServer(app) as server,
        websockets.connect(server.ws_url("/ws"), max_size=None) as ws,
    ):
        assert json.loads(await ws.recv())["type"] == "welcome"
        for frame in frames:
            await ws.send(frame)
        # Still answering, in order, after everything above.
        await ws.send('{"type":"call","id":"last-probe","method":"ping"}')
        while True:
            raw = await asyncio.wait_for(ws.recv(), scaled(20))
            if isinstance(raw, bytes):
                parse_binary_frame(raw)
                continue
            reply = json.loads(raw)
            if reply.get("id") == "last-probe" and reply.get("type") == "result":
                break
    await hub.close(spread=0)


# ---------------------------------------------------------------------- interleavings

TOPICS = ("t:a", "t:b", "t:c")


@dataclass
class Segment:
    """One subscription of one client to one topic: what it must receive next."""

    topic: str
    after: Cursor | None  # None until the subscribed reply names the start
    open: bool = True
    got: list[str] = field(default_factory=list)
    resyncs: int = 0


class Driver:
    """One protocol client: sends requests without waiting; its reader checks every frame."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.next_id = 0
        self.pending: dict[int, tuple[str, str, Cursor | None]] = {}
        self.segments: dict[str, Segment] = {}  # the open (or opening) segment per topic
        self.last: dict[str, Cursor] = {}  # the newest cursor received per topic
        self.history: list[Segment] = []
        self.idle = asyncio.Event()
        self.idle.set()
        self.changed = asyncio.Event()  # set on every frame read

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None)
        assert json.loads(await self.ws.recv())["type"] == "welcome"
        self.reader = asyncio.ensure_future(self._read(self.ws))

    async def send(self, kind: str, topic: str, **extra: Any) -> None:
        self.next_id += 1
        cursor = extra.get("cursor")
        self.pending[self.next_id] = (kind, topic, parse_cursor(cursor) if cursor else None)
        self.idle.clear()
        await self.ws.send(json.dumps({"type": kind, "id": self.next_id, "topic": topic, **extra}))

    async def subscribe(self, topic: str, resume: bool) -> None:
        cursor = self.last.get(topic) if resume else None
        if cursor is not None:
            await self.send("subscribe", topic, cursor=str(cursor))
        else:
            await self.send("subscribe", topic)

    async def reconnect(self, *, abrupt: bool) -> None:
        """Close and reconnect, resubscribing from the last cursors seen.

        ``abrupt``: at once (requests in flight may get no answer); else after
        every pending request was answered.
        """
        if not abrupt:
            await asyncio.wait_for(self.idle.wait(), scaled(20))
        await self.ws.close()
        assert self.reader is not None
        await self.reader
        for segment in self.segments.values():
            segment.open = False
        held = list(self.segments)
        self.segments.clear()
        self.pending.clear()
        self.idle.set()
        await self.connect()
        for topic in held:
            await self.subscribe(topic, resume=True)

    async def _read(self, ws: Any) -> None:
        try:
            async for raw in ws:
                self._frame(json.loads(raw))
        except websockets.ConnectionClosed:
            pass

    def _frame(self, frame: dict[str, Any]) -> None:
        self.changed.set()
        kind = frame.get("type")
        if kind is None:  # a message
            topic = frame["topic"]
            cursor = parse_cursor(frame["cursor"])
            segment = self.segments.get(topic)
            assert segment is not None and segment.open, (
                f"message of {topic} outside a subscription"
            )
            assert segment.after is not None and cursor.follows(segment.after), (
                f"{topic}: got {cursor} after {segment.after}"
            )
            segment.after = cursor
            segment.got.append(frame["data"])
            self.last[topic] = cursor
            return
        if kind == "resync":
            segment = self.segments[frame["topic"]]
            segment.after = parse_cursor(frame["cursor"])
            segment.resyncs += 1
            return
        rid = frame.get("id")
        request = self.pending.pop(rid, None) if rid is not None else None
        if not self.pending:
            self.idle.set()
        if request is None:
            return
        _, topic, cursor = request
        if kind == "subscribed":
            start = cursor if cursor is not None else parse_cursor(frame["cursor"])
            segment = Segment(topic, start)
            self.segments[topic] = segment
            self.history.append(segment)
        elif kind == "unsubscribed":
            self.segments.pop(topic).open = False
        elif kind == "error":
            assert frame["code"] in ("conflict", "not_found"), frame
        else:
            assert kind == "published", frame


ops = st.lists(
    st.tuples(
        st.sampled_from(["sub", "resub", "unsub", "pub", "pub", "pub", "reconnect", "drop"]),
        st.integers(0, 1),
        st.sampled_from(TOPICS),
    ),
    min_size=5,
    max_size=60,
)


@settings(
    max_examples=max(10, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops)
def test_random_interleavings_deliver_each_message_once_in_order(
    steps: list[tuple[str, int, str]],
) -> None:
    run_on_suite_loop(_interleave(steps))


async def _interleave(steps: list[tuple[str, int, str]]) -> None:
    hub = BroadcastHub(MemoryBackend(epoch="p"), history=1000)
    app = tornado.web.Application([(r"/ws", Open, {"hub": hub})])
    async with AppServer(app) as server:
        drivers = [Driver(server.ws_url("/ws")) for _ in range(2)]
        for driver in drivers:
            await driver.connect()
        for n, (op, who, topic) in enumerate(steps):
            driver = drivers[who]
            if op in ("sub", "resub"):
                await driver.subscribe(topic, resume=op == "resub")
            elif op == "unsub":
                await driver.send("unsubscribe", topic)
            elif op == "pub":
                await driver.send("publish", topic, data=n)
            else:
                await driver.reconnect(abrupt=op == "drop")
        for driver in drivers:
            await asyncio.wait_for(driver.idle.wait(), scaled(20))
        # Every open subscription reaches the head of its topic.
        heads = {}
        for topic in TOPICS:
            result = await subscription_group(hub, topic).publish(json.dumps("end"))
            heads[topic] = result.cursor
        for driver in drivers:
            for topic, segment in list(driver.segments.items()):
                head = heads[topic]
                await wait_until(lambda s=segment, h=head: s.after == h, changed=driver.changed)
        for driver in drivers:
            for segment in driver.history:
                assert segment.resyncs == 0  # history covers everything here
            await driver.ws.close()
            assert driver.reader is not None
            await driver.reader
    await hub.close(spread=0)


@pytest.mark.parametrize("frame", [deep(50_000), "[" * 200_000])
def test_deep_json_is_a_protocol_error(frame: str) -> None:
    with pytest.raises(ProtocolError):
        parse_frame(frame, max_size=1 << 20)
