"""BackpressureWriter on other transports: permessage-deflate, TLS, streaming HTTP.

Compression is tested with the ``websockets`` client negotiating it, both with
context takeover (each connection compresses in wire order, so a dropped or
reordered compressed frame would break the client's decompression) and with
``server_no_context_takeover`` (one compressed frame shared by every member).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import tornado.web
import tornado.websocket
import trustme
import websockets

from tests.helpers import WriterCtx as Ctx
from tests.helpers import WriterHandler
from tornado_longconn._frames import encode_message
from tornado_longconn.backpressure import BackpressureWriter, OverflowPolicy, SendResult
from tornado_longconn.exceptions import ConnectionClosedError, PeerGoneError
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled

KIB = 1024


class StreamHandler(tornado.web.RequestHandler):
    """Streams whatever the test sends through its writer, until told to finish."""

    def initialize(self, ctx: Ctx) -> None:
        self.ctx = ctx

    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        if self.get_argument("headers", "") == "now":
            await self.flush()  # the response headers go out before any message
        self.ctx.writers.put_nowait(BackpressureWriter(self, **self.ctx.writer_kwargs))
        await self.ctx.finish.wait()


def make_app(ctx: Ctx) -> tornado.web.Application:
    return tornado.web.Application(
        [("/ws", WriterHandler, {"ctx": ctx}), ("/stream", StreamHandler, {"ctx": ctx})]
    )


@pytest.fixture
def ctx() -> Ctx:
    return Ctx()


@pytest.fixture
async def server(ctx: Ctx) -> AsyncIterator[AppServer]:
    async with AppServer(make_app(ctx)) as srv:
        yield srv


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_server(ctx: Ctx, ca: trustme.CA) -> AsyncIterator[AppServer]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    async with AppServer(make_app(ctx), ssl_options=server_ctx) as srv:
        yield srv


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def noisy_text(i: int, size: int) -> str:
    """Text that compresses poorly, so compressed buffers still fill."""
    return f"{i:08d}:" + os.urandom(size).hex()[: size - 9]


def mixed_messages(n: int) -> list[Any]:
    out: list[Any] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append("same text compresses well " * (1 + i % 40))
        elif kind == 1:
            out.append(os.urandom(i % 20_000))
        elif kind == 2:
            out.append({"i": i, "payload": "abc" * (i % 500)})
        else:
            out.append(noisy_text(i, 100 + i % 5000))
    return out


def check_same(sent: list[Any], received: list[Any]) -> None:
    assert len(received) == len(sent)
    for s, r in zip(sent, received, strict=True):
        if isinstance(s, (dict, list)):
            assert json.loads(r) == s
        else:
            assert r == s


async def produce(writer: BackpressureWriter, messages: list[Any]) -> None:
    for i, m in enumerate(messages):
        if i % 2:
            await writer.drained()  # then send_nowait cannot meet the policy
            assert writer.send_nowait(m) is SendResult.WRITTEN
        else:
            await writer.send(m)


# -- permessage-deflate ------------------------------------------------------------


async def test_deflate_with_context_takeover(server: AppServer, ctx: Ctx) -> None:
    ctx.compression = {}
    messages = mixed_messages(2000)
    async with websockets.connect(server.ws_url("/ws"), max_size=None) as ws:
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        writer = await ctx.writer()
        producer = asyncio.ensure_future(produce(writer, messages))
        received = [await asyncio.wait_for(ws.recv(), scaled(10)) for _ in messages]
        await producer
    check_same(messages, received)


async def test_deflate_drop_oldest_never_drops_a_compressed_frame(
    server: AppServer, ctx: Ctx
) -> None:
    """With context takeover, only not-yet-compressed messages may be dropped."""
    ctx.compression = {}
    ctx.writer_kwargs = {
        "high_water": 64 * KIB,
        "policy": OverflowPolicy.DROP_OLDEST,
        "max_queue": 10,
    }
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KIB)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    # max_queue=1: the client stops reading its socket while we do not call recv().
    async with websockets.connect(server.ws_url("/ws"), sock=sock, max_queue=1) as ws:
        writer = await ctx.writer()
        written: list[str] = []
        while True:
            m = noisy_text(len(written), 4 * KIB)
            if writer.send_nowait(m) is not SendResult.WRITTEN:
                break
            written.append(m)
            assert len(written) < 10_000
        late = [noisy_text(100_000 + i, 2 * KIB) for i in range(30)]
        assert {writer.send_nowait(m) for m in late} == {SendResult.QUEUED}
        assert writer.stats().dropped == 31 - 10
        final = asyncio.ensure_future(writer.send("end"))
        expected = [*written, *late[-10:], "end"]
        received = [await asyncio.wait_for(ws.recv(), scaled(10)) for _ in expected]
        await asyncio.wait_for(final, scaled(10))
    assert received == expected


class NoTakeoverHandler(WriterHandler):
    """A server that compresses every message with a fresh context.

    Tornado 6.6 cannot negotiate ``server_no_context_takeover`` (its header
    parser drops parameters without a value), but a server may always reset its
    own context: every client can decode that. So this handler swaps in a
    non-persistent compressor, which is what a negotiated
    ``server_no_context_takeover`` produces in Tornado.
    """

    def open(self, *args: str, **kwargs: str) -> None:
        from tornado.websocket import _PerMessageDeflateCompressor

        conn: Any = self.ws_connection
        old = conn._compressor
        conn._compressor = _PerMessageDeflateCompressor(
            persistent=False, max_wbits=old._max_wbits, compression_options=self.ctx.compression
        )
        super().open(*args, **kwargs)


async def test_deflate_without_context_takeover_shares_one_frame(ctx: Ctx) -> None:
    ctx.compression = {}
    ctx.writer_kwargs = {"high_water": 64 << 20}  # the whole burst fits: no policy applies
    app = tornado.web.Application([("/ws", NoTakeoverHandler, {"ctx": ctx})])
    async with AppServer(app) as server:
        url = server.ws_url("/ws")
        async with (
            websockets.connect(url, max_size=None) as ws1,
            websockets.connect(url, max_size=None) as ws2,
        ):
            assert "permessage-deflate" in ws1.response.headers["Sec-WebSocket-Extensions"]
            writers = [await ctx.writer(), await ctx.writer()]
            messages = mixed_messages(300)
            encoded = [encode_message(m) for m in messages]
            for e in encoded:
                for w in writers:
                    assert w.send_nowait(e) is SendResult.WRITTEN
            for ws in (ws1, ws2):
                received = [await asyncio.wait_for(ws.recv(), scaled(10)) for _ in messages]
                check_same(messages, received)
    # Encoded once, compressed once, shared by both connections.
    assert all(len(e._deflated or {}) == 1 for e in encoded)


# -- TLS ------------------------------------------------------------------------------


async def test_tls_exact_delivery(
    tls_server: AppServer, ctx: Ctx, client_ssl: ssl.SSLContext
) -> None:
    messages = mixed_messages(1500)
    async with websockets.connect(
        tls_server.ws_url("/ws"), ssl=client_ssl, max_size=None, compression=None
    ) as ws:
        writer = await ctx.writer()
        producer = asyncio.ensure_future(produce(writer, messages))
        received = [await asyncio.wait_for(ws.recv(), scaled(10)) for _ in messages]
        await producer
    check_same(messages, received)


async def test_tls_with_deflate(
    tls_server: AppServer, ctx: Ctx, client_ssl: ssl.SSLContext
) -> None:
    ctx.compression = {}
    messages = mixed_messages(500)
    async with websockets.connect(tls_server.ws_url("/ws"), ssl=client_ssl, max_size=None) as ws:
        writer = await ctx.writer()
        producer = asyncio.ensure_future(produce(writer, messages))
        received = [await asyncio.wait_for(ws.recv(), scaled(10)) for _ in messages]
        await producer
    check_same(messages, received)


async def test_tls_stopped_reader_wakes_sender(
    tls_server: AppServer, ctx: Ctx, client_ssl: ssl.SSLContext
) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB}
    client = await WebSocketTestClient.connect(
        tls_server.ws_url("/ws"), ssl=client_ssl, rcvbuf=4 * KIB
    )
    try:
        client.stop_reading()
        writer = await ctx.writer()
        sent: list[str] = []
        while writer.buffered <= writer.high_water:
            sent.append(noisy_text(len(sent), KIB))
            await writer.send(sent[-1])
            assert len(sent) < 50_000
        sent.append("blocked")
        blocked = asyncio.ensure_future(writer.send("blocked"))
        done, _ = await asyncio.wait({blocked}, timeout=scaled(0.2))
        assert not done
        client.resume_reading()
        await asyncio.wait_for(blocked, scaled(10))
        assert await client.recv_many(len(sent), timeout=scaled(10)) == sent
    finally:
        client.vanish()


# -- streaming HTTP -------------------------------------------------------------------


async def test_http_stream_delivery(server: AppServer, ctx: Ctx) -> None:
    parts: list[Any] = ["héllo\n", b"\x00\x01raw\n", {"a": [1, 2]}, [3, "x"]]
    parts += [f"line {i}\n" for i in range(2000)]
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as http,
        http.stream("GET", server.url("/stream?headers=now")) as response,
    ):
        writer = await ctx.writer()
        await produce(writer, parts)
        writer.close()
        body = await response.aread()
    ctx.finish.set()
    expected = b"".join(
        p.encode() if isinstance(p, str) else p if isinstance(p, bytes) else json.dumps(p).encode()
        for p in parts
    )
    # JSON uses compact separators.
    expected = expected.replace(b'{"a": [1, 2]}', b'{"a":[1,2]}').replace(b'[3, "x"]', b'[3,"x"]')
    assert body == expected
    with pytest.raises(TypeError):
        writer.send_nowait(None)  # type: ignore[arg-type]


async def test_http_finish_by_the_handler_flushes_first(server: AppServer, ctx: Ctx) -> None:
    async with (
        httpx.AsyncClient(timeout=scaled(10)) as http,
        http.stream("GET", server.url("/stream?headers=now")) as response,
    ):
        writer = await ctx.writer()
        writer.send_nowait("corked, then ")
        writer._target.finish("finished")  # the cork goes out before the last chunk
        assert writer.closed
        assert writer.send_nowait("late") is SendResult.CLOSED
        with pytest.raises(ConnectionClosedError):
            await writer.send("late")
        assert await response.aread() == b"corked, then finished"
    ctx.finish.set()


def dechunk(data: bytes) -> Iterator[bytes]:
    """Decode an HTTP/1.1 chunked body (headers already removed)."""
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end], 16)
        if size == 0:
            return
        yield data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


async def http_request(port: int, rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


async def test_http_stream_backpressure(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB}
    loop = asyncio.get_running_loop()
    sock = await http_request(server.port, 4 * KIB)  # sent, and never read for now
    try:
        writer = await ctx.writer()
        sent: list[str] = []
        while writer.buffered <= writer.high_water:
            sent.append(f"{len(sent):08d}" + "y" * 1000 + "\n")
            await writer.send(sent[-1])
            assert len(sent) < 50_000
        blocked = asyncio.ensure_future(writer.send("last\n"))
        sent.append("last\n")
        done, _ = await asyncio.wait({blocked}, timeout=scaled(0.2))
        assert not done
        assert writer.stats().waits == 1
        data = b""

        async def read_all() -> None:
            nonlocal data
            while not data.endswith(b"0\r\n\r\n"):
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, "connection closed early"
                data += chunk
                if blocked.done() and not ctx.finish.is_set():
                    writer.close()
                    ctx.finish.set()

        await asyncio.wait_for(read_all(), scaled(10))
        await blocked
        _, body = data.split(b"\r\n\r\n", 1)
        assert b"".join(dechunk(body)).decode() == "".join(sent)
    finally:
        ctx.finish.set()
        sock.close()


async def test_http_peer_gone(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB}
    sock = await http_request(server.port, 4 * KIB)
    try:
        writer = await ctx.writer()
        while writer.buffered <= writer.high_water:
            await writer.send("z" * 1000)
        blocked = asyncio.ensure_future(writer.send("more"))
        done, _ = await asyncio.wait({blocked}, timeout=scaled(0.2))
        assert not done
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        with pytest.raises(PeerGoneError):
            await asyncio.wait_for(blocked, scaled(5))
        assert writer.closed
        assert writer.send_nowait("x") is SendResult.CLOSED
    finally:
        ctx.finish.set()
        sock.close()
