"""StrictWebSocketMixin: connections breaking RFC 6455 get a close frame, then TCP closes.

A real Tornado server on 127.0.0.1 and the raw-socket fault client of
``tornado_longconn.testing``, sending crafted frames.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import tornado
import tornado.util
import tornado.web
import tornado.websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.websocket import WebSocketProtocol13
from websockets.protocol import Protocol, Side, State

from tests.helpers import Seen as Ctx
from tornado_longconn import HeartbeatMixin, LongConnError
from tornado_longconn._tornado import websocket as door
from tornado_longconn._tornado._check import check_tornado
from tornado_longconn._tornado.websocket import (
    FrameChecker,
    StrictWebSocketProtocol,
    close_payload_failure,
    make_strict,
)
from tornado_longconn.stats import stats_dict
from tornado_longconn.strict import (
    ProtocolErrorCounters,
    ProtocolErrorStats,
    StrictWebSocketMixin,
    is_valid_close_code,
    protocol_error_stats,
)
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled

build = WebSocketTestClient.build_frame
MAX_MESSAGE = 4096


class EchoBase(tornado.websocket.WebSocketHandler):
    echo = True

    def initialize(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def open(self) -> None:
        self.ctx.handlers.put_nowait(self)

    def on_message(self, message: str | bytes) -> None:
        self.ctx.received.put_nowait(message)
        if message == "raise":
            raise RuntimeError("application bug")
        if message == "close 4000":
            self.close(4000, "app says bye")
            return
        if self.echo:
            self.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        self.ctx.closed.put_nowait((self.close_code, self.close_reason))


class StrictEcho(StrictWebSocketMixin, EchoBase):
    pass


class LenientEcho(EchoBase):
    """Tornado's own reader, to show what the mixin changes."""


class DeflateEcho(StrictWebSocketMixin, EchoBase):
    echo = False  # the test client does not inflate

    def get_compression_options(self) -> dict[str, Any]:
        return {}  # permessage-deflate on; messages are recorded, not echoed


class HeartbeatFirst(HeartbeatMixin, StrictWebSocketMixin, EchoBase):
    heartbeat_interval = 30.0


@pytest.fixture
def ctx() -> Ctx:
    return Ctx()


@pytest.fixture
def stats() -> ProtocolErrorCounters:
    return ProtocolErrorCounters()


@pytest.fixture
async def server(ctx: Ctx, stats: ProtocolErrorCounters) -> AsyncIterator[AppServer]:
    app = tornado.web.Application(
        [
            ("/strict", StrictEcho, {"ctx": ctx}),
            ("/lenient", LenientEcho, {"ctx": ctx}),
            ("/deflate", DeflateEcho, {"ctx": ctx}),
            ("/heartbeat-first", HeartbeatFirst, {"ctx": ctx}),
        ],
        websocket_max_message_size=MAX_MESSAGE,
        websocket_protocol_errors=stats,
    )
    async with AppServer(app) as srv:
        yield srv


async def failed_with(
    server: AppServer, ctx: Ctx, data: bytes, path: str = "/strict"
) -> tuple[WebSocketTestClient, tuple[int | None, str | None]]:
    """Connect, send ``data`` raw; return the client once TCP closed, and the handler's close."""
    client = await WebSocketTestClient.connect(server.ws_url(path))
    try:
        await ctx.handler()
        await client.send_raw(data)
        await client.wait_closed(scaled(5))
        return client, await ctx.close_seen()
    finally:
        client.vanish()


# -- the failures ------------------------------------------------------------


