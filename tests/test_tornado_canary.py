"""Canary: every private Tornado name the door uses still exists and behaves as assumed.

When a Tornado release changes one of them, this file fails first, naming it.
Everything runs on real sockets (a socket pair on 127.0.0.1, a real Tornado
server); nothing is mocked. The hook registry (one patch per method, many
listeners) is tested here too.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import inspect
import os
import socket
import struct
import textwrap
import weakref
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado
import tornado.httpclient
import tornado.ioloop
import tornado.web
import tornado.websocket
import websockets
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import _PerMessageDeflateCompressor

from tests.helpers import wait_until
from tornado_longconn import HeartbeatMixin
from tornado_longconn._tornado import _check, hooks, iostream, web, websocket_proto
from tornado_longconn._tornado._check import CHECKED_VERSIONS, check_tornado
from tornado_longconn._tornado.hooks import HandlerHooks, Hook
from tornado_longconn.exceptions import LongConnError
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled


def test_installed_tornado_passes_every_check() -> None:
    check_tornado()  # raises LongConnError naming the attribute otherwise
    assert tornado.version in CHECKED_VERSIONS or tornado.version_info >= (6, 4)


def test_a_missing_name_raises_naming_it_and_the_version() -> None:
    class Renamed:
        def __init__(self) -> None:
            self._write_buffer_v2 = b""

    with pytest.raises(LongConnError) as info:
        _check.require_init_attrs(Renamed, ["_write_buffer"])
    text = str(info.value)
    assert "Renamed._write_buffer" in text and tornado.version in text
    with pytest.raises(LongConnError, match=r"Renamed\.compress"):
        _check.require_attrs(Renamed, ["compress"])


def test_every_door_module_names_the_versions_it_was_checked_against() -> None:
    for module in (iostream, websocket_proto, web, hooks):
        doc = module.__doc__ or ""
        assert "checked against Tornado" in doc, module.__name__
        for version in CHECKED_VERSIONS:
            assert version in doc, (module.__name__, version)


# -- IOStream --------------------------------------------------------------------


def _connected_stream(**options: Any) -> tuple[IOStream, socket.socket]:
    """A Tornado IOStream (``options`` for it) and the raw socket at the other end."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    listener.close()
    server_side.setblocking(False)
    client.setblocking(False)
    return IOStream(server_side, **options), client


@pytest.fixture
async def pair() -> AsyncIterator[tuple[IOStream, socket.socket]]:
    """A Tornado IOStream and the raw socket at the other end (127.0.0.1 TCP)."""
    stream, client = _connected_stream()
    yield stream, client
    stream.close()
    client.close()


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        data += await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), scaled(5))
    return data


async def test_write_indexes_advance_by_the_bytes_written(
    pair: tuple[IOStream, socket.socket],
) -> None:
    stream, client = pair
    assert iostream.write_indexes(stream) == (0, 0)
    assert iostream.idle(stream) and iostream.pending_bytes(stream) == 0
    fut = stream.write(b"a" * 1000)
    total, done = iostream.write_indexes(stream)
    assert total == 1000
    assert iostream.pending_bytes(stream) == total - done
    await fut
    assert iostream.write_indexes(stream) == (1000, 1000)
    assert iostream.idle(stream)
    assert await recv_exactly(client, 1000) == b"a" * 1000


async def test_a_full_socket_leaves_bytes_pending(pair: tuple[IOStream, socket.socket]) -> None:
    stream, _ = pair
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = b"x" * (8 << 20)  # far more than the kernel buffers of an unread connection
    fut = stream.write(big)
    total, done = iostream.write_indexes(stream)
    assert total == len(big) and done < total
    assert iostream.pending_bytes(stream) == total - done
    assert not iostream.idle(stream) and stream.writing()
    assert iostream.send_if_idle(stream, stream.socket, b"y") == -1  # would overtake
    assert iostream.try_send(stream, b"y") == 0
    stream.close()
    with pytest.raises(tornado.iostream.StreamClosedError):
        await fut
    assert iostream.pending_bytes(stream) == 0  # _write_buffer is None once closed


async def test_raw_send_when_idle(pair: tuple[IOStream, socket.socket]) -> None:
    stream, client = pair
    sock = iostream.plain_socket(stream)
    assert sock is stream.socket
    assert iostream.send_if_idle(stream, sock, b"hello") == 5
    assert iostream.try_send(stream, b" world") == 6
    assert iostream.socket_send(sock, b"!") == 1
    assert await recv_exactly(client, 12) == b"hello world!"
    assert iostream.write_indexes(stream) == (0, 0)  # raw sends bypass the indexes


