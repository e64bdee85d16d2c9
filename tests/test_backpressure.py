"""BackpressureWriter over real sockets: delivery, water marks, policies, peer loss.

Every test runs a real Tornado server on 127.0.0.1 (``AppServer``) and drives
the writer of the accepted connection directly from the test. Clients are the
``websockets`` library (an independent implementation, for exact delivery) and
``WebSocketTestClient`` (for a reader that stops reading or vanishes).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.web
import tornado.websocket
import websockets
from tornado.iostream import StreamClosedError

from tests.helpers import WriterCtx as Ctx
from tests.helpers import WriterHandler
from tornado_longconn._frames import encode_message
from tornado_longconn.backpressure import (
    BackpressureWriter,
    Lifecycle,
    OverflowPolicy,
    SendResult,
)
from tornado_longconn.codes import CloseCode
from tornado_longconn.exceptions import ConnectionClosedError, PeerGoneError, SlowConsumerError
from tornado_longconn.testing import AppServer, ClientClosedError, WebSocketTestClient, scaled

KIB = 1024


@pytest.fixture
def ctx() -> Ctx:
    return Ctx()


@pytest.fixture
async def server(ctx: Ctx) -> AsyncIterator[AppServer]:
    app = tornado.web.Application([("/ws", WriterHandler, {"ctx": ctx})])
    async with AppServer(app) as srv:
        yield srv


def msg(i: int, size: int = KIB) -> str:
    """A text message of ``size`` bytes that carries its index."""
    head = f"{i:08d}:"
    return head + "x" * (size - len(head))


async def fill_until(writer: BackpressureWriter, *, limit: int = 50_000) -> list[str]:
    """Await ``send`` until the buffer is above high water (so the next send waits)."""
    sent: list[str] = []
    while writer.buffered <= writer.high_water:
        m = msg(len(sent))
        await writer.send(m)
        sent.append(m)
        assert len(sent) < limit, "the buffer never filled"
    return sent


async def stopped_client(server: AppServer, **kwargs: Any) -> WebSocketTestClient:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"), rcvbuf=4 * KIB, **kwargs)
    client.stop_reading()
    return client


async def still_pending(task: asyncio.Future[Any]) -> bool:
    """True if ``task`` is still not done after a short, scaled interval."""
    done, _ = await asyncio.wait({task}, timeout=scaled(0.2))
    return not done


# -- delivery -------------------------------------------------------------------


async def test_exact_delivery_to_websockets_client(server: AppServer, ctx: Ctx) -> None:
    messages: list[Any] = []
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            messages.append(msg(i, 10 + i % 3000))
        elif kind == 1:
            messages.append(os.urandom(i % 70_000))
        elif kind == 2:
            messages.append({"i": i, "text": "héllo ✓"})
        else:
            messages.append([i, None, "x" * (i % 200)])
    async with websockets.connect(server.ws_url("/ws"), max_size=None, compression=None) as ws:
        writer = await ctx.writer()

        async def produce() -> None:
            for i, m in enumerate(messages):
                if i % 3 == 0:
                    await writer.drained()  # then send_nowait cannot meet the policy
                    assert writer.send_nowait(m) is SendResult.WRITTEN
                else:
                    await writer.send(m)

        producer = asyncio.ensure_future(produce())
        received = [await asyncio.wait_for(ws.recv(), scaled(10)) for _ in messages]
        await producer
    for sent, got in zip(messages, received, strict=True):
        if isinstance(sent, (dict, list)):
            assert json.loads(got) == sent
        else:
            assert got == sent
    stats = writer.stats()
    assert stats.messages_sent == len(messages)
    assert stats.dropped == 0


async def test_encoded_message_is_sent_as_is(server: AppServer, ctx: Ctx) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None) as ws:
        writer = await ctx.writer()
        await writer.send(encode_message({"a": 1}))
        await writer.send(encode_message(b"\x00\x01"))
        assert json.loads(await asyncio.wait_for(ws.recv(), scaled(5))) == {"a": 1}
        assert await asyncio.wait_for(ws.recv(), scaled(5)) == b"\x00\x01"


async def test_send_nowait_in_one_iteration_is_two_writes(server: AppServer, ctx: Ctx) -> None:
    # The first frame of the iteration goes straight to the socket, the other 99 are
    # corked and leave together at the end of the iteration.
    async with websockets.connect(server.ws_url("/ws"), compression=None) as ws:
        writer = await ctx.writer()
        before = writer.stats().writes
        for i in range(100):
            assert writer.send_nowait(msg(i, 100)) is SendResult.WRITTEN
        assert writer.stats().writes == before + 1  # the first frame, already written
        received = [await asyncio.wait_for(ws.recv(), scaled(5)) for _ in range(100)]
        assert received == [msg(i, 100) for i in range(100)]
        stats = writer.stats()
        assert stats.writes == before + 2
        assert stats.messages_sent == 100 and stats.bytes_sent == 100 * 102


async def test_a_burst_of_large_frames_is_still_two_writes(server: AppServer, ctx: Ctx) -> None:
    # 50 x 4 KiB in one iteration: the first frame goes straight out, the other 49
    # (about 200 KiB) stay in the cork and leave in one write, not one per 64 KiB.
    async with websockets.connect(server.ws_url("/ws"), compression=None, max_queue=None) as ws:
        writer = await ctx.writer()
        before = writer.stats().writes
        expected = [msg(i, 4 * KIB) for i in range(50)]
        for m in expected:
            assert writer.send_nowait(m) is SendResult.WRITTEN
        received = [await asyncio.wait_for(ws.recv(), scaled(5)) for _ in expected]
        assert received == expected
        assert writer.stats().writes == before + 2


async def test_large_frames_are_not_joined(server: AppServer, ctx: Ctx) -> None:
    # Frames of 64 KiB and more leave one write each: joining them would copy every
    # byte and briefly hold the connection's data twice.
    async with websockets.connect(
        server.ws_url("/ws"), compression=None, max_queue=None, max_size=None
    ) as ws:
        writer = await ctx.writer()
        before = writer.stats().writes
        expected = [msg(i, 64 * KIB) for i in range(4)]
        for m in expected:
            assert writer.send_nowait(m) is SendResult.WRITTEN
        assert writer.stats().writes == before + 4
        received = [await asyncio.wait_for(ws.recv(), scaled(5)) for _ in expected]
        assert received == expected


async def test_one_message_per_iteration_goes_straight_to_the_socket(
    server: AppServer, ctx: Ctx
) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None) as ws:
        writer = await ctx.writer()
        for i in range(20):
            assert writer.send_nowait(msg(i, 100)) is SendResult.WRITTEN
            # Written before the loop runs again: nothing corked, nothing pending.
            assert writer.stats().writes == i + 1
            assert writer.buffered == 0
            await asyncio.sleep(0)
        received = [await asyncio.wait_for(ws.recv(), scaled(5)) for _ in range(20)]
        assert received == [msg(i, 100) for i in range(20)]
        stats = writer.stats()
        assert stats.writes == 20 and stats.messages_sent == 20 and stats.bytes_sent == 20 * 102


async def test_direct_and_corked_frames_keep_order(server: AppServer, ctx: Ctx) -> None:
    # Mixed shapes: single frames per iteration, bursts, awaited sends, and frames too
    # large for the kernel to take at once (the rest goes through the stream).
    ctx.writer_kwargs = {"high_water": 64 * KIB * KIB}
    async with websockets.connect(
        server.ws_url("/ws"), compression=None, max_size=None, max_queue=None
    ) as ws:
        writer = await ctx.writer()
        expected: list[str] = []
        i = 0
        for burst in (1, 3, 1, 1, 10, 1, 2, 1):
            for _ in range(burst):
                size = 8 * KIB * KIB if i % 7 == 3 else 100
                expected.append(msg(i, size))
                assert writer.send_nowait(expected[-1]) is SendResult.WRITTEN
                i += 1
            expected.append(msg(i, 50))
            await writer.send(expected[-1])
            i += 1
            await asyncio.sleep(0)
        received = [await asyncio.wait_for(ws.recv(), scaled(10)) for _ in expected]
        assert received == expected
        stats = writer.stats()
        assert stats.peak_buffered > 0  # some frame did not fit the socket at once
        assert stats.messages_sent == len(expected)
        header = {True: 2, False: 10}
        assert stats.bytes_sent == sum(len(m) + header[len(m) < 126] for m in expected)


async def test_broadcast_to_many_members_costs_one_write_each(server: AppServer, ctx: Ctx) -> None:
    from tornado_longconn.testing import connect_many

    members = 200
    clients = await connect_many(server.ws_url("/ws"), members)
    try:
        writers = [await ctx.writer() for _ in range(members)]
        messages = [encode_message(msg(i, 200)) for i in range(100)]
        for m in messages:
            for w in writers:
                w.send_nowait(m)
        for client in clients:
            got = await client.recv_many(100, timeout=scaled(10))
            assert got == [msg(i, 200) for i in range(100)]
        # The first frame of the iteration goes straight out, the other 99 in one write.
        assert all(w.stats().writes == 2 for w in writers)
    finally:
        for client in clients:
            client.vanish()


# -- water marks and the drain wake-up ----------------------------------------------


async def test_send_waits_above_high_water_until_reader_resumes(
    server: AppServer, ctx: Ctx
) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB}
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        sent = await fill_until(writer)
        assert writer.stats().waits == 0
        blocked = asyncio.ensure_future(writer.send(msg(len(sent))))
        sent.append(msg(len(sent)))
        assert await still_pending(blocked)
        assert writer.stats().waits == 1
        client.resume_reading()
        await asyncio.wait_for(blocked, scaled(10))
        assert writer.buffered <= writer.high_water + KIB + 10
        received = await client.recv_many(len(sent), timeout=scaled(10))
        assert received == sent
        stats = writer.stats()
        # An awaited send never leaves more than high water + one frame buffered.
        assert stats.peak_buffered <= writer.high_water + KIB + 10
    finally:
        client.vanish()


async def test_drained_waits_for_low_water(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB, "low_water": 8 * KIB}
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        sent = await fill_until(writer)
        drained = asyncio.ensure_future(writer.drained())
        assert await still_pending(drained)
        client.resume_reading()
        await asyncio.wait_for(drained, scaled(10))
        assert writer.buffered <= writer.low_water
        assert await client.recv_many(len(sent), timeout=scaled(10)) == sent
    finally:
        client.vanish()


async def test_concurrent_senders_keep_the_bound(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 32 * KIB}
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        await fill_until(writer)
        peaks: list[int] = []

        async def sender(k: int) -> None:
            for j in range(20):
                await writer.send(msg(k * 1000 + j))
                peaks.append(writer.buffered)

        tasks = [asyncio.ensure_future(sender(k)) for k in range(5)]
        assert await still_pending(asyncio.gather(*tasks))
        client.resume_reading()
        await asyncio.wait_for(asyncio.gather(*tasks), scaled(10))
        assert len(peaks) == 100
        assert max(peaks) <= writer.high_water + KIB + 10
    finally:
        client.vanish()


async def test_cancelled_waiter_hands_its_turn_on(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB}
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        sent = await fill_until(writer)
        first = asyncio.ensure_future(writer.send("cancelled"))
        second = asyncio.ensure_future(writer.send("second"))
        assert await still_pending(asyncio.gather(first, second))
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        client.resume_reading()
        await asyncio.wait_for(second, scaled(10))
        received = await client.recv_many(len(sent) + 1, timeout=scaled(10))
        assert received == [*sent, "second"]
    finally:
        client.vanish()


# -- overflow policies --------------------------------------------------------------


async def fill_nowait(writer: BackpressureWriter, *, limit: int = 50_000) -> list[str]:
    """send_nowait until a message is not WRITTEN; return the written ones."""
    written: list[str] = []
    while True:
        m = msg(len(written))
        result = writer.send_nowait(m)
        if result is not SendResult.WRITTEN:
            return written
        written.append(m)
        assert len(written) < limit, "the buffer never filled"


async def test_drop_newest(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB, "policy": OverflowPolicy.DROP_NEWEST}
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        written = await fill_nowait(writer)  # the first non-WRITTEN was DROPPED
        results = [writer.send_nowait(f"late {i}") for i in range(50)]
        assert results == [SendResult.DROPPED] * 50
        assert writer.stats().dropped == 51
        client.resume_reading()
        await asyncio.wait_for(writer.send("end"), scaled(10))
        received = await client.recv_many(len(written) + 1, timeout=scaled(10))
        assert received == [*written, "end"]
    finally:
        client.vanish()


async def test_drop_oldest_keeps_the_newest_in_order(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {
        "high_water": 64 * KIB,
        "policy": OverflowPolicy.DROP_OLDEST,
        "max_queue": 10,
    }
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        written = await fill_nowait(writer)  # the first non-WRITTEN was QUEUED
        late = [f"late {i}" for i in range(30)]
        assert [writer.send_nowait(m) for m in late] == [SendResult.QUEUED] * 30
        stats = writer.stats()
        assert stats.queued == 10
        assert stats.dropped == 31 - 10
        client.resume_reading()
        await asyncio.wait_for(writer.send("end"), scaled(10))
        received = await client.recv_many(len(written) + 11, timeout=scaled(10))
        assert received == [*written, *late[-10:], "end"]
        assert writer.stats().queued == 0
    finally:
        client.vanish()


async def test_close_policy_aborts_a_stuck_reader(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB}
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        writer.close_grace = scaled(0.2)
        await fill_until(writer)
        blocked = asyncio.ensure_future(writer.send("waiting"))
        assert await still_pending(blocked)
        assert writer.send_nowait("one too many") is SendResult.CLOSED
        with pytest.raises(SlowConsumerError):
            await asyncio.wait_for(blocked, scaled(5))
        assert writer.closed
        stats = writer.stats()
        assert stats.closed_slow
        assert writer.send_nowait("after") is SendResult.CLOSED
        with pytest.raises(SlowConsumerError):
            await writer.send("after")
        # The peer never reads, so the close frame cannot arrive: the server resets
        # the connection after the grace period and on_close runs.
        await asyncio.wait_for(ctx.closed.get(), scaled(5))
        # A paused reader notices nothing until it reads again: then the reset.
        client.resume_reading()
        await client.wait_closed(scaled(5))
        assert client.close_code is None  # no close frame ever arrived
    finally:
        client.vanish()


async def test_close_policy_sends_slow_consumer_close_code(server: AppServer, ctx: Ctx) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB, "close_reason": "too slow"}
    client = await stopped_client(server)
    try:
        writer = await ctx.writer()
        writer.close_grace = scaled(10)
        written = await fill_nowait(writer)
        assert writer.closed and writer.stats().closed_slow
        client.resume_reading()
        received = await client.recv_many(len(written), timeout=scaled(10))
        assert received == written
        with pytest.raises(ClientClosedError) as info:
            await client.recv(timeout=scaled(10))
        assert info.value.code == CloseCode.SLOW_CONSUMER == 4000
        assert info.value.reason == "too slow"
    finally:
        client.vanish()


# -- peer gone, closing ------------------------------------------------------------


async def test_peer_vanishes_mid_send(
    server: AppServer, ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    ctx.writer_kwargs = {"high_water": 64 * KIB}
    caplog.set_level(logging.DEBUG)
    client = await stopped_client(server)
    writer = await ctx.writer()
    await fill_until(writer)
    blocked = asyncio.ensure_future(writer.send("waiting"))
    assert await still_pending(blocked)
    client.vanish()
    with pytest.raises(PeerGoneError) as info:
        await asyncio.wait_for(blocked, scaled(5))
    assert not isinstance(info.value, SlowConsumerError)
    assert isinstance(info.value.__cause__, (StreamClosedError, OSError))
    await asyncio.wait_for(ctx.closed.get(), scaled(5))
    assert writer.closed
    assert writer.send_nowait("late") is SendResult.CLOSED
    with pytest.raises(PeerGoneError):
        await writer.send("late")
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []


async def test_send_nowait_to_vanished_peer_never_raises(
    server: AppServer, ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await WebSocketTestClient.connect(server.ws_url("/ws"))
    writer = await ctx.writer()
    client.vanish()
    await asyncio.wait_for(ctx.closed.get(), scaled(5))
    results = {writer.send_nowait(msg(i)) for i in range(1000)}
    assert results == {SendResult.CLOSED}
    assert writer.closed
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def raw_websocket(server: AppServer) -> socket.socket:
    """A bare non-blocking socket that completed a WebSocket handshake."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16))
    await loop.sock_sendall(
        sock,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(5))
    assert head.startswith(b"HTTP/1.1 101")
    return sock