async def test_unmasked_frame_is_closed_with_1002(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    client, _ = await failed_with(server, ctx, build(0x1, b"unmasked", mask=False))
    assert (client.close_code, client.close_reason) == (1002, "frame not masked")
    assert client.messages_received == 0  # not echoed: the payload never reached on_message
    assert ctx.received.empty()
    assert stats_dict(stats.stats()) == {
        "total": 1,
        "by_code": {1002: 1},
        "by_reason": {"frame not masked": 1},
    }


async def test_unmasked_control_frame_is_closed_with_1002(server: AppServer, ctx: Ctx) -> None:
    client, _ = await failed_with(server, ctx, build(0x9, b"ping", mask=False))
    assert (client.close_code, client.close_reason) == (1002, "frame not masked")
    assert client.pongs_received == 0


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
async def test_invalid_close_code_is_answered_with_1002(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters, code: int
) -> None:
    client, (seen_code, seen_reason) = await failed_with(
        server, ctx, build(0x8, struct.pack("!H", code) + b"bye")
    )
    assert (client.close_code, client.close_reason) == (1002, "invalid close code")
    assert (seen_code, seen_reason) == (code, None)  # on_close sees what the client sent
    assert dict(stats.stats().by_code) == {1002: 1}


async def test_one_byte_close_payload_is_answered_with_1002(server: AppServer, ctx: Ctx) -> None:
    client, (seen_code, _) = await failed_with(server, ctx, build(0x8, b"\x03"))
    assert (client.close_code, client.close_reason) == (1002, "close payload of 1 byte")
    assert seen_code is None


async def test_close_reason_not_utf8_is_answered_with_1007(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    client, (seen_code, seen_reason) = await failed_with(
        server, ctx, build(0x8, struct.pack("!H", 1000) + b"\xff\xfe")
    )
    assert (client.close_code, client.close_reason) == (1007, "close reason not UTF-8")
    assert (seen_code, seen_reason) == (1000, None)
    assert dict(stats.stats().by_code) == {1007: 1}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(build(0x3, b"x"), "unknown opcode", id="opcode-3"),
        pytest.param(build(0xB, b"x"), "unknown opcode", id="opcode-11"),
        pytest.param(build(0x1, b"x", rsv=4), "reserved bits set", id="rsv1"),
        pytest.param(build(0x2, b"x", rsv=1), "reserved bits set", id="rsv3"),
        pytest.param(build(0x9, b"p" * 126), "control frame longer than 125 bytes", id="long-ping"),
        pytest.param(
            build(0x8, b"\x03\xe8" + b"r" * 124),
            "control frame longer than 125 bytes",
            id="long-close",
        ),
        pytest.param(build(0x9, b"p", fin=False), "fragmented control frame", id="fragmented-ping"),
        pytest.param(build(0x0, b"more"), "continuation without a message", id="orphan-cont"),
        pytest.param(
            build(0x1, b"he", fin=False) + build(0x1, b"llo"),
            "new message inside a fragmented message",
            id="interleaved",
        ),
    ],
)
async def test_protocol_error_sends_1002_before_closing(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters, data: bytes, reason: str
) -> None:
    client, _ = await failed_with(server, ctx, data)
    assert (client.close_code, client.close_reason) == (1002, reason)
    assert dict(stats.stats().by_reason) == {reason: 1}
    assert ctx.received.empty()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(build(0x1, b"\xff\xfe"), id="one-frame"),
        pytest.param(build(0x1, b"ok \xe2", fin=False) + build(0x0, b"\x28"), id="fragmented"),
    ],
)
async def test_text_not_utf8_sends_1007(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters, data: bytes
) -> None:
    client, _ = await failed_with(server, ctx, data)
    assert (client.close_code, client.close_reason) == (1007, "text not UTF-8")
    assert dict(stats.stats().by_code) == {1007: 1}
    assert ctx.received.empty()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(build(0x2, b"b" * (MAX_MESSAGE + 1)), id="one-frame"),
        pytest.param(build(0x2, b"b" * MAX_MESSAGE, fin=False) + build(0x0, b"b"), id="fragmented"),
    ],
)
async def test_too_big_message_sends_1009(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters, data: bytes
) -> None:
    """Tornado's own answer (websocket_max_message_size), kept and counted."""
    client, _ = await failed_with(server, ctx, data)
    assert (client.close_code, client.close_reason) == (1009, "message too big")
    assert dict(stats.stats().by_code) == {1009: 1}