async def test_closed_flag_and_closed_stream(pair: tuple[IOStream, socket.socket]) -> None:
    stream, _ = pair
    assert iostream.idle(stream)
    stream.close()
    assert stream.closed() and not iostream.idle(stream)
    assert iostream.send_if_idle(stream, stream.socket, b"x") == -1
    assert iostream.plain_socket(stream) is None


async def test_read_buffer_size_counts_unread_bytes(pair: tuple[IOStream, socket.socket]) -> None:
    stream, client = pair
    client.sendall(b"0123456789")
    assert await asyncio.wait_for(stream.read_bytes(1), scaled(5)) == b"0"
    # Tornado read what was there; 9 bytes are buffered and not consumed yet.
    assert iostream.unread_bytes(stream) == 9
    assert await stream.read_bytes(9) == b"123456789"
    assert iostream.unread_bytes(stream) == 0


async def test_close_callback_is_what_was_set(pair: tuple[IOStream, socket.socket]) -> None:
    stream, client = pair
    closed = asyncio.Event()

    def on_close() -> None:
        closed.set()

    assert iostream.close_callback(stream) is None
    stream.set_close_callback(on_close)
    assert iostream.close_callback(stream) is on_close
    reader = asyncio.ensure_future(stream.read_bytes(1))
    client.close()
    await asyncio.wait_for(closed.wait(), scaled(5))
    assert iostream.close_callback(stream) is None  # cleared before it ran
    with pytest.raises(tornado.iostream.StreamClosedError):
        await reader


async def test_abort_resets_the_connection(pair: tuple[IOStream, socket.socket]) -> None:
    stream, client = pair
    iostream.abort(stream)
    assert stream.closed()
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(loop.sock_recv(client, 10), scaled(5))
    iostream.abort(stream)  # a closed stream: nothing happens


# -- WebSocketProtocol13 and its deflate compressor ------------------------------


def test_deflate_compressor_attributes() -> None:
    shared = _PerMessageDeflateCompressor(persistent=False, max_wbits=None)
    params = websocket_proto.shared_deflate_params(shared)
    assert params == (zlib.MAX_WBITS, shared._compression_level, 8)
    persistent = _PerMessageDeflateCompressor(
        persistent=True, max_wbits=12, compression_options={"compression_level": 1, "mem_level": 5}
    )
    assert websocket_proto.shared_deflate_params(persistent) is None  # own context
    assert (persistent._max_wbits, persistent._compression_level, persistent._mem_level) == (
        12,
        1,
        5,
    )
    # compress() strips the RFC 7692 tail and keeps its context between messages.
    d = zlib.decompressobj(-12)
    for text in (b"hello hello", b"hello again"):
        out = persistent.compress(text)
        assert d.decompress(out + b"\x00\x00\xff\xff") == text


@dataclass
class Seen:
    handlers: asyncio.Queue[tornado.websocket.WebSocketHandler] = field(
        default_factory=asyncio.Queue
    )
    messages: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Echo(tornado.websocket.WebSocketHandler):
    def initialize(self, seen: Seen) -> None:
        self.seen = seen

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.get_argument("deflate", "") else None

    def open(self) -> None:
        self.seen.handlers.put_nowait(self)

    def on_message(self, message: str | bytes) -> None:
        self.seen.messages.put_nowait(message)

    def on_close(self) -> None:
        self.seen.closed.set()


class Page(tornado.web.RequestHandler):
    def initialize(self, seen: Seen) -> None:
        self.seen = seen

    async def get(self) -> None:
        before = web.finished(self)
        self.write(f"{before}")
        self.finish()
        self.seen.messages.put_nowait(f"{before} {web.finished(self)}")


class Hooked(tornado.web.RequestHandler):
    def get(self) -> None:
        registry = HandlerHooks.of(self)
        answers = []
        for hook, word in ((Hook.PROTOCOL_CLOSE, "WebSocket"), (Hook.STREAM_CLOSE, "stream")):
            try:
                registry.add(hook, lambda: None)
            except ValueError as exc:
                answers.append(f"no {word}" if word in str(exc) else str(exc))
        self.finish("; ".join(answers))


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
async def server(seen: Seen) -> AsyncIterator[AppServer]:
    app = tornado.web.Application(
        [
            ("/ws", Echo, {"seen": seen}),
            ("/page", Page, {"seen": seen}),
            ("/hooked", Hooked),
        ]
    )
    async with AppServer(app) as srv:
        yield srv


