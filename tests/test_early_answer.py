"""Answers sent while the request body still arrives reach the client (raw sockets).

Without :class:`EarlyAnswerMixin`, Tornado closes such a connection at once with
body bytes unread and the kernel resets it; these tests read every byte the server
sends and require the status, ``Connection: close`` and then a clean end of stream
(or a served next request), never a reset before the status was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import pytest
import tornado.web

from tornado_longconn.streaming import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
    EarlyAnswer,
    EarlyAnswerMixin,
    default_early_answer,
)
from tornado_longconn.testing import AppServer, scaled


@dataclass
class Response:
    """One HTTP/1.1 response as read from a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes = b""

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


@dataclass
class RawHTTP:
    """A byte-level HTTP/1.1 client on one socket (reads exactly what the server sent)."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, port: int) -> RawHTTP:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _fill(self) -> bytes:
        chunk = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recv(self.sock, 65536), scaled(10)
        )
        self.buffer += chunk
        return chunk

    async def response(self) -> Response:
        """Read one response (head and Content-Length body); ConnectionResetError if reset."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                raise EOFError(f"end of stream before a response: {bytes(self.buffer)!r}")
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        self.buffer[:] = rest
        while len(self.buffer) < length:
            if not await self._fill():
                raise EOFError("end of stream inside a response body")
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return Response(status, headers, body)

    async def end_of_stream(self) -> bytes:
        """Read until the server closes; returns what came (ConnectionResetError if reset)."""
        got = bytearray(self.buffer)
        self.buffer.clear()
        while chunk := await self._fill():
            got += chunk
            self.buffer.clear()
        return bytes(got)

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, length: int | None, **headers: str) -> bytes:
    """The head of a request; ``length`` None sends ``Transfer-Encoding: chunked``."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@tornado.web.stream_request_body
class Guarded(EarlyAnswerMixin, tornado.web.RequestHandler):
    """Refuses in prepare (``?deny``), or mid-body past ``?limit=`` bytes; else echoes the size."""

    def initialize(
        self, early_answer: EarlyAnswer | None = None, closed: asyncio.Event | None = None
    ) -> None:
        self.early_answer = early_answer
        self.closed = closed
        self.received = 0

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self.closed is not None:
            self.closed.set()

    def prepare(self) -> None:
        if self.get_query_argument("deny", None) is not None:
            raise tornado.web.HTTPError(403)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        self.received += len(chunk)
        limit = int(self.get_query_argument("limit", "0"))
        if limit and self.received > limit and not self._finished:
            self.set_status(413)
            self.finish("too large\n")
        return None

    def put(self) -> None:
        self.finish(f"{self.received}\n")


@contextlib.asynccontextmanager
async def serve(
    policy: EarlyAnswer | None = None, closed: asyncio.Event | None = None
) -> AsyncIterator[AppServer]:
    kwargs = {"early_answer": policy, "closed": closed}
    app = tornado.web.Application([(r"/up", Guarded, kwargs)])
    async with AppServer(app) as server:
        yield server


BODY = 300_000


async def test_answer_from_prepare_is_read_and_the_connection_ends_cleanly() -> None:
    policy = EarlyAnswer()
    async with serve(policy) as server:
        client = await RawHTTP.connect(server.port)
        try:
            await client.send(request("PUT", "/up?deny=1", BODY))
            answer = await client.response()
            assert answer.status == 403 and answer.closes
            # The client goes on sending its body (as most HTTP libraries do) and a
            # next request on the same socket: no reset, a clean end of stream.
            await client.send(b"x" * BODY + request("PUT", "/up", 0))
            assert await client.end_of_stream() == b""
        finally:
            client.close()
    assert policy.stats().answered == 1


async def test_answer_mid_body_is_read_then_the_body_is_drained() -> None:
    async with serve() as server:
        client = await RawHTTP.connect(server.port)
        try:
            await client.send(request("PUT", "/up?limit=100000", BODY) + b"y" * 150_000)
            answer = await client.response()
            assert (answer.status, answer.body, answer.closes) == (413, b"too large\n", True)
            await client.send(b"y" * (BODY - 150_000))
            assert await client.end_of_stream() == b""
        finally:
            client.close()
    assert default_early_answer(server.app).stats().answered == 1


async def test_chunked_body_answered_early() -> None:
    async with serve() as server:
        client = await RawHTTP.connect(server.port)
        try:
            await client.send(request("PUT", "/up?deny=1", None))
            answer = await client.response()
            assert answer.status == 403 and answer.closes
            piece = b"z" * 4096
            body = (b"%x\r\n" % len(piece) + piece + b"\r\n") * 20 + b"0\r\n\r\n"
            await client.send(body)
            assert await client.end_of_stream() == b""
        finally:
            client.close()


async def test_a_consumed_body_keeps_the_connection_alive() -> None:
    async with serve() as server:
        client = await RawHTTP.connect(server.port)
        try:
            for _ in range(2):
                await client.send(request("PUT", "/up", 1000) + b"a" * 1000)
                answer = await client.response()
                assert (answer.status, answer.body, answer.closes) == (200, b"1000\n", False)
        finally:
            client.close()
    assert default_early_answer(server.app).stats().answered == 0


async def test_drain_stops_at_the_byte_bound() -> None:
    policy = EarlyAnswer(max_bytes=64 * 1024)
    async with serve(policy) as server:
        client = await RawHTTP.connect(server.port)
        try:
            big = 64 << 20
            await client.send(request("PUT", "/up?deny=1", big))
            answer = await client.response()
            assert answer.status == 403 and answer.closes
            # Past the bound the server closes; the client's sending then fails.
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                await asyncio.wait_for(client.send(b"q" * big), scaled(20))
        finally:
            client.close()
    assert policy.stats().closed_at_bytes == 1
    assert 64 * 1024 <= policy.stats().bytes_discarded < 64 * 1024 + 2 * 65536
    assert policy.stats().closed_at_deadline == 0


async def test_drain_stops_at_the_deadline() -> None:
    policy = EarlyAnswer(timeout=scaled(0.2))
    closed = asyncio.Event()
    async with serve(policy, closed) as server:
        client = await RawHTTP.connect(server.port)
        try:
            await client.send(request("PUT", "/up?deny=1", BODY) + b"x" * 1000)
            answer = await client.response()
            assert answer.status == 403 and answer.closes
            # The server ended its side after the answer (the client sees the end of
            # the stream) but reads on: the client sends nothing more and keeps its
            # socket open, so the server closes at the deadline.
            assert await client.end_of_stream() == b""
            assert not closed.is_set()
            await asyncio.wait_for(closed.wait(), scaled(5))
        finally:
            client.close()
    assert policy.stats().closed_at_deadline == 1
    assert policy.stats().closed_at_bytes == 0


def test_policy_defaults_and_validation() -> None:
    policy = EarlyAnswer()
    assert (policy.max_bytes, policy.timeout) == (DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT)
    assert DEFAULT_MAX_BYTES == 8 << 20 and DEFAULT_TIMEOUT == 5.0
    with pytest.raises(ValueError, match="max_bytes"):
        EarlyAnswer(max_bytes=-1)
    with pytest.raises(ValueError, match="timeout"):
        EarlyAnswer(timeout=0)
    app = tornado.web.Application()
    assert default_early_answer(app) is default_early_answer(app)
    mine = EarlyAnswer(max_bytes=0)
    app = tornado.web.Application(longconn_early_answer=mine)
    assert default_early_answer(app) is mine


def test_a_tornado_without_the_private_names_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    import tornado
    import tornado.http1connection

    from tornado_longconn._tornado.http1 import check_http1
    from tornado_longconn.exceptions import LongConnError

    check_http1()  # the installed Tornado has them
    monkeypatch.delattr(tornado.http1connection.HTTP1Connection, "_finish_request")
    with pytest.raises(LongConnError, match="_finish_request") as info:
        check_http1()
    assert tornado.version in str(info.value)


async def test_answer_over_tls_is_read() -> None:
    """Over TLS the server keeps its side open (no half-close without close_notify);
    the client reads the status and ``Connection: close``, sends its body, and sees the
    connection end at the deadline without a reset."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    policy = EarlyAnswer(timeout=scaled(0.3))
    app = tornado.web.Application([(r"/up", Guarded, {"early_answer": policy})])
    async with AppServer(app, ssl_options=server_ctx) as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_ctx, server_hostname="127.0.0.1"
        )
        try:
            writer.write(request("PUT", "/up?deny=1", BODY))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(10))
            assert head.startswith(b"HTTP/1.1 403") and b"\r\nConnection: close\r\n" in head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), scaled(10))
            writer.write(b"x" * BODY)
            await writer.drain()
            with contextlib.suppress(ssl.SSLError):  # EOF without close_notify
                assert await asyncio.wait_for(reader.read(), scaled(10)) == b""
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    assert policy.stats().closed_at_deadline == 1
