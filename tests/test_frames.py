"""Frame building, encode-once messages and direct socket writes (tornado_longconn._frames)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import zlib
from typing import Any

import pytest
import tornado.iostream
from hypothesis import given
from hypothesis import strategies as st
from tornado.websocket import _PerMessageDeflateCompressor

from tornado_longconn._frames import (
    OP_BINARY,
    OP_TEXT,
    Encoded,
    abort_stream,
    build_frame,
    encode_message,
    frame_for_connection,
    stream_pending_bytes,
    stream_write_indexes,
    try_send,
    uses_deflate,
)


def parse_frame(frame: bytes) -> tuple[bool, bool, int, bytes]:
    """(fin, rsv1, opcode, payload) of one unmasked frame; checks the length is exact."""
    b0, b1 = frame[0], frame[1]
    assert not b1 & 0x80, "server frames are not masked"
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        (n,) = struct.unpack_from("!H", frame, 2)
        pos = 4
        assert n >= 126, "minimal length encoding"
    elif n == 127:
        (n,) = struct.unpack_from("!Q", frame, 2)
        pos = 10
        assert n > 0xFFFF, "minimal length encoding"
    assert len(frame) == pos + n
    return bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, frame[pos:]


def inflate(payload: bytes, decompressor: Any = None) -> bytes:
    d = decompressor or zlib.decompressobj(-zlib.MAX_WBITS)
    return bytes(d.decompress(payload + b"\x00\x00\xff\xff"))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 0xFFFF, 0x10000, 200_000])
def test_build_frame_lengths(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = build_frame(OP_BINARY, payload)
    assert parse_frame(frame) == (True, False, OP_BINARY, payload)


@given(st.binary(max_size=70_000), st.sampled_from([OP_TEXT, OP_BINARY]), st.booleans())
def test_build_frame_roundtrip(payload: bytes, opcode: int, rsv1: bool) -> None:
    assert parse_frame(build_frame(opcode, payload, rsv1=rsv1)) == (True, rsv1, opcode, payload)


def test_encode_message_types() -> None:
    assert encode_message("hé").opcode == OP_TEXT
    assert encode_message("hé").payload == "hé".encode()
    assert encode_message(b"\x00").opcode == OP_BINARY
    assert encode_message(bytearray(b"ab")).payload == b"ab"
    assert encode_message(memoryview(b"cd")).payload == b"cd"
    d = encode_message({"a": [1, "é"]})
    assert d.is_text
    assert json.loads(d.payload) == {"a": [1, "é"]}
    assert d.payload == '{"a":[1,"é"]}'.encode()
    assert json.loads(encode_message([1, 2]).payload) == [1, 2]
    e = encode_message("x")
    assert encode_message(e) is e
    assert "text" in repr(e) and "binary" in repr(encode_message(b""))


@pytest.mark.parametrize("bad", [None, 1, 2.5, True, object(), {1}, ("a",)])
def test_encode_message_rejects_other_types(bad: Any) -> None:
    with pytest.raises(TypeError):
        encode_message(bad)


def test_frame_is_built_once() -> None:
    e = Encoded(OP_TEXT, b"hello")
    assert e.frame is e.frame
    assert parse_frame(e.frame) == (True, False, OP_TEXT, b"hello")


class _Conn:
    """Stands in for Tornado's WebSocketProtocol13: it only carries a real compressor."""

    def __init__(self, compressor: _PerMessageDeflateCompressor | None) -> None:
        self._compressor = compressor


def test_frame_for_connection_plain() -> None:
    e = encode_message("plain")
    conn = _Conn(None)
    assert not uses_deflate(conn)
    assert frame_for_connection(conn, e) is e.frame


def test_frame_for_connection_context_takeover_in_order() -> None:
    conn = _Conn(_PerMessageDeflateCompressor(persistent=True, max_wbits=None))
    assert uses_deflate(conn)
    decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
    for i in range(20):
        text = f"message {i} " * 30
        fin, rsv1, opcode, payload = parse_frame(frame_for_connection(conn, encode_message(text)))
        assert fin and rsv1 and opcode == OP_TEXT
        assert inflate(payload, decompressor) == text.encode()


def test_frame_for_connection_without_takeover_is_shared() -> None:
    a = _Conn(_PerMessageDeflateCompressor(persistent=False, max_wbits=None))
    b = _Conn(_PerMessageDeflateCompressor(persistent=False, max_wbits=None))
    e = encode_message({"k": "v" * 500})
    frame = frame_for_connection(a, e)
    assert frame_for_connection(b, e) is frame
    _, rsv1, _, payload = parse_frame(frame)
    assert rsv1
    assert inflate(payload) == e.payload
    # A different window size is a different compression.
    c = _Conn(_PerMessageDeflateCompressor(persistent=False, max_wbits=9))
    other = frame_for_connection(c, e)
    assert other is not frame
    assert inflate(parse_frame(other)[3], zlib.decompressobj(-9)) == e.payload


async def stream_pair() -> tuple[tornado.iostream.IOStream, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return tornado.iostream.IOStream(a), b


async def test_try_send_and_indexes() -> None:
    stream, peer = await stream_pair()
    try:
        assert stream_write_indexes(stream) == (0, 0)
        assert try_send(stream, b"hello") == 5
        assert peer.recv(10) == b"hello"
        # Fill the kernel buffers so that part of a write stays pending.
        big = b"x" * (8 << 20)
        sent = try_send(stream, big)
        assert 0 < sent < len(big)
        future = stream.write(memoryview(big)[sent:])
        assert stream.writing()
        assert stream_pending_bytes(stream) > 0
        total, done = stream_write_indexes(stream)
        assert total == len(big) - sent
        assert done < total
        # A busy stream takes nothing directly: order is kept.
        assert try_send(stream, b"later") == 0
        loop = asyncio.get_running_loop()
        received = 0
        while received < len(big):
            chunk = await loop.sock_recv(peer, 1 << 20)
            received += len(chunk)
        await asyncio.wait_for(future, 5)
        assert stream_pending_bytes(stream) == 0
        assert stream_write_indexes(stream) == (total, total)
    finally:
        stream.close()
        peer.close()


async def test_try_send_reports_connection_errors() -> None:
    stream, peer = await stream_pair()
    try:
        peer.close()
        with pytest.raises(BrokenPipeError):
            try_send(stream, b"x" * 1000)
    finally:
        stream.close()
    assert try_send(stream, b"closed") == 0
    assert stream_pending_bytes(stream) == 0


async def test_abort_stream_resets() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    accepted.setblocking(False)
    stream = tornado.iostream.IOStream(accepted)
    try:
        abort_stream(stream)
        assert stream.closed()
        abort_stream(stream)  # a second abort does nothing
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
    finally:
        client.close()


async def test_try_send_skips_tls_streams() -> None:
    a, b = socket.socketpair()
    try:
        stream = tornado.iostream.SSLIOStream(a, ssl_options={})
        assert try_send(stream, b"data") == 0
        stream.close()
    finally:
        a.close()
        b.close()