async def test_wire_bytes_in_and_read_progress(server: AppServer, seen: Seen) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        proto = handler.ws_connection
        assert proto is not None and not websocket_proto.uses_deflate(proto)
        assert websocket_proto.deflate_of(proto) is None
        stream = proto.stream
        assert stream is not None
        before_in = websocket_proto.wire_bytes_in(proto)
        before = websocket_proto.read_progress(proto, stream)
        await client.send("x" * 10)
        assert await asyncio.wait_for(seen.messages.get(), scaled(5)) == "x" * 10
        # A masked client frame of 10 bytes: 2 header + 4 mask + 10 payload.
        assert websocket_proto.wire_bytes_in(proto) == before_in + 16
        assert websocket_proto.read_progress(proto, stream) == before + 16


async def test_deflate_negotiated(server: AppServer, seen: Seen) -> None:
    async with websockets.connect(server.ws_url("/ws?deflate=1")) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        proto = handler.ws_connection
        assert proto is not None and websocket_proto.uses_deflate(proto)
        pmd = websocket_proto.deflate_of(proto)
        assert isinstance(pmd, _PerMessageDeflateCompressor)
        # Tornado keeps server context takeover: one context per connection.
        assert websocket_proto.shared_deflate_params(pmd) is None
        assert isinstance(pmd._max_wbits, int) and isinstance(pmd._mem_level, int)
        await handler.write_message("ping ping ping")
        assert await asyncio.wait_for(client.recv(), scaled(5)) == "ping ping ping"


async def test_request_handler_finished(server: AppServer, seen: Seen) -> None:
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(server.url("/page"))
    assert response.body == b"False"
    assert await asyncio.wait_for(seen.messages.get(), scaled(5)) == "False True"


# -- the hook registry ------------------------------------------------------------


async def test_one_patch_many_listeners_in_order(server: AppServer, seen: Seen) -> None:
    calls: list[str] = []
    after = asyncio.Event()
    async with websockets.connect(server.ws_url("/ws"), compression=None) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        registry = HandlerHooks.of(handler)
        assert HandlerHooks.of(handler) is registry and HandlerHooks.find(handler) is registry
        registry.add(Hook.CLOSE, lambda: calls.append("close-1"))
        patch = handler.__dict__["close"]
        registry.add(Hook.CLOSE, lambda: calls.append("close-2"))
        assert handler.__dict__["close"] is patch  # one patch, two listeners
        registry.add(Hook.PROTOCOL_CLOSE, lambda: calls.append("protocol"))
        registry.add(Hook.CONNECTION_CLOSE, lambda: calls.append("connection"))
        registry.add(Hook.AFTER_CONNECTION_CLOSE, lambda: calls.append("after"))
        registry.add(Hook.AFTER_CONNECTION_CLOSE, after.set)
        registry.add(Hook.STREAM_CLOSE, lambda: calls.append("stream"))
        handler.close(1000, "bye")
        await asyncio.wait_for(client.wait_closed(), scaled(5))
    await asyncio.wait_for(after.wait(), scaled(5))
    assert calls[:3] == ["close-1", "close-2", "protocol"]
    assert "connection" in calls and "after" in calls
    assert calls.index("connection") < calls.index("after")
    # Released after on_connection_close: the class methods are back.
    for name in ("close", "on_connection_close"):
        assert name not in handler.__dict__
    assert HandlerHooks.find(handler) is None


