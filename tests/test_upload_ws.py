"""The WebSocket upload protocol, driven by the ``websockets`` client library."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.web
import websockets
from websockets.exceptions import ConnectionClosed

from docs.examples.upload_ws_client import upload
from tests.helpers import exists, size_of
from tests.helpers import read_bytes as read
from tornado_longconn.codes import CloseCode
from tornado_longconn.exceptions import UploadError
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled
from tornado_longconn.upload import ChunkedUploadSink, UploadStore
from tornado_longconn.upload_ws import (
    OFFSET_HEADER,
    WebSocketUploadHandler,
    close_code_for,
    encode_chunk,
)


class Probe(WebSocketUploadHandler):
    """The real handler, counting messages and signalling when a connection closed."""

    events: dict[str, Any]

    async def on_message(self, message: str | bytes) -> None:
        self.events["messages"] += 1
        await super().on_message(message)

    def on_close(self) -> None:
        super().on_close()
        self.events["closed"].set()


@contextlib.asynccontextmanager
async def serve(store: UploadStore, **kwargs: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    events: dict[str, Any] = {"messages": 0, "closed": asyncio.Event()}
    cls = type("H", (Probe,), {"events": events})
    app = tornado.web.Application(
        [(r"/up", cls, {"store": store, **kwargs})], websocket_max_message_size=1 << 20
    )
    async with AppServer(app) as server:
        yield server.ws_url("/up"), events
    await store.drain_tasks()
    store.close()


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "uploads", max_size=1 << 24)


def gated_store(
    tmp_path: Path, **kwargs: Any
) -> tuple[UploadStore, threading.Event, asyncio.Event]:
    """A store whose writes wait for ``gate``; ``writing`` is set once a write started."""
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    writing = asyncio.Event()

    class Gated(UploadStore):
        def write_at(self, fd: int, data: memoryview, offset: int) -> int:
            loop.call_soon_threadsafe(writing.set)
            gate.wait(scaled(10))
            return super().write_at(fd, data, offset)

    return Gated(tmp_path, **kwargs), gate, writing


async def closed_with(ws: Any) -> int:
    """Read until the server closes; return its close code."""

    async def drain() -> None:
        while True:
            await ws.recv()

    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(drain(), scaled(5))
    assert info.value.rcvd is not None
    return int(info.value.rcvd.code)


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_upload_with_window_and_acks(store: UploadStore, read_ahead: bool) -> None:
    data = os.urandom(1_000_000)
    done: list[ChunkedUploadSink] = []
    async with serve(
        store, chunk_size=64 * 1024, window=4, on_complete=done.append, read_ahead=read_ahead
    ) as (url, _):
        result = await asyncio.wait_for(upload(url, data, name="../../x.bin"), scaled(20))
    assert result["type"] == "complete"
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert read(store.final_path(result["id"])) == data
    assert done[0].filename == "x.bin"


async def test_ready_message_and_acks_carry_durable_offsets(store: UploadStore) -> None:
    async with serve(store, chunk_size=8, window=2) as (url, _), websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "size": 12, "name": "a"}))
        ready = json.loads(await ws.recv())
        assert ready == {
            "type": "ready",
            "id": ready["id"],
            "offset": 0,
            "size": 12,
            "window": 2,
            "chunk_size": 8,
        }
        await ws.send(encode_chunk(0, b"01234567"))
        await ws.send(encode_chunk(8, b"89ab"))
        assert json.loads(await ws.recv()) == {"type": "ack", "offset": 8}
        assert json.loads(await ws.recv()) == {"type": "ack", "offset": 12}
        complete = json.loads(await ws.recv())
        assert complete["type"] == "complete" and complete["size"] == 12
        # Another upload may follow on the same connection.
        await ws.send(json.dumps({"type": "start", "size": 0}))
        assert json.loads(await ws.recv())["type"] == "ready"
        assert json.loads(await ws.recv())["type"] == "complete"
    assert read(store.final_path(ready["id"])) == b"0123456789ab"


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_resume_after_disconnect(store: UploadStore, read_ahead: bool) -> None:
    data = os.urandom(300_000)
    ready: list[dict[str, Any]] = []
    async with serve(store, chunk_size=32 * 1024, read_ahead=read_ahead) as (url, events):
        await upload(url, data, on_ready=ready.append, stop_after=3)
        await asyncio.wait_for(events["closed"].wait(), scaled(5))
        await store.drain_tasks()
        upload_id = ready[0]["id"]
        on_disk = size_of(store.partial_path(upload_id))
        assert 0 < on_disk < len(data) and on_disk % (32 * 1024) == 0
        result = await upload(url, data, upload_id=upload_id, on_ready=ready.append)
        assert ready[1]["offset"] == on_disk
    assert result["type"] == "complete"
    assert read(store.final_path(upload_id)) == data


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        (["not json"], CloseCode.UPLOAD_BAD_REQUEST),
        (["[1, 2]"], CloseCode.UPLOAD_BAD_REQUEST),
        ([b"\x00" * 16], CloseCode.UPLOAD_BAD_REQUEST),
        (['{"type": "dance"}'], CloseCode.UPLOAD_BAD_REQUEST),
        (['{"type": "start", "size": "big"}'], CloseCode.UPLOAD_BAD_REQUEST),
        (['{"type": "start", "size": true}'], CloseCode.UPLOAD_BAD_REQUEST),
        (['{"type": "start", "size": 3, "sha256": "zz"}'], CloseCode.UPLOAD_BAD_REQUEST),
        (['{"type": "start", "size": 3}', b"\x00"], CloseCode.UPLOAD_BAD_REQUEST),
        (['{"type": "start", "size": 99999999999}'], CloseCode.UPLOAD_TOO_LARGE),
        (['{"type": "start", "size": 3}', encode_chunk(0, b"abcd")], CloseCode.UPLOAD_TOO_LARGE),
        (['{"type": "start", "size": 3}', encode_chunk(1, b"a")], CloseCode.UPLOAD_CONFLICT),
        (['{"type": "resume", "id": "../../etc"}'], CloseCode.UPLOAD_NOT_FOUND),
        (['{"type": "resume", "id": "' + "0" * 32 + '"}'], CloseCode.UPLOAD_NOT_FOUND),
        (['{"type": "abort"}'], CloseCode.UPLOAD_BAD_REQUEST),
    ],
)
async def test_bad_input_closes_with_upload_codes(
    store: UploadStore, messages: list[str | bytes], code: CloseCode
) -> None:
    async with serve(store, chunk_size=1024) as (url, _), websockets.connect(url) as ws:
        for message in messages:
            await ws.send(message)
        assert await closed_with(ws) == code


async def test_oversized_chunk_payload_is_refused(store: UploadStore) -> None:
    async with serve(store, chunk_size=16) as (url, _), websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "size": 100}))
        await ws.recv()
        await ws.send(encode_chunk(0, b"x" * 17))
        assert await closed_with(ws) == CloseCode.UPLOAD_BAD_REQUEST


async def test_checksum_mismatch_discards_the_upload(store: UploadStore) -> None:
    async with serve(store) as (url, _), websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "size": 3, "sha256": "0" * 64}))
        upload_id = json.loads(await ws.recv())["id"]
        await ws.send(encode_chunk(0, b"abc"))
        assert json.loads(await ws.recv()) == {"type": "ack", "offset": 3}
        assert await closed_with(ws) == CloseCode.UPLOAD_CHECKSUM_MISMATCH
    assert not exists(store.partial_path(upload_id))
    assert not exists(store.final_path(upload_id))


async def test_resume_takes_the_upload_over_from_an_older_connection(store: UploadStore) -> None:
    # The newer connection wins (as with tusd's lock release requests): the older one
    # is closed with 4409, what it sent is kept, and the resume starts from there.
    async with serve(store) as (url, _), websockets.connect(url) as first:
        await first.send(json.dumps({"type": "start", "size": 10}))
        upload_id = json.loads(await first.recv())["id"]
        await first.send(encode_chunk(0, b"01234"))
        assert json.loads(await first.recv()) == {"type": "ack", "offset": 5}
        async with websockets.connect(url) as second:
            await second.send(json.dumps({"type": "resume", "id": upload_id}))
            ready = json.loads(await second.recv())
            assert ready["type"] == "ready" and ready["offset"] == 5
            assert await closed_with(first) == CloseCode.UPLOAD_CONFLICT
            await second.send(encode_chunk(5, b"56789"))
            assert json.loads(await second.recv()) == {"type": "ack", "offset": 10}
            assert json.loads(await second.recv())["type"] == "complete"
    assert read(store.final_path(upload_id)) == b"0123456789"
    assert store.stats().takeovers == 1


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_client_back_after_a_network_change_resumes_at_once(
    store: UploadStore, read_ahead: bool
) -> None:
    # A phone changes networks mid-upload: its old connection is half-open (the
    # server hears nothing, not even a close), and the client reconnects and resumes.
    data = os.urandom(200_000)
    chunk = 16 * 1024
    async with serve(store, chunk_size=chunk, window=4, read_ahead=read_ahead) as (url, events):
        old = await WebSocketTestClient.connect(url)
        await old.send(json.dumps({"type": "start", "size": len(data)}))
        upload_id = json.loads(await old.recv(timeout=scaled(5)))["id"]
        for offset in range(0, 4 * chunk, chunk):
            await old.send(encode_chunk(offset, data[offset : offset + chunk]))
        acks = [json.loads(await old.recv(timeout=scaled(5))) for _ in range(4)]
        assert acks[-1] == {"type": "ack", "offset": 4 * chunk}
        old.stop_reading()  # and never closes: half-open as far as the server can tell
        ready: list[dict[str, Any]] = []
        result = await asyncio.wait_for(
            upload(url, data, upload_id=upload_id, on_ready=ready.append), scaled(10)
        )
        assert ready[0]["offset"] == 4 * chunk
        assert result["type"] == "complete"
        assert result["sha256"] == hashlib.sha256(data).hexdigest()
        await asyncio.wait_for(events["closed"].wait(), scaled(5))
        old.vanish()
    assert read(store.final_path(upload_id)) == data


async def test_an_http_writer_is_not_taken_over(store: UploadStore) -> None:
    # Only a holder that can let go is asked to: a tus PATCH in progress keeps its
    # lock, and a WebSocket resume meanwhile gets 4409 as before.
    sink = await store.create(10)
    sink.acquire()  # what TusUploadHandler does for the length of a PATCH
    async with serve(store) as (url, _), websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "resume", "id": sink.id}))
        assert await closed_with(ws) == CloseCode.UPLOAD_CONFLICT
    sink.release()
    assert store.stats().takeovers == 0 and store.stats().lock_conflicts == 1


async def test_abort_removes_the_upload(store: UploadStore) -> None:
    async with serve(store) as (url, _), websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "size": 10}))
        upload_id = json.loads(await ws.recv())["id"]
        await ws.send(encode_chunk(0, b"abc"))
        await ws.recv()
        await ws.send(json.dumps({"type": "abort"}))
        assert json.loads(await ws.recv()) == {"type": "aborted", "id": upload_id}
    assert not exists(store.partial_path(upload_id))


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_disk_full_closes_4507_and_keeps_the_bytes_on_disk(
    tmp_path: Path, read_ahead: bool
) -> None:
    class TinyDisk(UploadStore):
        capacity = 50_000

        def write_at(self, fd: int, data: memoryview, offset: int) -> int:
            room = self.capacity - offset
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write_at(fd, data[:room], offset)

    store = TinyDisk(tmp_path)
    data = os.urandom(100_000)
    ready: list[dict[str, Any]] = []
    async with serve(store, chunk_size=20_000, read_ahead=read_ahead) as (url, events):
        with pytest.raises(ConnectionClosed) as info:
            await upload(url, data, on_ready=ready.append)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == CloseCode.UPLOAD_STORAGE_FULL
        await asyncio.wait_for(events["closed"].wait(), scaled(5))
        await store.drain_tasks()
        upload_id = ready[0]["id"]
        assert size_of(store.partial_path(upload_id)) == 40_000
        store.capacity = 1 << 30
        result = await upload(url, data, upload_id=upload_id, on_ready=ready.append)
        assert ready[1]["offset"] == 40_000
    assert result["type"] == "complete"
    assert read(store.final_path(upload_id)) == data


async def test_no_message_is_read_while_a_chunk_is_being_stored(tmp_path: Path) -> None:
    store, gate, writing = gated_store(tmp_path)
    async with serve(store, chunk_size=4) as (url, events), websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "size": 12}))
        await ws.recv()
        for i in range(3):
            await ws.send(encode_chunk(4 * i, b"abcd"))
        await asyncio.wait_for(writing.wait(), scaled(5))
        await asyncio.sleep(scaled(0.05))  # a window in which more messages could be read
        assert events["messages"] == 2  # start + the chunk being stored
        gate.set()
        offsets = [json.loads(await ws.recv())["offset"] for _ in range(3)]
        assert offsets == [4, 8, 12]


def test_close_codes_mirror_http_statuses() -> None:
    assert close_code_for(UploadError("x", status=507)) == 4507
    assert close_code_for(UploadError("x", status=423)) == CloseCode.UPLOAD_CONFLICT
    assert close_code_for(UploadError("x", status=410)) == CloseCode.UPLOAD_NOT_FOUND
    assert close_code_for(UploadError("x", status=500)) == CloseCode.INTERNAL_ERROR
    assert OFFSET_HEADER.unpack(encode_chunk(2**40, b"z")[:8]) == (2**40,)


async def test_read_ahead_reads_while_storing_and_acks_only_stored_chunks(tmp_path: Path) -> None:
    store, gate, writing = gated_store(tmp_path, max_in_flight=2)
    async with (
        serve(store, chunk_size=4, read_ahead=True) as (url, events),
        websockets.connect(url) as ws,
    ):
        await ws.send(json.dumps({"type": "start", "size": 12}))
        await ws.recv()
        for i in range(3):
            await ws.send(encode_chunk(4 * i, b"abcd"))
        await asyncio.wait_for(writing.wait(), scaled(5))
        # A second chunk is read while the first is being stored; the third waits
        # for room (max_in_flight=2), and nothing is acknowledged yet.
        await asyncio.sleep(scaled(0.05))
        assert events["messages"] == 3
        gate.set()
        offsets = [json.loads(await ws.recv())["offset"] for _ in range(3)]
        assert offsets == [4, 8, 12]
        assert json.loads(await ws.recv())["type"] == "complete"
        assert events["messages"] == 4