async def test_reset_seen_by_direct_write_closes_the_stream(
    server: AppServer, ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset met first by the writer's own socket write: no raise, no log, on_close runs."""
    caplog.set_level(logging.DEBUG)
    sock = await raw_websocket(server)
    writer = await ctx.writer()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # the reset reaches the server's kernel before the server reads
    results = [writer.send_nowait(msg(i)) for i in range(200)]
    # The first frame goes straight to the socket and meets the reset there.
    assert results[0] is SendResult.CLOSED
    assert set(results) == {SendResult.CLOSED}
    with pytest.raises(PeerGoneError) as info:
        await writer.send("late")
    assert isinstance(info.value.__cause__, (ConnectionResetError, BrokenPipeError))
    await asyncio.wait_for(ctx.closed.get(), scaled(5))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_close_from_this_side(server: AppServer, ctx: Ctx) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None) as ws:
        writer = await ctx.writer()
        writer.send_nowait("last words")
        writer.close(1000, "bye")
        assert writer.closed
        assert writer.send_nowait("after") is SendResult.CLOSED
        with pytest.raises(ConnectionClosedError):
            await writer.send("after")
        assert await asyncio.wait_for(ws.recv(), scaled(5)) == "last words"
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), scaled(5))
        assert ws.close_code == 1000
        assert ws.close_reason == "bye"
        writer.close()  # closing twice does nothing