async def test_a_failing_listener_is_logged_and_the_rest_run(
    server: AppServer, seen: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    async with websockets.connect(server.ws_url("/ws"), compression=None) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        registry = HandlerHooks.of(handler)
        registry.add(Hook.CLOSE, broken)
        registry.add(Hook.CLOSE, lambda: calls.append("second"))
        handler.close()
        await asyncio.wait_for(client.wait_closed(), scaled(5))
    assert calls == ["second"]
    assert "listener bug" in caplog.text


async def test_listeners_that_are_methods_are_held_weakly(server: AppServer, seen: Seen) -> None:
    class Owner:
        def __init__(self) -> None:
            self.calls = 0

        def on_close(self) -> None:
            self.calls += 1

    async with websockets.connect(server.ws_url("/ws"), compression=None) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        registry = HandlerHooks.of(handler)
        kept, dropped = Owner(), Owner()
        gone = weakref.ref(dropped)
        registry.add(Hook.CLOSE, kept.on_close)
        registry.add(Hook.CLOSE, dropped.on_close)
        del dropped
        gc.collect()
        assert gone() is None  # the registry did not keep it alive
        registry.discard(Hook.CLOSE, kept.on_close)
        handler.close()
        await asyncio.wait_for(client.wait_closed(), scaled(5))
        assert kept.calls == 0


async def test_the_registry_does_not_keep_the_handler_alive(server: AppServer, seen: Seen) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        registry = HandlerHooks.of(handler)
        registry.add(Hook.CLOSE, lambda: None)
        registry.add(Hook.PROTOCOL_CLOSE, lambda: None)
        registry.add(Hook.STREAM_CLOSE, lambda: None)
        ref = weakref.ref(handler)
        registry_ref = weakref.ref(registry)
        del handler, registry
        await client.close()
    await asyncio.wait_for(seen.closed.wait(), scaled(5))
    for _ in range(100):  # the loop may still hold the handler for one more callback
        gc.collect()
        if ref() is None:
            break
        await asyncio.sleep(0)
    assert ref() is None and registry_ref() is None


async def test_an_earlier_instance_patch_is_kept_and_put_back(
    server: AppServer, seen: Seen
) -> None:
    calls: list[str] = []
    async with websockets.connect(server.ws_url("/ws"), compression=None) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        class_close = type(handler).close

        def theirs(code: int | None = None, reason: str | None = None) -> None:
            calls.append("theirs")
            class_close(handler, code, reason)

        handler.close = theirs  # type: ignore[method-assign]
        registry = HandlerHooks.of(handler)
        registry.add(Hook.CLOSE, lambda: calls.append("ours"))
        registry.release()
        assert handler.__dict__["close"] is theirs
        registry = HandlerHooks.of(handler)
        registry.add(Hook.CLOSE, lambda: calls.append("ours"))
        handler.close()
        await asyncio.wait_for(client.wait_closed(), scaled(5))
    assert calls == ["ours", "theirs"]


async def test_stream_close_chains_the_previous_callback(server: AppServer, seen: Seen) -> None:
    calls: list[str] = []
    done = asyncio.Event()

    def theirs() -> None:
        calls.append("theirs")
        done.set()

    async with websockets.connect(server.ws_url("/ws"), compression=None) as client:
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        proto = handler.ws_connection
        assert proto is not None
        stream = proto.stream
        assert stream is not None
        stream.set_close_callback(theirs)
        HandlerHooks.of(handler).add(Hook.STREAM_CLOSE, lambda: calls.append("ours"))
        assert iostream.close_callback(stream) not in (None, theirs)
        await client.close()
    await asyncio.wait_for(done.wait(), scaled(5))
    assert calls == ["ours", "theirs"]


async def test_hooks_need_a_websocket_for_protocol_and_stream_hooks(
    server: AppServer, seen: Seen
) -> None:
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(server.url("/hooked"))
    assert response.body == b"no WebSocket; no stream"


# -- KeepReadingIOStream: Tornado's _handle_events with one condition changed ----------

#: sha256 of the body of ``IOStream._handle_events`` (dedented, without its ``def``
#: line) in Tornado 6.4.2, 6.5.2 and 6.6.1: the method ``KeepReadingIOStream`` copies.
HANDLE_EVENTS_SHA256 = "4c018301adb34bd5acced97fcabc26a193907f0b6798a250f21735469672ea44"


def _body(func: Any) -> str:
    source = textwrap.dedent(inspect.getsource(func))
    return source.split("\n", 1)[1]


def test_handle_events_is_the_copy_keep_reading_changes() -> None:
    body = _body(IOStream._handle_events)
    assert hashlib.sha256(body.encode()).hexdigest() == HANDLE_EVENTS_SHA256, (
        f"IOStream._handle_events changed in Tornado {tornado.version}: "
        "update iostream.KeepReadingIOStream"
    )
    ours = _body(iostream.KeepReadingIOStream._handle_events)
    assert "self._read_buffer_size <= KEEP_READING_BYTES" in ours
    assert "self._read_buffer_size == 0" in body


class Counted(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    heartbeat_interval = None

    def initialize(self, seen: Seen) -> None:
        self.seen = seen

    def open(self) -> None:
        self.seen.handlers.put_nowait(self)

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message)


async def _selector_changes_per_frame(path: str, frames: int) -> tuple[int, type[Any]]:
    """Selector registration changes on the server while a client sends ``frames`` frames."""
    seen = Seen()
    app = tornado.web.Application(
        [("/counted", Counted, {"seen": seen}), ("/plain", Echo, {"seen": seen})]
    )
    loop = tornado.ioloop.IOLoop.current()
    original = loop.update_handler
    changes: list[int] = []
    async with AppServer(app) as server:
        client = await WebSocketTestClient.connect(server.ws_url(path))
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        stream = handler.ws_connection.stream
        try:
            await client.send("first")
            if path == "/counted":
                assert await client.recv(scaled(5)) == "first"
            else:
                assert await asyncio.wait_for(seen.messages.get(), scaled(5)) == "first"
            fd = stream.fileno()

            def counting(fd_: Any, events: int) -> None:
                if fd_ == fd:
                    changes.append(events)
                original(fd_, events)

            loop.update_handler = counting  # type: ignore[method-assign]
            for n in range(frames):
                await client.send(f"m{n}")
                if path == "/counted":
                    assert await client.recv(scaled(5)) == f"m{n}"
                else:
                    assert await asyncio.wait_for(seen.messages.get(), scaled(5)) == f"m{n}"
        finally:
            loop.update_handler = original  # type: ignore[method-assign]
            await client.close()
    return len(changes), type(stream)


async def test_a_stream_keeps_listening_while_a_small_frame_is_read() -> None:
    frames = 30
    # Tornado's own stream drops the socket from the selector after each frame's header
    # is read (the rest is buffered) and adds it back for the next header.
    stock, stock_type = await _selector_changes_per_frame("/plain", frames)
    assert stock_type is IOStream and stock >= frames
    # The library's WebSocket reader keeps it registered: no change per frame (the echo
    # reply's writes go straight to the socket).
    ours, ours_type = await _selector_changes_per_frame("/counted", frames)
    assert ours_type is iostream.KeepReadingIOStream
    assert ours == 0, ours


async def test_keep_reading_stops_listening_past_its_limit(
    pair: tuple[IOStream, socket.socket],
) -> None:
    stream, peer = pair
    assert iostream.keep_reading(stream) and type(stream) is iostream.KeepReadingIOStream
    first = stream.read_bytes(1)  # nothing there yet: the stream registers for reads
    peer.send(b"a")
    assert await first == b"a"
    # Nothing reads: a small amount is buffered and the stream still listens.
    peer.send(b"b" * 100)
    await wait_until(lambda: iostream.unread_bytes(stream) == 100)
    assert stream._state is not None and stream._state & tornado.ioloop.IOLoop.READ
    # More than KEEP_READING_BYTES unread: it stops listening (inbound flow control).
    peer.sendall(b"c" * (iostream.KEEP_READING_BYTES * 2))
    await wait_until(lambda: iostream.unread_bytes(stream) > iostream.KEEP_READING_BYTES)
    assert not stream._state & tornado.ioloop.IOLoop.READ
    data = await stream.read_bytes(100 + iostream.KEEP_READING_BYTES * 2)
    assert data == b"b" * 100 + b"c" * (iostream.KEEP_READING_BYTES * 2)


class CountingSocket:
    """The stream's socket, with its recv() calls counted (and those answered EAGAIN)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recvs = 0
        self.eagain = 0

    def recv(self, n: int) -> bytes:
        self.recvs += 1
        try:
            return self.sock.recv(n)
        except BlockingIOError:
            self.eagain += 1
            raise

    def recv_into(self, buf: Any, n: int = 0) -> int:
        self.recvs += 1
        try:
            return self.sock.recv_into(buf, n)
        except BlockingIOError:
            self.eagain += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


async def _recvs_per_frame(stream: IOStream, peer: socket.socket, frames: int) -> CountingSocket:
    counting = CountingSocket(stream.socket)
    stream.socket = counting  # type: ignore[assignment]
    for n in range(frames):
        read = stream.read_bytes(65536, partial=True)  # what the WebSocket reader asks
        peer.send(b"frame %d" % n)
        assert await asyncio.wait_for(read, scaled(5)) == b"frame %d" % n
    return counting


async def test_keep_reading_makes_one_recv_per_frame(
    pair: tuple[IOStream, socket.socket],
) -> None:
    stream, peer = pair
    assert iostream.keep_reading(stream)
    counting = await _recvs_per_frame(stream, peer, 20)
    # Tornado's stream also tries the socket inline for each read and reads again after
    # a short read: two more recv() calls per frame, both answered EAGAIN.
    assert (counting.recvs, counting.eagain) == (20, 0)


async def test_stock_stream_recvs_answered_eagain(pair: tuple[IOStream, socket.socket]) -> None:
    stream, peer = pair
    counting = await _recvs_per_frame(stream, peer, 20)
    assert counting.eagain >= 20  # what the test above shows KeepReadingIOStream avoids


async def test_keep_reading_reads_a_large_payload_in_one_exact_read(
    pair: tuple[IOStream, socket.socket],
) -> None:
    stream, peer = pair
    assert iostream.keep_reading(stream)
    payload = os.urandom(1 << 20)
    read = stream.read_bytes(len(payload))
    sent = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(peer, payload))
    assert await asyncio.wait_for(read, scaled(10)) == payload
    await sent


async def test_keep_reading_sees_the_peer_close_and_reset(
    pair: tuple[IOStream, socket.socket],
) -> None:
    stream, peer = pair
    assert iostream.keep_reading(stream)
    read = stream.read_bytes(65536, partial=True)
    peer.send(b"last")
    assert await read == b"last"
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset
    with pytest.raises(StreamClosedError):
        await asyncio.wait_for(stream.read_bytes(65536, partial=True), scaled(5))
    assert stream.closed() and isinstance(stream.error, ConnectionResetError)


async def test_keep_reading_keeps_the_buffer_limit() -> None:
    stream, peer = _connected_stream(max_buffer_size=1000, read_chunk_size=512)
    try:
        assert iostream.keep_reading(stream)
        read = stream.read_bytes(5000)  # more than the stream may buffer
        peer.sendall(b"x" * 5000)
        with pytest.raises(StreamClosedError):
            await asyncio.wait_for(read, scaled(5))
        assert isinstance(stream.error, StreamBufferFullError)
    finally:
        stream.close()
        peer.close()


# -- class-level WebSocket close hooks ----------------------------------------------------


async def test_class_level_hooks_run_for_every_websocket_close_path(
    server: AppServer, seen: Seen
) -> None:
    calls: list[tuple[str, str]] = []

    def record(name: str) -> Any:
        def listener(handler: Any) -> None:
            if isinstance(handler, Echo):
                calls.append((name, handler.get_argument("tag", "")))

        listener.__name__ = f"record_{name}"
        return listener

    listeners = {
        hook: record(hook.value)
        for hook in (
            Hook.PROTOCOL_CLOSE,
            Hook.STREAM_CLOSE,
            Hook.CONNECTION_CLOSE,
            Hook.AFTER_CONNECTION_CLOSE,
        )
    }
    for hook, listener in listeners.items():
        hooks.add_websocket_listener(hook, listener)
        hooks.add_websocket_listener(hook, listener)  # twice: added once
        assert hooks.websocket_listeners(hook).count(listener) == 1
    with pytest.raises(ValueError, match="not a class-level"):
        hooks.add_websocket_listener(Hook.CLOSE, listeners[Hook.PROTOCOL_CLOSE])
    try:
        client = await WebSocketTestClient.connect(server.ws_url("/ws?tag=client"))
        handler = await asyncio.wait_for(seen.handlers.get(), scaled(5))
        assert "close" not in handler.ws_connection.__dict__  # nothing per connection
        await client.close()
        await asyncio.wait_for(seen.closed.wait(), scaled(5))
        await wait_until(lambda: ("after_connection_close", "client") in calls)
        names = [name for name, tag in calls if tag == "client"]
        # The close frame: the protocol closes (and with it the stream); then the frame
        # loop ends: on_connection_close, whose abort closes the protocol again.
        assert names == [
            "protocol_close",
            "stream_close",
            "on_connection_close",
            "protocol_close",
            "stream_close",
            "after_connection_close",
        ]
    finally:
        for hook, listener in listeners.items():
            hooks._ws_listeners[hook] = tuple(
                f for f in hooks._ws_listeners[hook] if f is not listener
            )
