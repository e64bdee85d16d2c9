"""The public test helpers: AppServer, WebSocketTestClient, connect_many, scaled."""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import tornado.web
import tornado.websocket
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import Seen as Ctx
from tornado_longconn._frames import stream_pending_bytes
from tornado_longconn.testing import (
    MS,
    TIMEOUT_FACTOR,
    AppServer,
    ClientClosedError,
    WebSocketTestClient,
    connect_many,
    scaled,
)


class Echo(tornado.websocket.WebSocketHandler):
    def initialize(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def open(self) -> None:
        self.ctx.handlers.put_nowait(self)

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))

    def on_pong(self, data: bytes) -> None:
        self.ctx.pongs.put_nowait(data)

    def on_close(self) -> None:
        self.ctx.closed.put_nowait((self.close_code, self.close_reason))


@pytest.fixture
def ctx() -> Ctx:
    return Ctx()


def make_app(ctx: Ctx) -> tornado.web.Application:
    return tornado.web.Application([("/ws", Echo, {"ctx": ctx})])


@pytest.fixture
async def server(ctx: Ctx) -> AsyncIterator[AppServer]:
    async with AppServer(make_app(ctx)) as srv:
        yield srv


def feed_in_pieces(data: bytes, cuts: list[int]) -> WebSocketTestClient:
    """Feed ``data`` to a client's protocol, split at ``cuts``; return the client."""
    from tornado_longconn.testing import _ClientProtocol

    async def run() -> WebSocketTestClient:
        client = WebSocketTestClient()
        protocol = _ClientProtocol(client)
        protocol.handshake_done = True
        edges = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for start, end in itertools.pairwise(edges):
            protocol.data_received(data[start:end])
        return client

    return asyncio.run(run())


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=70_000)), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=10),
    masked=st.booleans(),
)
def test_client_frame_parser_any_split(
    messages: list[str | bytes], cuts: list[int], masked: bool
) -> None:
    build = WebSocketTestClient.build_frame
    data = b""
    for m in messages:
        if isinstance(m, str):
            data += build(0x1, m.encode(), mask=masked)
        else:
            data += build(0x2, m, mask=masked)
    client = feed_in_pieces(data, cuts)
    assert list(client._messages) == messages
    assert client.frames_received == len(messages)


def test_client_parser_fragments_and_control_frames() -> None:
    build = WebSocketTestClient.build_frame
    data = (
        build(0x1, "hé".encode()[:2], fin=False, mask=False)
        + build(0xA, b"pong", mask=False)  # a control frame between fragments
        + build(0x0, "hé".encode()[2:], mask=False)
        + build(0x8, b"\x03\xe8bye", mask=False)
    )
    client = feed_in_pieces(data, [1, 3, 7])
    assert list(client._messages) == ["hé"]
    assert client.pongs_received == 1
    assert (client.close_code, client.close_reason) == (1000, "bye")


def test_scaled() -> None:
    assert scaled(2.0) == 2.0 * TIMEOUT_FACTOR
    assert pytest.approx(0.001 * TIMEOUT_FACTOR) == MS


async def test_echo_text_and_binary(server: AppServer, ctx: Ctx) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/ws")) as client:
        await client.send("héllo")
        await client.send(b"\x00\xff" * 40_000)
        assert await client.recv() == "héllo"
        assert await client.recv() == b"\x00\xff" * 40_000
        assert client.messages_received == 2
        assert client.response_headers["upgrade"].lower() == "websocket"
    await asyncio.wait_for(ctx.closed.get(), scaled(5))


async def test_recv_times_out(server: AppServer) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/ws")) as client:
        with pytest.raises(asyncio.TimeoutError):
            await client.recv(timeout=scaled(0.05))