async def test_handler_closed_directly(server: AppServer, ctx: Ctx) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None) as ws:
        writer = await ctx.writer()
        await writer.send("before")
        assert writer.lifecycle is Lifecycle.OPEN
        writer._target.close(1000, "handler closed")
        assert writer.closed
        assert writer.lifecycle is Lifecycle.CLOSED_BY_US
        assert writer.send_nowait("after") is SendResult.CLOSED
        with pytest.raises(ConnectionClosedError):
            await writer.send("after")
        assert await asyncio.wait_for(ws.recv(), scaled(5)) == "before"
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), scaled(5))


async def test_client_close_frame_means_peer_gone(server: AppServer, ctx: Ctx) -> None:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"))
    writer = await ctx.writer()
    await client.close(1000, "leaving")
    await asyncio.wait_for(ctx.closed.get(), scaled(5))
    assert writer.closed
    assert writer.lifecycle is Lifecycle.GONE
    with pytest.raises(PeerGoneError):
        await writer.send("x")


# -- API contract -----------------------------------------------------------------------


async def test_type_and_value_errors(server: AppServer, ctx: Ctx) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None):
        writer = await ctx.writer()
        for bad in (None, 3, 1.5, object(), {1, 2}):
            with pytest.raises(TypeError):
                await writer.send(bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                writer.send_nowait(bad)  # type: ignore[arg-type]
        handler = writer._target
        for kwargs in (
            {"high_water": 0},
            {"high_water": -1},
            {"high_water": 100, "low_water": 0},
            {"high_water": 100, "low_water": 101},
            {"max_queue": 0},
        ):
            with pytest.raises(ValueError):  # noqa: PT011
                BackpressureWriter(handler, **kwargs)
        with pytest.raises(RuntimeError):
            BackpressureWriter(handler)
        with pytest.raises(TypeError):
            BackpressureWriter(object())  # type: ignore[arg-type]


async def test_of_returns_the_same_writer(server: AppServer, ctx: Ctx) -> None:
    async with websockets.connect(server.ws_url("/ws"), compression=None):
        writer = await ctx.writer()
        handler = writer._target
        assert BackpressureWriter.of(handler) is writer
        assert BackpressureWriter.of(handler, high_water=5) is writer
        assert writer.high_water == 1 << 20
        assert writer.low_water == (1 << 20) // 4
        assert writer.policy is OverflowPolicy.CLOSE
