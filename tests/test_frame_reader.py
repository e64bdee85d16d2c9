"""Hypothesis: the strict reader hands over exactly the messages a client sent.

Random messages (text and binary, sizes around every header and chunk boundary),
split into fragments with pings between them, optionally compressed, are written
to a real socket in pieces of random sizes; the handler must receive each message
whole, in order, once, and the connection must stay open. The pieces make the
reader meet every split: a header cut after one byte, a mask cut in two, a payload
that continues in the next read, several frames in one read.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from typing import Any

import tornado.web
import tornado.websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import run_on_suite_loop
from tornado_longconn._tornado.websocket import READ_CHUNK
from tornado_longconn.strict import StrictWebSocketMixin
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled

build = WebSocketTestClient.build_frame

SIZES = st.one_of(
    st.sampled_from(
        [0, 1, 125, 126, 127, 65_535, 65_536, 65_537, READ_CHUNK - 14, READ_CHUNK + 14]
    ),
    st.integers(0, 3 * READ_CHUNK),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bool, bytes, list[int], list[bool]]:
    """(binary?, payload, fragment cut points, ping after fragment i?)."""
    binary = draw(st.booleans())
    size = draw(SIZES)
    payload = draw(st.binary(min_size=size, max_size=size)) if size < 64 else bytes(size)
    if not binary:
        payload = payload.decode("latin-1").encode("utf-8")  # valid UTF-8 text
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    pings = draw(st.lists(st.booleans(), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    return binary, payload, cuts, pings


class Recorder(StrictWebSocketMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, received: asyncio.Queue[str | bytes], closed: list[int | None]) -> None:
        self.received = received
        self.closed = closed

    def on_message(self, message: str | bytes) -> None:
        self.received.put_nowait(message)

    def on_close(self) -> None:
        self.closed.append(self.close_code)


class DeflateRecorder(Recorder):
    def get_compression_options(self) -> dict[str, Any]:
        return {}


def wire(msgs: list[tuple[bool, bytes, list[int], list[bool]]], deflate: bool) -> bytes:
    """The client's frames for ``msgs`` (one compression context, as negotiated)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    out = bytearray()
    for binary, payload, cuts, pings in msgs:
        body = payload
        if deflate:
            body = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
            body = body[:-4]  # RFC 7692: the 00 00 ff ff tail is not sent
            cuts = [min(c, len(body)) for c in cuts]
        bounds = [0, *cuts, len(body)]
        parts = [body[a:b] for a, b in itertools.pairwise(bounds)]
        for i, part in enumerate(parts):
            opcode = (0x2 if binary else 0x1) if i == 0 else 0x0
            rsv = 4 if deflate and i == 0 else 0
            out += build(opcode, part, fin=i == len(parts) - 1, rsv=rsv)
            if pings[i]:
                out += build(0x9, b"p%d" % i)
    return bytes(out)


async def scenario(
    msgs: list[tuple[bool, bytes, list[int], list[bool]]], deflate: bool, pieces: list[int]
) -> None:
    received: asyncio.Queue[str | bytes] = asyncio.Queue()
    closed: list[int | None] = []
    options = {"received": received, "closed": closed}
    app = tornado.web.Application(
        [("/plain", Recorder, options), ("/deflate", DeflateRecorder, options)],
        websocket_max_message_size=4 * READ_CHUNK,
    )
    async with AppServer(app) as server:
        headers = {"Sec-WebSocket-Extensions": "permessage-deflate"} if deflate else None
        path = "/deflate" if deflate else "/plain"
        client = await WebSocketTestClient.connect(server.ws_url(path), headers=headers)
        try:
            data = wire(msgs, deflate)
            at = 0
            for size in pieces:
                if at >= len(data):
                    break
                await client.send_raw(data[at : at + size])
                at += size
                await asyncio.sleep(0)  # let the server read this piece on its own
            await client.send_raw(data[at:])
            for binary, payload, _, _ in msgs:
                got = await asyncio.wait_for(received.get(), scaled(10))
                assert got == (payload if binary else payload.decode("utf-8"))
            await client.close()
            assert closed == [1000]
        finally:
            client.vanish()
    assert received.empty()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    msgs=st.lists(messages(), min_size=1, max_size=5),
    deflate=st.booleans(),
    pieces=st.lists(st.integers(1, 2 * READ_CHUNK), max_size=12),
)
def test_reader_delivers_every_message_whole_and_in_order(
    msgs: list[tuple[bool, bytes, list[int], list[bool]]], deflate: bool, pieces: list[int]
) -> None:
    run_on_suite_loop(scenario(msgs, deflate, pieces))


def test_frames_after_a_payload_read_across_chunks_are_kept() -> None:
    """A payload that needs a second read, and the frames behind it in that read."""
    big = bytes(range(256)) * ((READ_CHUNK + 1000) // 256)
    msgs = [(True, big, [], [False]), (False, b"after", [], [False])]
    run_on_suite_loop(scenario(msgs, False, [READ_CHUNK // 2]))


def test_ping_between_compressed_fragments_keeps_the_message_compressed() -> None:
    """Tornado's own reader clears its "compressed" flag on a control frame."""
    text = ("squeezed " * 200).encode()
    msgs = [(False, text, [10, 40], [True, True, False]), (True, b"\x00" * 300, [], [True])]
    run_on_suite_loop(scenario(msgs, True, []))
