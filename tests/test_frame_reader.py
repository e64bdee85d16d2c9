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
import contextlib
import itertools
import zlib
from collections.abc import AsyncIterator
from typing import Any

import tornado.web
import tornado.websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Seen, run_on_suite_loop, wait_until
from tornado_longconn._tornado import iostream
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


class Parking(StrictWebSocketMixin, tornado.websocket.WebSocketHandler):
    """Records messages; an ``async`` callback for messages starting with "wait"."""

    def initialize(self, seen: Seen) -> None:
        self.seen = seen
        self.release = asyncio.Event()

    def open(self) -> None:
        self.seen.handlers.put_nowait(self)

    def on_message(self, message: str | bytes) -> Any:
        if isinstance(message, str) and message.startswith("wait"):
            return self._wait(message)
        self.seen.received.put_nowait(message)
        return None

    async def _wait(self, message: str) -> None:
        await self.release.wait()
        self.seen.received.put_nowait(message)

    def on_pong(self, data: bytes) -> None:
        self.seen.pongs.put_nowait(data)

    def on_close(self) -> None:
        self.seen.closed.put_nowait((self.close_code, self.close_reason))


def parked(handler: Parking) -> bool:
    """The reader is parked: no read pending on the stream, no reader task."""
    protocol: Any = handler.ws_connection
    stream: Any = protocol.stream
    return bool(protocol._strict_parked) and stream._read_future is None


@contextlib.asynccontextmanager
async def parked_connection() -> AsyncIterator[tuple[Seen, WebSocketTestClient, Parking]]:
    """A connection to a :class:`Parking` handler whose reader has parked.

    Afterwards (the client vanished, the server stopped) no stream of it is left
    attached to a reader.
    """
    seen = Seen()
    before = iostream.attached_readers()
    app = tornado.web.Application([("/ws", Parking, {"seen": seen})])
    async with AppServer(app) as server:
        client = await WebSocketTestClient.connect(server.ws_url("/ws"))
        try:
            handler = await seen.handler()
            await wait_until(lambda: parked(handler))
            assert iostream.attached_readers() == before + 1
            yield seen, client, handler
        finally:
            client.vanish()
    assert iostream.attached_readers() == before


def protocol_of(handler: Parking) -> Any:
    return handler.ws_connection


async def test_an_idle_connection_parks_and_wakes_for_each_frame() -> None:
    async with parked_connection() as (seen, client, handler):
        for n in range(5):
            await client.send(f"m{n}")
            assert await asyncio.wait_for(seen.received.get(), scaled(5)) == f"m{n}"
            await client.send_raw(build(0xA, b"p%d" % n))  # an unsolicited pong
            assert await asyncio.wait_for(seen.pongs.get(), scaled(5)) == b"p%d" % n
            assert parked(handler)  # read by the parked reader, no future made
        await client.close(1000, "bye")
        assert await seen.close_seen() == (1000, "bye")


async def test_an_async_callback_hands_over_to_the_coroutine_and_back() -> None:
    async with parked_connection() as (seen, client, handler):
        # Three frames in one write: the reader waits for the first one's callback
        # before it dispatches the next, as Tornado's reader does.
        await client.send_raw(build(0x1, b"wait-1") + build(0x1, b"two") + build(0x1, b"3"))
        await wait_until(lambda: not protocol_of(handler)._strict_parked)
        assert seen.received.empty()
        handler.release.set()
        got = [await asyncio.wait_for(seen.received.get(), scaled(5)) for _ in range(3)]
        assert got == ["wait-1", "two", "3"]
        await wait_until(lambda: parked(handler))  # parked again once idle
        await client.send("after")
        assert await asyncio.wait_for(seen.received.get(), scaled(5)) == "after"
        client.vanish()
        assert await seen.close_seen() == (None, None)  # a vanished peer: on_close ran


async def test_a_parked_reader_ends_when_the_stream_is_closed_under_it() -> None:
    async with parked_connection() as (seen, client, handler):
        protocol_of(handler).stream.close()
        assert await seen.close_seen() == (None, None)
        await client.wait_closed(scaled(5))


async def test_a_frame_split_across_reads_resumes_in_the_coroutine() -> None:
    async with parked_connection() as (seen, client, handler):
        frame = build(0x2, b"x" * 1000)
        await client.send_raw(frame[:1])  # half a header
        await wait_until(lambda: not protocol_of(handler)._strict_parked)
        await client.send_raw(frame[1:500])
        await client.send_raw(frame[500:])
        assert await asyncio.wait_for(seen.received.get(), scaled(5)) == b"x" * 1000
        await wait_until(lambda: parked(handler))


async def test_a_parked_reader_takes_what_recv_returns_without_a_read() -> None:
    async with parked_connection() as (seen, client, handler):
        stream = protocol_of(handler).stream
        reads: list[tuple[Any, ...]] = []
        read_bytes = stream.read_bytes

        def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(args)
            return read_bytes(*args, **kwargs)

        stream.read_bytes = counted  # the instance's own: seen before the class's
        for n in range(3):
            await client.send(f"m{n}")
            assert await asyncio.wait_for(seen.received.get(), scaled(5)) == f"m{n}"
            await client.send_raw(build(0xA, b"p%d" % n) + build(0x1, b"also"))
            assert await asyncio.wait_for(seen.pongs.get(), scaled(5)) == b"p%d" % n
            assert await asyncio.wait_for(seen.received.get(), scaled(5)) == "also"
            assert parked(handler)
        # Each read event's bytes went from recv() to the parser: no read_bytes,
        # nothing through the stream's read buffer.
        assert reads == []
        assert iostream.unread_bytes(stream) == 0
