"""Shared upload state: the contract on memory and Redis, and two stores serving one disk."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
import websockets

from docs.examples.upload_ws_client import upload
from tests.helpers import REDIS_URL, redis_reachable, size_of
from tests.helpers import read_bytes as read
from tests.test_upload_tus import OCTETS, TUS, serve
from tests.test_upload_ws import closed_with
from tests.test_upload_ws import serve as serve_ws
from tornado_longconn.codes import CloseCode
from tornado_longconn.exceptions import UploadError
from tornado_longconn.testing import AppServer, scaled
from tornado_longconn.upload import UploadStore
from tornado_longconn.upload_state import (
    MemoryUploadState,
    RedisUploadState,
    SharedUploadState,
)
from tornado_longconn.upload_storage import UploadHandle, UploadStorage
from tornado_longconn.upload_ws import encode_chunk


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[SharedUploadState]:
    if request.param == "memory":
        yield MemoryUploadState()
        return
    if not await redis_reachable():
        pytest.skip("needs Redis")
    redis_state = RedisUploadState(REDIS_URL, prefix=f"test-upload-state-{secrets.token_hex(4)}:")
    try:
        yield redis_state
    finally:
        keys = [key async for key in redis_state._client.scan_iter(redis_state.prefix + "*")]
        if keys:
            await redis_state._client.delete(*keys)
        await redis_state.close()


async def test_contract_lock_generation_record(state: SharedUploadState) -> None:
    assert isinstance(state, SharedUploadState)
    upload = "a" * 32
    assert await state.get(upload) is None
    await state.put(upload, {"offset": 0, "size": 10})
    record = await state.get(upload)
    assert record is not None and (record.generation, record.data) == (0, {"offset": 0, "size": 10})
    assert await state.lock(upload, "one", 30) == 1
    assert await state.lock(upload, "two", 30) is None  # held
    assert await state.extend(upload, "one", 30)
    assert not await state.extend(upload, "two", 30)
    await state.unlock(upload, "two")  # not the holder: nothing happens
    assert await state.lock(upload, "two", 30) is None
    await state.put(upload, {"offset": 4, "size": 10})
    await state.unlock(upload, "one")
    record = await state.get(upload)
    assert record is not None and (record.generation, record.data) == (2, {"offset": 4, "size": 10})
    assert await state.lock(upload, "two", 30) == 3
    await state.delete(upload)
    assert await state.get(upload) is None
    await state.unlock(upload, "two")
    assert await state.get(upload) is None  # an unlock does not bring it back
    assert await state.lock(upload, "three", 30) == 1


async def test_memory_lock_expires() -> None:
    clock = Clock()
    state = MemoryUploadState(clock=clock)
    assert await state.lock("u", "dead", 30) == 1
    clock.now += 29.9
    assert await state.lock("u", "next", 30) is None
    clock.now += 0.1
    assert not await state.extend("u", "dead", 30)  # expired: the holder lost it
    assert await state.lock("u", "next", 30) == 2


async def test_redis_lock_carries_its_expiry() -> None:
    if not await redis_reachable():
        pytest.skip("needs Redis")
    prefix = f"test-upload-ttl-{secrets.token_hex(4)}:"
    state = RedisUploadState(REDIS_URL, prefix=prefix)
    try:
        assert await state.lock("u", "me", 30) == 1
        ttl = await state._client.pttl(prefix + "upload:u:lock")
        assert 0 < ttl <= 30_000
        assert await state.extend("u", "me", 120)
        assert 30_000 < await state._client.pttl(prefix + "upload:u:lock") <= 120_000
        await state.unlock("u", "me")
        assert await state._client.exists(prefix + "upload:u:lock") == 0
    finally:
        await state._client.delete(prefix + "upload:u")
        await state.close()


# -- two stores (two "processes") on one directory and one shared state --------------


async def two_servers(root: Path, state: SharedUploadState) -> tuple[UploadStore, UploadStore]:
    return (
        UploadStore(root, chunk_size=64 * 1024, shared=state),
        UploadStore(root, chunk_size=64 * 1024, shared=state),
    )


async def test_an_upload_moves_between_stores(tmp_path: Path, state: SharedUploadState) -> None:
    data = os.urandom(300_000)
    one, two = await two_servers(tmp_path, state)
    async with (
        serve(one) as (a, _),
        serve(two) as (b, _),
        httpx.AsyncClient() as http,
    ):
        resp = await http.post(
            a.url("/files/"),
            headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": "k dg=="},
        )
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        on_a, on_b = a.url(f"/files/{upload_id}"), b.url(f"/files/{upload_id}")
        assert (await http.head(on_b, headers=TUS)).headers["Upload-Offset"] == "0"
        resp = await http.patch(
            on_a, headers={**OCTETS, "Upload-Offset": "0"}, content=data[:100_000]
        )
        assert resp.status_code == 204
        head = await http.head(on_b, headers=TUS)
        assert (head.headers["Upload-Offset"], head.headers["Upload-Metadata"]) == (
            "100000",
            "k dg==",
        )
        resp = await http.patch(
            on_b, headers={**OCTETS, "Upload-Offset": "100000"}, content=data[100_000:200_000]
        )
        assert resp.status_code == 204
        # Back on the first store: its cached state is stale and must be reloaded.
        resp = await http.patch(
            on_a, headers={**OCTETS, "Upload-Offset": "100000"}, content=data[100_000:]
        )
        assert resp.status_code == 409
        assert resp.headers["Upload-Offset"] == "200000"
        resp = await http.patch(
            on_a, headers={**OCTETS, "Upload-Offset": "200000"}, content=data[200_000:]
        )
        assert resp.status_code == 204
        for url in (on_a, on_b):
            head = await http.head(url, headers=TUS)
            assert head.headers["Upload-Offset"] == str(len(data))
            assert "Upload-Expires" not in head.headers
        assert (await http.delete(on_b, headers=TUS)).status_code == 204
        assert (await http.head(on_a, headers=TUS)).status_code == 404
    assert one.stats().rehashed == 1  # the first store re-read the part written by the second


async def test_concurrent_patches_on_two_stores_the_first_commit_wins(
    tmp_path: Path, state: SharedUploadState
) -> None:
    """Two PATCHes at one offset both write a segment; the first to commit wins, the
    other is answered 409 with the new offset and its segment is removed."""
    one, two = await two_servers(tmp_path, state)
    async with (
        serve(one) as (a, events),
        serve(two) as (b, _),
        httpx.AsyncClient() as http,
    ):
        resp = await http.post(a.url("/files/"), headers={**TUS, "Upload-Length": "100"})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        sock = await raw_patch_start(a, upload_id, 100)
        try:
            await asyncio.wait_for(events["writing"].wait(), scaled(5))
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"a" * 50)
            other = await http.patch(
                b.url(f"/files/{upload_id}"),
                headers={**OCTETS, "Upload-Offset": "0"},
                content=b"b" * 100,
            )
            assert other.status_code == 204
            await loop.sock_sendall(sock, b"a" * 50)
            reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(5))
            assert reply.startswith(b"HTTP/1.1 409"), reply
            assert b"\r\nUpload-Offset: 100\r\n" in reply
        finally:
            sock.close()
        head = await http.head(a.url(f"/files/{upload_id}"), headers=TUS)
        assert head.headers["Upload-Offset"] == "100"
    assert read(one.final_path(upload_id)) == b"b" * 100
    assert sorted(os.listdir(tmp_path)) == sorted([upload_id, upload_id + ".info"])
    assert one.stats().lock_conflicts == 1


async def test_a_delete_while_a_patch_writes_its_segment(
    tmp_path: Path, state: SharedUploadState
) -> None:
    """The PATCH finds the upload gone at its commit: 404, and no file is left behind."""
    one, two = await two_servers(tmp_path, state)
    async with (
        serve(one) as (a, events),
        serve(two) as (b, _),
        httpx.AsyncClient() as http,
    ):
        resp = await http.post(a.url("/files/"), headers={**TUS, "Upload-Length": "100"})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        sock = await raw_patch_start(a, upload_id, 100)
        try:
            await asyncio.wait_for(events["writing"].wait(), scaled(5))
            deleted = await http.delete(b.url(f"/files/{upload_id}"), headers=TUS)
            assert deleted.status_code == 204
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"a" * 100)
            reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(5))
            assert reply.startswith(b"HTTP/1.1 404"), reply
        finally:
            sock.close()
    assert os.listdir(tmp_path) == []


async def raw_patch_start(server: AppServer, upload_id: str, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setblocking(False)
    head = (
        f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    await asyncio.get_running_loop().sock_sendall(sock, head)
    return sock


async def test_bytes_a_dead_writer_never_recorded_are_cut(tmp_path: Path) -> None:
    state = MemoryUploadState()
    one, two = await two_servers(tmp_path, state)
    async with serve(one) as (a, _), serve(two) as (b, _), httpx.AsyncClient() as http:
        resp = await http.post(a.url("/files/"), headers={**TUS, "Upload-Length": "10"})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        resp = await http.patch(
            a.url(f"/files/{upload_id}"), headers={**OCTETS, "Upload-Offset": "0"}, content=b"abcd"
        )
        assert resp.status_code == 204
        # A writer on another host stored 3 more bytes, then died before recording them
        # (its lock is gone: expired).
        await asyncio.to_thread(append, one.partial_path(upload_id), b"XYZ")
        assert await state.lock(upload_id, "dead", 30) is not None
        state._locks.clear()
        head = await http.head(b.url(f"/files/{upload_id}"), headers=TUS)
        assert head.headers["Upload-Offset"] == "4"
        resp = await http.patch(
            b.url(f"/files/{upload_id}"),
            headers={**OCTETS, "Upload-Offset": "4"},
            content=b"efghij",
        )
        assert resp.status_code == 204
    assert read(two.final_path(upload_id)) == b"abcdefghij"
    assert size_of(two.final_path(upload_id)) == 10


async def test_concatenation_across_stores(tmp_path: Path) -> None:
    state = MemoryUploadState()
    one, two = await two_servers(tmp_path, state)
    async with serve(one) as (a, _), serve(two) as (b, _), httpx.AsyncClient() as http:
        parts = []
        for server, body in ((a, b"left-"), (b, b"right")):
            resp = await http.post(
                server.url("/files/"),
                headers={**OCTETS, "Upload-Length": "5", "Upload-Concat": "partial"},
                content=body,
            )
            assert resp.status_code == 201
            parts.append(urljoin(server.url("/files/"), resp.headers["Location"]))
        resp = await http.post(
            a.url("/files/"), headers={**TUS, "Upload-Concat": "final;" + " ".join(parts)}
        )
        assert resp.status_code == 201
        final_id = resp.headers["Location"].rsplit("/", 1)[1]
        head = await http.head(b.url(f"/files/{final_id}"), headers=TUS)
        assert head.headers["Upload-Offset"] == "10"
        assert head.headers["Upload-Concat"].startswith("final;/files/")
        resp = await http.patch(
            b.url(f"/files/{final_id}"), headers={**OCTETS, "Upload-Offset": "10"}, content=b"x"
        )
        assert resp.status_code == 403
    assert read(one.final_path(final_id)) == b"left-right"


async def test_the_local_disk_store_is_an_upload_storage(tmp_path: Path) -> None:
    store = UploadStore(tmp_path)
    assert isinstance(store, UploadStorage)
    sink = await store.create(5, metadata={"filename": "a.txt"})
    assert isinstance(sink, UploadHandle)
    with sink.lock():
        await sink.write(b"hello")
        await sink.flush()
    assert await store.durable_offset(sink.id) == 5
    with pytest.raises(UploadError) as err:
        await store.read(sink.id)
    assert err.value.status == 409
    await sink.finish()
    assert await store.read(sink.id) == b"hello"
    assert await store.read(sink.id, 1, 3) == b"ell"
    info = sink.info()
    assert (info.complete, info.size, info.metadata) == (True, 5, {"filename": "a.txt"})
    store.close()


async def test_websocket_upload_resumes_on_the_other_store(tmp_path: Path) -> None:
    state = MemoryUploadState()
    one, two = await two_servers(tmp_path, state)
    data = os.urandom(200_000)
    ready: list[dict[str, object]] = []
    async with (
        serve_ws(one, chunk_size=32 * 1024) as (url_a, events_a),
        serve_ws(two, chunk_size=32 * 1024) as (url_b, _),
    ):
        await upload(url_a, data, on_ready=ready.append, stop_after=3)
        await asyncio.wait_for(events_a["closed"].wait(), scaled(5))
        await one.drain_tasks()
        upload_id = str(ready[0]["id"])
        assert (await two.describe(upload_id)).offset == 3 * 32 * 1024
        result = await upload(url_b, data, upload_id=upload_id, on_ready=ready.append)
        assert ready[1]["offset"] == 3 * 32 * 1024
        assert result["type"] == "complete"
    assert read(two.final_path(upload_id)) == data
    info = await one.describe(upload_id)
    assert info.complete and info.offset == len(data)


async def test_websocket_resume_takes_over_an_older_connection_with_shared_state(
    tmp_path: Path,
) -> None:
    store = UploadStore(tmp_path, shared=MemoryUploadState())
    async with serve_ws(store) as (url, _), websockets.connect(url) as first:
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


async def test_a_lost_record_is_rebuilt_from_the_disk(tmp_path: Path) -> None:
    state = MemoryUploadState()
    one, two = await two_servers(tmp_path, state)
    async with serve(one) as (a, _), serve(two) as (b, _), httpx.AsyncClient() as http:
        resp = await http.post(a.url("/files/"), headers={**TUS, "Upload-Length": "10"})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        resp = await http.patch(
            a.url(f"/files/{upload_id}"), headers={**OCTETS, "Upload-Offset": "0"}, content=b"abcd"
        )
        assert resp.status_code == 204
        await state.delete(upload_id)  # as after a flushed or replaced Redis
        head = await http.head(b.url(f"/files/{upload_id}"), headers=TUS)
        assert (head.status_code, head.headers["Upload-Offset"]) == (200, "4")
        resp = await http.patch(
            b.url(f"/files/{upload_id}"),
            headers={**OCTETS, "Upload-Offset": "4"},
            content=b"efghij",
        )
        assert resp.status_code == 204
        record = await state.get(upload_id)
        assert record is not None and record.data is not None
        assert record.data["offset"] == 10
        assert (await one.describe(upload_id)).complete
        head = await http.head(a.url(f"/files/{upload_id}"), headers=TUS)
        assert head.headers["Upload-Offset"] == "10"
        unknown = await http.head(a.url("/files/" + "f" * 32), headers=TUS)
        assert unknown.status_code == 404
    assert read(two.final_path(upload_id)) == b"abcdefghij"


# -- the shared state unreachable: 503 with Retry-After, counted, nothing lost ----------


async def test_redis_down_is_503_with_retry_after_and_counted(tmp_path: Path) -> None:
    from tests.backends.redisproc import REDIS_SERVER, RedisProcess

    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = RedisProcess()
    await redis.start()
    state = RedisUploadState(redis.url, prefix="test-upload-503:", connect_timeout=scaled(1))
    store = UploadStore(tmp_path / "uploads", chunk_size=64 * 1024, shared=state)
    data = os.urandom(300_000)
    try:
        async with serve(store) as (server, _), httpx.AsyncClient() as http:
            base = server.url("/files/")
            resp = await http.post(base, headers={**TUS, "Upload-Length": str(len(data))})
            assert resp.status_code == 201
            url = urljoin(base, resp.headers["Location"])
            resp = await http.patch(
                url, headers={**OCTETS, "Upload-Offset": "0"}, content=data[:100_000]
            )
            assert resp.status_code == 204
            await redis.stop()
            answers = [
                await http.post(base, headers={**TUS, "Upload-Length": "10"}),
                await http.head(url, headers=TUS),
                await http.patch(
                    url, headers={**OCTETS, "Upload-Offset": "100000"}, content=data[100_000:]
                ),
            ]
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert answer.headers["Retry-After"] == "1"
            stats = store.stats()
            assert stats.state_errors == 3 and dict(stats.refused)["503"] == 3
            assert size_of(store.partial_path(url.rsplit("/", 1)[1])) == 100_000
            # Redis is back (empty: the record is lost, the disk is the truth).
            await redis.start()
            head = await http.head(url, headers=TUS)
            assert head.headers["Upload-Offset"] == "100000"
            resp = await http.patch(
                url, headers={**OCTETS, "Upload-Offset": "100000"}, content=data[100_000:]
            )
            assert resp.status_code == 204, resp.text
        assert read(store.final_path(url.rsplit("/", 1)[1])) == data
    finally:
        await state.close()
        await redis.close()


async def test_a_tus_patch_costs_one_redis_round_trip(tmp_path: Path) -> None:
    """Nothing before the body (it goes to a segment file of its own), one
    compare-and-set script before the answer: one round trip per PATCH, the last one
    (which finishes the upload) included (on a Redis of our own)."""
    from tests.backends.redisproc import REDIS_SERVER, RedisProcess

    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = RedisProcess()
    await redis.start()
    state = RedisUploadState(redis.url, prefix="test-upload-rt:")
    store = UploadStore(tmp_path / "uploads", chunk_size=64 * 1024, shared=state)

    try:
        async with serve(store) as (server, _), httpx.AsyncClient() as http:
            base = server.url("/files/")
            resp = await http.post(base, headers={**TUS, "Upload-Length": "40000"})
            url = urljoin(base, resp.headers["Location"])
            resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"x")
            assert resp.status_code == 204  # the scripts are loaded now
            before = state.round_trips
            scripts = (await state._client.info("commandstats"))["cmdstat_evalsha"]["calls"]
            for offset in range(1, 40000, 4000):
                resp = await http.patch(
                    url,
                    headers={**OCTETS, "Upload-Offset": str(offset)},
                    content=b"x" * min(4000, 40000 - offset),
                )
                assert resp.status_code == 204
            after = state.round_trips
            info = await state._client.info("commandstats")
        # 10 PATCHes, 1 script each (and Redis ran exactly those).
        assert after - before == 10
        assert info["cmdstat_evalsha"]["calls"] - scripts == 10
        upload_id = url.rsplit("/", 1)[1]
        assert read(store.final_path(upload_id)) == b"x" * 40000
        assert store.stats().rehashed == 0  # one process: its running sha256 went on
    finally:
        await state.close()
        await redis.close()


async def test_patches_alternating_between_stores_hash_the_file_once(
    tmp_path: Path, state: SharedUploadState
) -> None:
    """A store that reloads an upload another store appended to does not re-read the
    part (O(n^2) over many PATCHes): the sha256 is computed once, at finish."""
    data = os.urandom(600_000)
    one, two = await two_servers(tmp_path, state)
    async with serve(one) as (a, _), serve(two) as (b, _), httpx.AsyncClient() as http:
        resp = await http.post(a.url("/files/"), headers={**TUS, "Upload-Length": str(len(data))})
        path = resp.headers["Location"]
        for n, offset in enumerate(range(0, len(data), 100_000)):
            server = (a, b)[n % 2]
            resp = await http.patch(
                urljoin(server.url("/files/"), path),
                headers={**OCTETS, "Upload-Offset": str(offset)},
                content=data[offset : offset + 100_000],
            )
            assert resp.status_code == 204, resp.text
    upload_id = path.rsplit("/", 1)[1]
    assert read(one.final_path(upload_id)) == data
    info = json.loads(read(one.info_path(upload_id)))
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert one.stats().rehashed + two.stats().rehashed == 1


async def test_redis_down_closes_a_websocket_upload_with_1011_and_counts_it(
    tmp_path: Path,
) -> None:
    from tests.backends.redisproc import REDIS_SERVER, RedisProcess

    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = RedisProcess()
    await redis.start()
    state = RedisUploadState(redis.url, prefix="test-upload-ws-503:", connect_timeout=scaled(1))
    store = UploadStore(tmp_path / "uploads", shared=state)
    data = os.urandom(50_000)
    try:
        async with serve_ws(store) as (url, _):
            await redis.stop()
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps({"type": "start", "size": len(data)}))
                assert await closed_with(ws) == CloseCode.INTERNAL_ERROR
            assert store.stats().state_errors == 1
            await redis.start()
            result = await upload(url, data, name="after.bin")
            assert result["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        await state.close()
        await redis.close()


# -- appending without the lock: segments committed by one compare-and-set -------------


async def test_contract_commit(state: SharedUploadState) -> None:
    upload = "c" * 32
    day = 86400.0
    refused = await state.commit(
        upload, offset=0, length=3, segment="s0", activity=5.0, now=6.0, expire_after=day
    )
    assert (refused.ok, refused.reason) == (False, "missing")
    record = {"size": 10, "offset": 0, "metadata": {}, "parts": [], "status": "active"}
    await state.put(upload, {**record, "activity": 5.0})
    first = await state.commit(
        upload, offset=0, length=3, segment="s0", activity=7.5, now=6.0, expire_after=day
    )
    assert (first.ok, first.offset, first.previous, first.pending) == (True, 3, 0, ())
    late = await state.commit(
        upload, offset=0, length=3, segment="s1", activity=7.5, now=6.0, expire_after=day
    )
    assert (late.reason, late.offset) == ("offset", 3)
    second = await state.commit(
        upload, offset=3, length=3, segment="s2", activity=8.0, now=6.0, expire_after=day
    )
    assert (second.offset, second.previous, second.pending) == (6, 1, ((0, 3, "s0"),))
    too_long = await state.commit(
        upload, offset=6, length=5, segment="s3", activity=8.0, now=6.0, expire_after=day
    )
    assert too_long.reason == "size"
    expired = await state.commit(
        upload, offset=6, length=1, segment="s3", activity=8.0, now=8.0 + day, expire_after=day
    )
    assert expired.reason == "expired"
    # Segments reported merged leave the pending list.
    third = await state.commit(
        upload,
        offset=6,
        length=4,
        segment="s3",
        activity=9.0,
        now=6.0,
        expire_after=day,
        merged=["s0"],
    )
    assert (third.offset, third.pending) == (10, ((3, 3, "s2"),))
    got = await state.get(upload)
    assert got is not None and got.data is not None
    assert got.generation == 3
    assert (got.data["offset"], got.data["activity"]) == (10, 9.0)
    assert got.data["pending"] == [[3, 3, "s2"], [6, 4, "s3"]]
    assert got.data["metadata"] == {} and not got.data["parts"]
    assert await state.lock(upload, "writer", 30) == 4
    locked = await state.commit(
        upload, offset=10, length=0, segment="s4", activity=9.0, now=6.0, expire_after=day
    )
    assert (locked.reason, locked.offset) == ("locked", 10)
    await state.put(upload, {**record, "offset": 10, "status": "complete"})
    await state.unlock(upload, "writer")
    done = await state.commit(
        upload, offset=10, length=0, segment="s4", activity=9.0, now=6.0, expire_after=day
    )
    assert done.reason == "complete"
    await state.delete(upload)


async def test_a_checksum_mismatch_leaves_the_offset_and_no_segment(
    tmp_path: Path, state: SharedUploadState
) -> None:
    one, two = await two_servers(tmp_path, state)
    async with serve(one) as (a, _), serve(two) as (b, _), httpx.AsyncClient() as http:
        resp = await http.post(a.url("/files/"), headers={**TUS, "Upload-Length": "8"})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        resp = await http.patch(
            a.url(f"/files/{upload_id}"), headers={**OCTETS, "Upload-Offset": "0"}, content=b"abcd"
        )
        assert resp.status_code == 204
        wrong = "sha1 " + base64.b64encode(hashlib.sha1(b"nope").digest()).decode()
        resp = await http.patch(
            b.url(f"/files/{upload_id}"),
            headers={**OCTETS, "Upload-Offset": "4", "Upload-Checksum": wrong},
            content=b"efgh",
        )
        assert resp.status_code == 460
        assert sorted(os.listdir(tmp_path)) == sorted([upload_id + ".info", upload_id + ".part"])
        head = await http.head(a.url(f"/files/{upload_id}"), headers=TUS)
        assert head.headers["Upload-Offset"] == "4"
        right = "sha1 " + base64.b64encode(hashlib.sha1(b"efgh").digest()).decode()
        resp = await http.patch(
            b.url(f"/files/{upload_id}"),
            headers={**OCTETS, "Upload-Offset": "4", "Upload-Checksum": right},
            content=b"efgh",
        )
        assert resp.status_code == 204
    assert read(one.final_path(upload_id)) == b"abcdefgh"
    assert two.stats().checksum_mismatches == 1


async def test_a_segment_committed_by_a_writer_that_died_is_copied_by_the_next(
    tmp_path: Path, state: SharedUploadState
) -> None:
    """A writer that committed and died before copying its segment into the part file
    leaves it listed as pending: the next commit (or the next locked writer) copies it."""
    one, two = await two_servers(tmp_path, state)
    async with serve(one) as (a, _), serve(two) as (b, _), httpx.AsyncClient() as http:
        for writer in ("commit", "lock"):
            resp = await http.post(a.url("/files/"), headers={**TUS, "Upload-Length": "10"})
            upload_id = resp.headers["Location"].rsplit("/", 1)[1]
            resp = await http.patch(
                a.url(f"/files/{upload_id}"),
                headers={**OCTETS, "Upload-Offset": "0"},
                content=b"abcd",
            )
            assert resp.status_code == 204
            # The dead writer's segment, committed but never copied.
            await asyncio.to_thread(
                Path(tmp_path / f"{upload_id}.0123456789abcdef.seg").write_bytes, b"efg"
            )
            now = time.time()
            done = await state.commit(
                upload_id,
                offset=4,
                length=3,
                segment="0123456789abcdef",
                activity=now,
                now=now,
                expire_after=86400.0,
            )
            assert done.ok
            assert size_of(one.partial_path(upload_id)) == 4
            head = await http.head(b.url(f"/files/{upload_id}"), headers=TUS)
            assert head.headers["Upload-Offset"] == "7"
            if writer == "commit":
                resp = await http.patch(
                    b.url(f"/files/{upload_id}"),
                    headers={**OCTETS, "Upload-Offset": "7"},
                    content=b"hij",
                )
                assert resp.status_code == 204
                assert read(two.final_path(upload_id)) == b"abcdefghij"
            else:
                sink = await two.lock_for_write(upload_id)
                try:
                    assert sink.offset == 7
                    assert read(two.partial_path(upload_id)) == b"abcdefg"
                finally:
                    await sink.end_write()
            assert not [name for name in os.listdir(tmp_path) if name.endswith(".seg")]


async def test_an_append_handle_let_go_from_synchronous_code_is_committed(
    tmp_path: Path, state: SharedUploadState
) -> None:
    store = UploadStore(tmp_path, shared=state)
    created = await store.create(6)
    sink = await store.open_append(created.id, 0)
    assert sink is not None
    assert store.stats().active == 1
    await sink.write(b"abc")
    sink.release_later()  # as a handler's on_finish does
    await store.drain_tasks()
    await asyncio.wait_for(store.wait_writers(), scaled(5))
    assert store.stats().active == 0
    assert (await store.describe(created.id)).offset == 3
    assert read(store.partial_path(created.id)) == b"abc"
    assert await UploadStore(tmp_path / "other").open_append(created.id, 0) is None
    store.close()