async def test_message_at_the_limit_passes(server: AppServer, ctx: Ctx) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/strict")) as client:
        await client.send(b"b" * MAX_MESSAGE)
        assert await client.recv() == b"b" * MAX_MESSAGE


# -- what stays as it was ----------------------------------------------------


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
async def test_valid_close_codes_are_echoed(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters, code: int
) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/strict"))
    try:
        await ctx.handler()
        await client.close(code, "done")
        assert client.close_code == code
        assert await ctx.close_seen() == (code, "done")
    finally:
        client.vanish()
    assert stats.stats().total == 0


async def test_empty_close_is_echoed_empty(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    client, seen = await failed_with(server, ctx, build(0x8, b""))
    assert client.close_code is None  # an empty close frame back
    assert client.frames_received == 1
    assert seen == (None, None)
    assert stats.stats().total == 0


async def test_close_inside_a_fragmented_message_is_echoed(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    """Control frames may come between fragments (RFC 6455 5.4); the message is dropped."""
    data = build(0x2, b"part", fin=False) + build(0x8, struct.pack("!H", 1001))
    client, seen = await failed_with(server, ctx, data)
    assert client.close_code == 1001
    assert seen == (1001, None)
    assert ctx.received.empty()
    assert stats.stats().total == 0


async def test_valid_traffic_passes(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/strict")) as client:
        await client.send("hello")
        await client.send_raw(build(0x1, "héllo ".encode(), fin=False) + build(0x9, b"mid"))
        await client.send_raw(build(0x0, b"w", fin=False) + build(0x0, b"orld"))
        await client.send(b"\x00\xff")
        assert await client.recv_many(3) == ["hello", "héllo world", b"\x00\xff"]
        assert client.pongs_received == 1
    assert stats.stats().total == 0


async def test_other_connections_are_unaffected(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/strict")) as good:
        await ctx.handler()
        await good.send("before")
        assert await good.recv() == "before"
        client, _ = await failed_with(server, ctx, build(0x1, b"bad", mask=False))
        assert client.close_code == 1002
        await good.send("after")
        assert await good.recv() == "after"
        assert not good.closed
    assert stats.stats().total == 1


async def test_handler_exception_is_not_a_protocol_error(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    """A handler that raises is aborted by Tornado as before: no 1002, not counted."""
    client = await WebSocketTestClient.connect(server.ws_url("/strict"))
    try:
        await ctx.handler()
        await client.send("raise")
        await client.wait_closed(scaled(5))
        assert client.close_code is None
        assert client.frames_received == 0
    finally:
        client.vanish()
    assert stats.stats().total == 0


async def test_application_close_is_not_a_protocol_error(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/strict")) as client:
        handler = await ctx.handler()
        await client.send("close 4000")
        await client.wait_closed(scaled(5))
        assert (client.close_code, client.close_reason) == (4000, "app says bye")
    async with await WebSocketTestClient.connect(server.ws_url("/strict")) as client:
        handler = await ctx.handler()
        handler.close(4001, "from outside")  # while the reader waits for a frame
        await client.wait_closed(scaled(5))
        assert client.close_code == 4001
    assert stats.stats().total == 0


# -- Tornado's own reader, for contrast --------------------------------------


async def test_tornado_alone_accepts_unmasked_frames_and_echoes_invalid_codes(
    server: AppServer, ctx: Ctx
) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/lenient")) as client:
        await client.send_raw(build(0x1, b"unmasked", mask=False))
        assert await client.recv() == "unmasked"
    client, _ = await failed_with(server, ctx, build(0x8, struct.pack("!H", 999)), "/lenient")
    assert client.close_code == 999
    client, _ = await failed_with(server, ctx, build(0x3, b"x"), "/lenient")
    assert client.close_code is None and client.frames_received == 0  # dropped, no close frame


# -- composition and parameters ----------------------------------------------


async def test_composes_with_heartbeat_mixin(server: AppServer, ctx: Ctx) -> None:
    """HeartbeatMixin's get_websocket_protocol calls super(): both mixins take effect."""
    client = await WebSocketTestClient.connect(server.ws_url("/heartbeat-first"))
    try:
        handler = await ctx.handler()
        assert isinstance(handler.ws_connection, StrictWebSocketProtocol)
        assert handler._heartbeat is not None  # the heartbeat mixin ran too
        await client.send("hi")
        assert await client.recv() == "hi"
        await client.send_raw(build(0x1, b"x", mask=False))
        await client.wait_closed(scaled(5))
        assert client.close_code == 1002
    finally:
        client.vanish()


def deflate(payload: bytes) -> bytes:
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


async def test_compression_options_are_kept(server: AppServer, ctx: Ctx) -> None:
    """RSV1 is allowed on a data message when permessage-deflate was negotiated."""
    headers = {"Sec-WebSocket-Extensions": "permessage-deflate"}
    client = await WebSocketTestClient.connect(server.ws_url("/deflate"), headers=headers)
    try:
        await ctx.handler()
        assert client.response_headers["sec-websocket-extensions"].startswith("permessage-deflate")
        await client.send_raw(build(0x1, deflate(b"squeezed " * 20), rsv=4))
        received = await asyncio.wait_for(ctx.received.get(), scaled(5))
        assert received == "squeezed " * 20
        await client.send_raw(build(0x9, b"p", rsv=4))  # but never on a control frame
        await client.wait_closed(scaled(5))
        assert (client.close_code, client.close_reason) == (1002, "reserved bits set")
    finally:
        client.vanish()


async def test_corrupt_compressed_message_is_closed_with_1002(
    server: AppServer, ctx: Ctx, stats: ProtocolErrorCounters
) -> None:
    headers = {"Sec-WebSocket-Extensions": "permessage-deflate"}
    client = await WebSocketTestClient.connect(server.ws_url("/deflate"), headers=headers)
    try:
        await ctx.handler()
        await client.send_raw(build(0x2, b"\xff\xff\xff\xff", rsv=4))  # not deflate data
        await client.wait_closed(scaled(5))
        assert (client.close_code, client.close_reason) == (1002, "decompression failed")
        assert await ctx.close_seen() == (None, None)  # on_close ran
    finally:
        client.vanish()
    assert dict(stats.stats().by_reason) == {"decompression failed": 1}


async def test_rsv1_without_negotiation_is_an_error(server: AppServer, ctx: Ctx) -> None:
    client, _ = await failed_with(server, ctx, build(0x1, deflate(b"x"), rsv=4), "/deflate")
    assert (client.close_code, client.close_reason) == (1002, "reserved bits set")


def test_make_strict_keeps_tornado_params() -> None:
    handler: Any = object()
    params: Any = SimpleNamespace(max_message_size=123, compression_options={})
    plain = WebSocketProtocol13(handler, False, params)
    record = ProtocolErrorCounters().record
    strict = make_strict(plain, handler, record)
    assert isinstance(strict, StrictWebSocketProtocol)
    assert strict.params is params and strict.mask_outgoing is False and strict.handler is handler
    assert strict.on_error == record
    assert make_strict(strict, handler) is strict
    assert make_strict(None, handler) is None


def test_make_strict_refuses_other_subclasses() -> None:
    class Custom(WebSocketProtocol13):
        pass

    params = SimpleNamespace(compression_options=None)
    with pytest.raises(LongConnError, match="Custom"):
        make_strict(Custom(object(), False, params), object())  # type: ignore[arg-type]


# -- the door: version checks --------------------------------------------------


@pytest.mark.parametrize("name", ["_accept_connection", "_handle_message", "_abort"])
def test_missing_private_method_raises_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    owner = next(c for c in WebSocketProtocol13.__mro__ if name in vars(c))
    monkeypatch.delattr(owner, name)
    with pytest.raises(LongConnError) as info:
        door.check_websocket()
    assert name in str(info.value) and tornado.version in str(info.value)
    with pytest.raises(LongConnError, match=name):
        check_tornado()  # the door's registry runs this check too


def test_missing_instance_attribute_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def init(self: Any, handler: Any, mask_outgoing: bool, params: Any) -> None:
        self.params = params  # a Tornado whose __init__ no longer sets _decompressor

    monkeypatch.setattr(WebSocketProtocol13, "__init__", init)
    with pytest.raises(
        LongConnError, match=r"_decompressor .*" + tornado.version.replace(".", r"\.")
    ):
        door.check_websocket()


# -- the pure rules ------------------------------------------------------------


def test_close_code_ranges_exhaustively() -> None:
    valid = {1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)}
    assert {c for c in range(65536) if is_valid_close_code(c)} == valid


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", None),
        (b"\x03", (1002, "close payload of 1 byte")),
        (b"\x03\xe8", None),
        (b"\x03\xe8" + "é".encode(), None),
        (b"\x03\xed", (1002, "invalid close code")),  # 1005
        (b"\x03\xe8\xc3", (1007, "close reason not UTF-8")),  # truncated sequence
        (b"\x13\x88\xff", (1007, "close reason not UTF-8")),  # the reason is checked first
    ],
)
def test_close_payload_failure(payload: bytes, expected: tuple[int, str] | None) -> None:
    assert close_payload_failure(payload) == expected


def test_frame_checker_tracks_fragmentation() -> None:
    checker = FrameChecker(expect_masked=True, deflate=False)
    masked = 0x80
    assert checker.check(0x02, masked) is None  # binary, first fragment
    assert checker.in_fragment
    assert checker.check(0x89, masked) is None  # a ping in between
    assert checker.check(0x00, masked) is None  # continuation
    assert checker.check(0x80, masked) is None  # final continuation
    assert not checker.in_fragment
    assert checker.check(0x80, masked) == (1002, "continuation without a message")


def test_frame_checker_client_side_wants_unmasked_frames() -> None:
    checker = FrameChecker(expect_masked=False, deflate=False)
    assert checker.check(0x81, 0x05) is None
    assert checker.check(0x81, 0x85) == (1002, "frame masked")


def test_frame_checker_deflate_allows_rsv1_on_data_only() -> None:
    checker = FrameChecker(expect_masked=True, deflate=True)
    assert checker.check(0xC1, 0x85) is None  # compressed text
    assert checker.check(0xC2, 0x85) is None  # compressed binary
    assert checker.check(0xA1, 0x85) == (1002, "reserved bits set")  # RSV2
    assert checker.check(0xC9, 0x80) == (1002, "reserved bits set")  # compressed ping
    assert checker.check(0x42, 0x85) is None  # first frame of a compressed message
    assert checker.check(0x40, 0x85) == (1002, "reserved bits set")  # not on a continuation


close_payloads = st.one_of(
    st.binary(max_size=3),
    st.tuples(
        st.sampled_from([0, 999, 1000, 1002, 1004, 1005, 1006, 1007, 1014, 1015, 2999, 3000, 4999])
        | st.integers(0, 65535),
        st.sampled_from([b"", b"bye", "\u00e9".encode(), b"\xff", b"\xe2\x82"]),
    ).map(lambda t: struct.pack("!H", t[0]) + t[1]),
)
frames = st.lists(
    st.tuples(
        st.sampled_from([0x2] * 6 + [0x0] * 2 + [0x8] * 4 + [0x9, 0xA] * 2 + [0x3, 0x7, 0xB, 0xF]),
        st.sampled_from([True] * 4 + [False]),  # fin
        st.sampled_from([0] * 20 + [1, 2, 4]),  # rsv
        st.sampled_from([True] * 20 + [False]),  # masked
        st.sampled_from([0, 1, 2, 3] * 2 + [125, 126]).map(lambda n: b"x" * n),
        close_payloads,
    ),
    max_size=5,
)


def strict_verdict(sequence: list[tuple[int, bool, int, bool, bytes]]) -> int | str | None:
    """What the strict reader does with these frames: a close code, "closed", or None."""
    checker = FrameChecker(expect_masked=True, deflate=False)
    for opcode, fin, rsv, masked, payload in sequence:
        first = (0x80 if fin else 0) | rsv << 4 | opcode
        second = (0x80 if masked else 0) | min(len(payload), 126)
        failure = checker.check(first, second)
        if failure is None and opcode == 0x8:
            failure = close_payload_failure(payload)
            if failure is None:
                return "closed"
        if failure is not None:
            return failure.code
    return None


def websockets_verdict(data: bytes) -> int | str | None:
    """What python-websockets' sans-I/O server protocol does with the same bytes."""
    protocol = Protocol(Side.SERVER, state=State.OPEN, max_size=None)
    protocol.receive_data(data)
    if (
        protocol.close_rcvd is not None
        and str(protocol.parser_exc) == "incomplete fragmented message"
    ):
        # One deliberate difference: a valid close frame inside a fragmented message
        # is echoed (RFC 6455 5.4 allows control frames there); websockets sends 1002.
        return "closed"
    if protocol.parser_exc is not None:
        assert protocol.close_sent is not None
        return int(protocol.close_sent.code)
    return "closed" if protocol.close_rcvd is not None else None


@settings(max_examples=500, deadline=None)
@given(frames)
def test_frame_rules_match_python_websockets(
    generated: list[tuple[int, bool, int, bool, bytes, bytes]],
) -> None:
    """Differential: header, fragmentation and close-frame rules agree with websockets.

    Text payloads are binary noise here: websockets checks UTF-8 in its
    connection layer, not in the protocol (the server tests above cover 1007).
    """
    sequence = []
    for opcode, fin, rsv, masked, payload, close_payload in generated:
        if opcode == 0x1:
            opcode = 0x2
        sequence.append((opcode, fin, rsv, masked, close_payload if opcode == 0x8 else payload))
        if opcode == 0x8:
            break
    data = b"".join(
        build(opcode, payload, fin=fin, rsv=rsv, mask=masked)
        for opcode, fin, rsv, masked, payload in sequence
    )
    assert strict_verdict(sequence) == websockets_verdict(data)


def test_stats_for_application() -> None:
    app = tornado.web.Application()
    counters = ProtocolErrorCounters.for_application(app)
    assert ProtocolErrorCounters.for_application(app) is counters
    assert app.settings["websocket_protocol_errors"] is counters
    assert protocol_error_stats(app) == ProtocolErrorStats()
    counters.record(1002, "frame not masked")
    counters.record(1007, "text not UTF-8")
    counters.record(1002, "frame not masked")
    snapshot = protocol_error_stats(app)
    assert snapshot == ProtocolErrorStats(
        total=3,
        by_code=((1002, 2), (1007, 1)),
        by_reason=(("frame not masked", 2), ("text not UTF-8", 1)),
    )
    counters.record(1009, "message too big")
    assert snapshot.total == 3  # a snapshot does not follow the live counters
    bad = tornado.web.Application(websocket_protocol_errors={})
    with pytest.raises(TypeError):
        ProtocolErrorCounters.for_application(bad)
    with pytest.raises(TypeError):
        protocol_error_stats(bad)


def test_reader_not_started_by_name_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    async def accept(self: Any, handler: Any) -> None:
        await self._read_all_frames()  # a Tornado that renamed its frame loop

    monkeypatch.setattr(WebSocketProtocol13, "_accept_connection", accept)
    with pytest.raises(LongConnError, match=r"_receive_frame_loop is missing.*no longer started"):
        door.check_websocket()


def test_missing_websocket_mask_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tornado.util, "_websocket_mask")
    with pytest.raises(LongConnError, match=r"_websocket_mask"):
        door.check_websocket()


def test_missing_frame_compressed_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def init(self: Any, handler: Any, mask_outgoing: bool, params: Any) -> None:
        # A Tornado whose __init__ sets everything the reader reads but _frame_compressed.
        self._decompressor = self.params = params
        self.mask_outgoing = mask_outgoing
        self.stream = self.close_code = self.close_reason = None
        self.client_terminated = self.server_terminated = False
        self._wire_bytes_in = 0

    monkeypatch.setattr(WebSocketProtocol13, "__init__", init)
    with pytest.raises(LongConnError, match=r"_frame_compressed is missing.*no longer set"):
        door.check_websocket()