async def test_answers_pings_unless_told_not_to(server: AppServer, ctx: Ctx) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/ws")) as client:
        handler = await ctx.handler()
        handler.ping(b"one")
        assert await asyncio.wait_for(ctx.pongs.get(), scaled(5)) == b"one"
        client.auto_pong = False
        handler.ping(b"two")
        # The echo round trip proves the ping arrived before the echo; no pong follows.
        await client.send("after ping")
        assert await client.recv() == "after ping"
        assert client.pings_received == 2
        await client.send("later")
        assert await client.recv() == "later"
        assert ctx.pongs.empty()


async def test_client_ping_gets_pong(server: AppServer) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/ws")) as client:
        await client.ping(b"hi")
        await client.send("sync")
        assert await client.recv() == "sync"
        assert client.pongs_received == 1


async def test_stop_reading_fills_the_server_buffer(server: AppServer, ctx: Ctx) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"), rcvbuf=4096)
    try:
        assert client.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 4 * 4096
        handler = await ctx.handler()
        client.stop_reading()
        assert not client.reading
        payload = "p" * 1024
        conn = handler.ws_connection
        assert conn is not None
        stream = conn.stream  # type: ignore[attr-defined]
        count = 0
        while stream_pending_bytes(stream) < 256 * 1024:
            handler.write_message(payload)
            count += 1
            assert count < 100_000, "the server buffer never filled"
        client.resume_reading()
        received = await client.recv_many(count, timeout=scaled(10))
        assert received == [payload] * count
    finally:
        client.vanish()


async def test_connect_without_reading_reads_nothing_until_resumed(
    server: AppServer, ctx: Ctx
) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"), reading=False)
    try:
        assert not client.reading
        after_handshake = client.bytes_received
        handler = await ctx.handler()
        await handler.write_message("first")  # in the kernel, on its way to the client
        # A round trip on another connection: a reading client would have read it by now.
        async with await WebSocketTestClient.connect(server.ws_url("/ws")) as other:
            await other.send("sync")
            assert await other.recv() == "sync"
        assert client.bytes_received == after_handshake
        assert client.messages_received == 0
        client.resume_reading()
        assert client.reading
        assert await client.recv() == "first"
    finally:
        client.vanish()


async def test_vanish_after_the_nth_message(server: AppServer, ctx: Ctx) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"))
    client.vanish_after = 3
    handler = await ctx.handler()
    for i in range(5):
        handler.write_message(f"m{i}")
    assert await ctx.close_seen() == (None, None)  # a reset, not a close frame
    await client.wait_closed()
    assert client.messages_received == 3
    assert await client.recv_many(3) == ["m0", "m1", "m2"]
    with pytest.raises(ClientClosedError):
        await client.recv()


async def test_vanish_leaves_without_close_frame(server: AppServer, ctx: Ctx) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"))
    await ctx.handler()
    client.vanish()
    assert client.closed or client.socket is not None
    code, reason = await asyncio.wait_for(ctx.closed.get(), scaled(5))
    assert code is None and reason is None
    await client.wait_closed(scaled(5))
    with pytest.raises(ClientClosedError):
        await client.send("gone")
    client.vanish()  # again, once gone: nothing to do (uvloop's socket is closed too)


async def test_clean_close_handshake(server: AppServer, ctx: Ctx) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"))
    await ctx.handler()
    await client.close(4321, "done here")
    assert client.closed
    assert await asyncio.wait_for(ctx.closed.get(), scaled(5)) == (4321, "done here")
    assert client.close_code == 4321  # Tornado echoes the code
    await client.close()  # closing twice does nothing


