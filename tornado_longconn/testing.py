"""Helpers for testing long-connection code (public: for this project and its users).

* :func:`scaled` / :data:`MS` -- one timing factor for all timing-dependent tests,
  from the environment variable ``LONGCONN_TEST_TIMEOUT_FACTOR`` (default 1).
* :class:`AppServer` -- run a Tornado ``Application`` on a free 127.0.0.1 port
  inside the current event loop, and tear it down (WebSocket connections included).
* :class:`WebSocketTestClient` -- a small WebSocket client on raw asyncio sockets
  that misbehaves on demand: it can stop reading at the socket level (so the
  server's write buffer really fills), stop answering pings, vanish without a
  close frame, and send malformed frames. :func:`connect_many` opens N of them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl as ssl_module
import struct
import weakref
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web

__all__ = [
    "MS",
    "TIMEOUT_FACTOR",
    "AppServer",
    "ClientClosedError",
    "WebSocketTestClient",
    "connect_many",
    "scaled",
]

#: Multiplier for every interval and deadline in timing-dependent tests.
TIMEOUT_FACTOR: float = float(os.environ.get("LONGCONN_TEST_TIMEOUT_FACTOR", "1") or 1)

#: One millisecond, scaled by :data:`TIMEOUT_FACTOR`.
MS: float = 0.001 * TIMEOUT_FACTOR


def scaled(seconds: float) -> float:
    """``seconds`` multiplied by :data:`TIMEOUT_FACTOR`."""
    return seconds * TIMEOUT_FACTOR


class AppServer:
    """A Tornado application listening on a free port of 127.0.0.1.

    Use as an async context manager inside a running event loop::

        async with AppServer(app) as server:
            url = server.ws_url("/chat")     # "ws://127.0.0.1:PORT/chat"

    ``ssl_options`` serves TLS (then use ``https``/``wss`` URLs); extra keyword
    arguments go to :class:`tornado.httpserver.HTTPServer`. On exit the server
    stops listening and every open connection is closed -- WebSocket
    connections too, which Tornado's ``close_all_connections`` does not reach
    (a WebSocket detaches its stream from the HTTP server): the server keeps a
    weak reference to every accepted stream and closes those still open.
    """

    def __init__(
        self,
        app: tornado.web.Application,
        *,
        ssl_options: Any = None,
        host: str = "127.0.0.1",
        **server_kwargs: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.ssl = ssl_options is not None
        self._server_kwargs = dict(server_kwargs, ssl_options=ssl_options)
        self.server: tornado.httpserver.HTTPServer | None = None
        self.port = 0

    def start(self) -> AppServer:
        """Bind a free port and start serving (call from within a running loop)."""
        sockets = tornado.netutil.bind_sockets(0, self.host, family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self.server = _TrackingHTTPServer(self.app, **self._server_kwargs)
        self.server.add_sockets(sockets)
        return self

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        server = self.server
        if server is not None:
            self.server = None
            server.stop()
            await server.close_all_connections()
            if isinstance(server, _TrackingHTTPServer):
                streams = [s for s in server.streams if not s.closed()]
                for stream in streams:
                    stream.close()
                if streams:
                    # Let the close callbacks (handlers' on_close) run.
                    await asyncio.sleep(0)

    async def __aenter__(self) -> AppServer:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def url(self, path: str = "/") -> str:
        """``http(s)://127.0.0.1:PORT`` + ``path``."""
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}{path}"

    def ws_url(self, path: str = "/") -> str:
        """``ws(s)://127.0.0.1:PORT`` + ``path``."""
        return f"{'wss' if self.ssl else 'ws'}://{self.host}:{self.port}{path}"


class _TrackingHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTPServer that remembers (weakly) every stream it accepted."""

    streams: weakref.WeakSet[tornado.iostream.IOStream]

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        self.streams = weakref.WeakSet()  # empty until a connection is accepted
        super().initialize(*args, **kwargs)

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        self.streams.add(stream)
        super().handle_stream(stream, address)


# -- WebSocket test client ----------------------------------------------------

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_OP_CONT = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA


class ClientClosedError(ConnectionError):
    """The :class:`WebSocketTestClient` connection is closed and no message is left.

    ``code`` and ``reason`` are those of the server's close frame (``None`` and
    ``""`` when the connection ended without one).
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


class _ClientProtocol(asyncio.Protocol):
    """Handshake and frame parsing for :class:`WebSocketTestClient`."""

    def __init__(self, client: WebSocketTestClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshake_done = False
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[bytes] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.fragments: list[bytes] = []
        self.fragment_opcode = 0
        #: Set by :meth:`WebSocketTestClient.vanish`: parse nothing more.
        self.aborted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave like one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.bytes_received += len(data)
        buf = self.buffer
        buf += data
        if not self.handshake_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self.handshake_done = True
            if not client._reading and self.transport is not None:
                # connect(reading=False): no read after the handshake's bytes.
                self.transport.pause_reading()
            if not self.handshake.done():
                self.handshake.set_result(head)
        pos = 0
        n = len(buf)
        while n - pos >= 2 and not self.aborted:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                header = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                header = 10
            masked = b1 & 0x80
            if masked:
                header += 4
            if n - pos < header + length:
                break
            payload = bytes(buf[pos + header : pos + header + length])
            if masked:
                payload = _mask(payload, bytes(buf[pos + header - 4 : pos + header]))
            pos += header + length
            client.frames_received += 1
            self._frame(bool(b0 & 0x80), b0 & 0x0F, payload)
        if self.aborted:
            buf.clear()
        elif pos:
            del buf[:pos]

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        client = self.client
        if opcode == _OP_PING:
            client.pings_received += 1
            if client.auto_pong:
                client._write_frame(_OP_PONG, payload)
            return
        if opcode == _OP_PONG:
            client.pongs_received += 1
            return
        if opcode == _OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            client.close_code = code
            client.close_reason = payload[2:].decode("utf-8", "replace")
            if not client._close_sent:
                client._write_frame(_OP_CLOSE, payload[:2])
                client._close_sent = True
            return
        if opcode == _OP_CONT:
            self.fragments.append(payload)
            if not fin:
                return
            opcode = self.fragment_opcode
            payload = b"".join(self.fragments)
            self.fragments = []
        elif not fin:
            self.fragment_opcode = opcode
            self.fragments = [payload]
            return
        message: str | bytes = payload.decode("utf-8") if opcode == _OP_TEXT else payload
        client.messages_received += 1
        client._messages.append(message)
        waiter = client._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if client.vanish_after is not None and client.messages_received >= client.vanish_after:
            client.vanish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionResetError("connection lost during handshake"))
            self.handshake.exception()
        if not self.lost.done():
            self.lost.set_result(None)
        waiter = self.client._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class WebSocketTestClient:
    """A WebSocket client on raw asyncio sockets that misbehaves on demand.

    Connect with :meth:`connect` (``ws://`` or ``wss://``). It does the HTTP
    upgrade and the framing itself (masked client frames, no extensions), so
    it can do what a well-behaved library would not:

    * :meth:`stop_reading` / :meth:`resume_reading` -- pause reading from the
      socket; with a small ``rcvbuf`` the server's write buffer really fills,
      as with a phone on a bad network;
    * ``connect(..., reading=False)`` -- never read past the handshake until
      :meth:`resume_reading`;
    * ``auto_pong = False`` -- stop answering pings (on by default);
    * :meth:`vanish` -- abort the TCP connection: no close frame, a reset;
      ``vanish_after = n`` does it on its own when the n-th message arrives
      (a peer that dies in the middle of a burst);
    * :meth:`send_raw` and :meth:`build_frame` -- send malformed frames;
    * :meth:`close` -- a clean close handshake.

    Received messages are kept in order (``str`` for text, ``bytes`` for
    binary) and returned by :meth:`recv`. Use as an async context manager, or
    call :meth:`close` or :meth:`vanish`; the socket is always released.

    Example::

        async with await WebSocketTestClient.connect(server.ws_url("/feed"), rcvbuf=4096) as c:
            c.stop_reading()
            ...                      # the server's writer now hits its high-water mark
            c.resume_reading()
            message = await c.recv(timeout=scaled(5))
    """

    def __init__(self) -> None:
        #: Answer pings with pongs (default True). Set False to play a dead peer.
        self.auto_pong = True
        #: Abort the connection (as :meth:`vanish`) as soon as this many messages
        #: were received in all, the last one kept; ``None`` (default): never.
        self.vanish_after: int | None = None
        #: Close code and reason of the server's close frame, once received.
        self.close_code: int | None = None
        self.close_reason = ""
        #: Counters: raw bytes, frames (all opcodes) and data messages received,
        #: pings and pongs received.
        self.bytes_received = 0
        self.frames_received = 0
        self.messages_received = 0
        self.pings_received = 0
        self.pongs_received = 0
        #: The server's handshake response headers (lower-case names).
        self.response_headers: dict[str, str] = {}
        self._messages: deque[str | bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._protocol: _ClientProtocol | None = None
        self._close_sent = False
        self._reading = True

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        subprotocols: Sequence[str] = (),
        rcvbuf: int | None = None,
        ssl: ssl_module.SSLContext | None = None,
        timeout: float | None = None,
        reading: bool = True,
    ) -> WebSocketTestClient:
        """Open a connection to ``url`` and complete the WebSocket handshake.

        ``rcvbuf`` sets ``SO_RCVBUF`` before connecting (a small value makes a
        stopped reader fill the server's buffers quickly). ``reading=False``
        stops reading the moment the handshake response arrived, as
        :meth:`stop_reading` would, but before the server's first frames can be
        read (only those that came in the handshake's own segment are); call
        :meth:`resume_reading` to read again. ``ssl`` is the client
        context for ``wss://`` (default: the system's). ``timeout`` bounds the
        handshake (default ``scaled(10)``). Raises :class:`ConnectionError` if
        the server does not answer ``101 Switching Protocols``.
        """
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        if parts.scheme not in ("ws", "wss") or parts.hostname is None:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        port = parts.port or (443 if secure else 80)
        host = parts.hostname
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        client = cls()
        client._reading = reading
        try:
            sock.setblocking(False)
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout or scaled(10))
            if secure and ssl is None:
                ssl = ssl_module.create_default_context()
            _, protocol = await loop.create_connection(
                lambda: _ClientProtocol(client),
                sock=sock,
                ssl=ssl if secure else None,
                server_hostname=host if secure else None,
            )
        except BaseException:
            sock.close()
            raise
        client._protocol = protocol
        try:
            await asyncio.wait_for(
                client._handshake(host, port, path, headers or {}, subprotocols),
                timeout or scaled(10),
            )
        except BaseException:
            client.vanish()
            raise
        return client

    async def _handshake(
        self,
        host: str,
        port: int,
        path: str,
        headers: dict[str, str],
        subprotocols: Sequence[str],
    ) -> None:
        protocol = self._protocol
        assert protocol is not None and protocol.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
        lines += [f"{name}: {value}" for name, value in headers.items()]
        protocol.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = await protocol.handshake
        status, *header_lines = head.decode("latin-1").split("\r\n")
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                self.response_headers[name.strip().lower()] = value.strip()
        if status.split(" ")[1:2] != ["101"]:
            raise ConnectionError(f"WebSocket handshake refused: {status}")
        expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if self.response_headers.get("sec-websocket-accept") != expected:
            raise ConnectionError("bad Sec-WebSocket-Accept in the handshake response")

    async def __aenter__(self) -> WebSocketTestClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            try:
                await self.close(timeout=scaled(2))
            except (OSError, asyncio.TimeoutError):
                self.vanish()

    # -- state ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the TCP connection is gone."""
        protocol = self._protocol
        return protocol is None or protocol.lost.done()

    @property
    def reading(self) -> bool:
        """False between :meth:`stop_reading` and :meth:`resume_reading`."""
        return self._reading

    @property
    def pending_messages(self) -> int:
        """Messages received and not yet taken by :meth:`recv`."""
        return len(self._messages)

    @property
    def socket(self) -> Any:
        """The client's socket object (for ``getsockopt`` and the like)."""
        protocol = self._protocol
        assert protocol is not None and protocol.transport is not None
        return protocol.transport.get_extra_info("socket")

    # -- receiving -----------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> str | bytes:
        """The next message (``str`` or ``bytes``), waiting at most ``timeout`` seconds.

        ``timeout`` defaults to ``scaled(10)``. Raises :class:`asyncio.TimeoutError`
        when nothing arrives in time, and :class:`ClientClosedError` once the
        connection is closed and every received message was taken.
        """
        deadline = timeout if timeout is not None else scaled(10)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while not self._messages:
            if self.closed:
                raise ClientClosedError(self.close_code, self.close_reason)
            waiter = self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), max(0.0, end - loop.time()))
            finally:
                self._waiter = None
        return self._messages.popleft()

    async def recv_many(self, count: int, timeout: float | None = None) -> list[str | bytes]:
        """Receive exactly ``count`` messages within ``timeout`` seconds in total."""
        deadline = timeout if timeout is not None else scaled(10)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        return [await self.recv(max(0.0, end - loop.time())) for _ in range(count)]

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until the TCP connection is gone (default bound ``scaled(10)``)."""
        protocol = self._protocol
        if protocol is None:
            return
        await asyncio.wait_for(
            asyncio.shield(protocol.lost), timeout if timeout is not None else scaled(10)
        )

    def stop_reading(self) -> None:
        """Stop reading from the socket: data piles up in the kernel, then at the server."""
        protocol = self._protocol
        if self._reading and protocol is not None and protocol.transport is not None:
            self._reading = False
            if not protocol.transport.is_closing():
                protocol.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again after :meth:`stop_reading`."""
        protocol = self._protocol
        if not self._reading and protocol is not None and protocol.transport is not None:
            self._reading = True
            if not protocol.transport.is_closing():
                protocol.transport.resume_reading()

    # -- sending -------------------------------------------------------------

    @staticmethod
    def build_frame(
        opcode: int,
        payload: bytes,
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
        length: int | None = None,
    ) -> bytes:
        """Build one client frame, valid or not (for malformed-frame tests).

        ``rsv`` is put in the RSV1-3 bits (0-7); ``mask=False`` sends an
        unmasked frame (a protocol error for a client); ``length`` overrides
        the declared payload length.
        """
        first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0x0F)
        n = len(payload) if length is None else length
        mask_bit = 0x80 if mask else 0
        if n < 126:
            header = struct.pack("!BB", first, mask_bit | n)
        elif n <= 0xFFFF:
            header = struct.pack("!BBH", first, mask_bit | 126, n)
        else:
            header = struct.pack("!BBQ", first, mask_bit | 127, n)
        if mask:
            key = os.urandom(4)
            return header + key + _mask(payload, key)
        return header + payload

    def _write(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            raise ClientClosedError(self.close_code, self.close_reason)
        protocol.transport.write(data)

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        try:
            self._write(self.build_frame(opcode, payload))
        except ClientClosedError:
            pass

    async def send(self, message: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) message in one masked frame.

        Raises :class:`ClientClosedError` if the connection is closed.
        """
        if isinstance(message, str):
            self._write(self.build_frame(_OP_TEXT, message.encode("utf-8")))
        else:
            self._write(self.build_frame(_OP_BINARY, bytes(message)))

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` to the socket as is (e.g. a malformed frame from :meth:`build_frame`)."""
        self._write(data)

    async def ping(self, data: bytes = b"") -> None:
        """Send a ping frame (the server answers with a pong, counted in ``pongs_received``)."""
        self._write(self.build_frame(_OP_PING, data))

    async def close(self, code: int = 1000, reason: str = "", timeout: float | None = None) -> None:
        """Close cleanly: send a close frame, then wait for the server to end the connection.

        Reading resumes so the server's close frame can arrive. Waits at most
        ``timeout`` (default ``scaled(5)``), then aborts the connection and
        raises :class:`asyncio.TimeoutError`.
        """
        if self.closed:
            return
        self.resume_reading()
        if not self._close_sent:
            self._close_sent = True
            self._write_frame(_OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))
        try:
            await self.wait_closed(timeout if timeout is not None else scaled(5))
        except asyncio.TimeoutError:
            self.vanish()
            raise

    def vanish(self) -> None:
        """Abort the TCP connection at once: no close frame, a reset (``SO_LINGER`` 0).

        Models a peer that disappeared (a phone losing its network, a killed process).
        Does nothing once the connection is gone (so it may be called again).
        """
        protocol = self._protocol
        if protocol is None or protocol.transport is None or self.closed:
            return
        protocol.aborted = True
        transport = protocol.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError, TypeError, ValueError):
                # ValueError: uvloop's socket stand-in for an fd closed meanwhile.
                pass
        transport.abort()


async def connect_many(
    url: str, count: int, *, concurrency: int = 100, **kwargs: Any
) -> list[WebSocketTestClient]:
    """Open ``count`` :class:`WebSocketTestClient` connections to ``url``.

    At most ``concurrency`` handshakes run at once; ``kwargs`` go to
    :meth:`WebSocketTestClient.connect`. If one connection fails, the ones
    already open are aborted and the error is raised. The caller closes the
    clients (e.g. ``for c in clients: c.vanish()``).
    """
    clients: list[WebSocketTestClient] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> WebSocketTestClient:
        async with semaphore:
            return await WebSocketTestClient.connect(url, **kwargs)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    error: BaseException | None = None
    for result in results:
        if isinstance(result, BaseException):
            error = error or result
        else:
            clients.append(result)
    if error is not None:
        for client in clients:
            client.vanish()
        raise error
    return clients