async def test_server_close_is_reported(server: AppServer, ctx: Ctx) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/ws")) as client:
        handler = await ctx.handler()
        handler.write_message("bye soon")
        handler.close(4000, "slow consumer")
        assert await client.recv() == "bye soon"
        with pytest.raises(ClientClosedError) as info:
            await client.recv()
        assert (info.value.code, info.value.reason) == (4000, "slow consumer")
        await client.wait_closed()


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(WebSocketTestClient.build_frame(0x3, b"x"), id="reserved-opcode"),
        pytest.param(WebSocketTestClient.build_frame(0x1, b"x", rsv=4), id="rsv-bits"),
        pytest.param(WebSocketTestClient.build_frame(0x1, b"\xff\xfe"), id="bad-utf8"),
        pytest.param(WebSocketTestClient.build_frame(0x9, b"p" * 126), id="long-ping"),
        pytest.param(WebSocketTestClient.build_frame(0x9, b"p", fin=False), id="fragmented-ping"),
    ],
)
async def test_malformed_frames_make_the_server_close(
    server: AppServer, ctx: Ctx, frame: bytes
) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"))
    try:
        await ctx.handler()
        await client.send_raw(frame)
        await asyncio.wait_for(ctx.closed.get(), scaled(5))
        await client.wait_closed(scaled(5))
    finally:
        client.vanish()


async def test_unmasked_frame_is_sent_unmasked(server: AppServer) -> None:
    """RFC 6455 requires masking; Tornado tolerates unmasked client frames and echoes them."""
    frame = WebSocketTestClient.build_frame(0x1, b"unmasked", mask=False)
    assert frame == b"\x81\x08unmasked"
    async with await WebSocketTestClient.connect(server.ws_url("/ws")) as client:
        await client.send_raw(frame)
        assert await client.recv() == "unmasked"


async def test_fragmented_message_from_client(server: AppServer) -> None:
    async with await WebSocketTestClient.connect(server.ws_url("/ws")) as client:
        build = WebSocketTestClient.build_frame
        await client.send_raw(build(0x1, b"hel", fin=False) + build(0x0, b"lo"))
        assert await client.recv() == "hello"


async def test_handshake_refused(server: AppServer) -> None:
    with pytest.raises(ConnectionError):
        await WebSocketTestClient.connect(server.ws_url("/nothing-here"))
    with pytest.raises(ValueError):  # noqa: PT011
        await WebSocketTestClient.connect(server.url("/ws"))


async def test_connect_many(server: AppServer, ctx: Ctx) -> None:
    clients = await connect_many(server.ws_url("/ws"), 50, concurrency=10)
    try:
        assert len(clients) == 50
        handlers = [await ctx.handler() for _ in range(50)]
        assert len(set(handlers)) == 50
        for i, client in enumerate(clients):
            await client.send(f"c{i}")
        for i, client in enumerate(clients):
            assert await client.recv() == f"c{i}"
    finally:
        for client in clients:
            client.vanish()


async def test_connect_many_failure_releases_the_rest(server: AppServer) -> None:
    with pytest.raises(ConnectionError):
        await connect_many(server.ws_url("/nothing-here"), 5)


async def test_app_server_stop_closes_websockets(ctx: Ctx) -> None:
    server = AppServer(make_app(ctx)).start()
    clients = [await WebSocketTestClient.connect(server.ws_url("/ws")) for _ in range(3)]
    for _ in clients:
        await ctx.handler()
    await server.stop()
    for _ in clients:
        await asyncio.wait_for(ctx.closed.get(), scaled(5))
    for client in clients:
        await client.wait_closed(scaled(5))
    await server.stop()  # stopping twice does nothing


async def test_wss(ctx: Ctx) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with AppServer(make_app(ctx), ssl_options=server_ctx) as server:
        assert server.ws_url("/ws").startswith("wss://")
        client = await WebSocketTestClient.connect(
            server.ws_url("/ws"), ssl=client_ctx, rcvbuf=4096
        )
        try:
            handler = await ctx.handler()
            client.stop_reading()
            for i in range(2000):
                handler.write_message(f"m{i}" + "z" * 1000)
            client.resume_reading()
            got = await client.recv_many(2000, timeout=scaled(10))
            assert got == [f"m{i}" + "z" * 1000 for i in range(2000)]
            await client.close()
        finally:
            client.vanish()


async def test_a_server_that_accepted_nothing_stops_cleanly() -> None:
    app = tornado.web.Application([])
    server = AppServer(app).start()
    await server.stop()  # no connection was ever accepted
    assert server.server is None
