"""A second UploadStorage -- an in-memory S3-style multipart store -- runs the tus handler.

The store below keeps S3's rules (every part but the last at least 5 MiB; an object
appears only when its multipart upload completes; parts not listed at completion are
dropped) and follows the mapping in ``tornado_longconn.upload_storage``: bytes that do
not fill a part are kept in a *tail* object, so every acknowledged byte is durable.
The tus handler is used unchanged, driven by tuspy and raw HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import secrets
import time
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
from tusclient import client as tus_client

from tests.test_upload_tus import OCTETS, TUS, serve
from tornado_longconn.exceptions import UploadError
from tornado_longconn.upload import (
    CHECKSUM_ALGORITHMS,
    UploadInfo,
    UploadState,
    UploadStats,
    UploadStatus,
)
from tornado_longconn.upload_storage import UploadHandle, UploadStorage

MIN_PART = 5 << 20


@dataclass
class FakeS3:
    """Objects and multipart uploads, with S3's part-size rule."""

    objects: dict[str, bytes] = field(default_factory=dict)
    uploads: dict[str, list[bytes]] = field(default_factory=dict)
    completed_parts: list[list[int]] = field(default_factory=list)

    def create_multipart(self) -> str:
        mpu = secrets.token_hex(8)
        self.uploads[mpu] = []
        return mpu

    def upload_part(self, mpu: str, number: int, data: bytes) -> None:
        parts = self.uploads[mpu]
        del parts[number - 1 :]  # re-uploading a part number replaces it (and what follows)
        parts.append(bytes(data))

    def complete(self, mpu: str, key: str, count: int) -> None:
        parts = self.uploads.pop(mpu)[:count]
        sizes = [len(part) for part in parts]
        if any(size < MIN_PART for size in sizes[:-1]):
            raise AssertionError(f"EntityTooSmall: {sizes}")
        self.completed_parts.append(sizes)
        self.objects[key] = b"".join(parts)


class MultipartHandle:
    """One upload on :class:`FakeS3` (an :class:`UploadHandle`)."""

    def __init__(self, store: MultipartStore, upload_id: str, state: UploadState) -> None:
        self.store = store
        self.id = upload_id
        self.state = state
        self.metadata: dict[str, str] = {}
        self.concat: str | None = None
        self.parts: tuple[str, ...] = ()
        self.mpu = store.s3.create_multipart()
        self.part_count = 0  # parts uploaded (each MIN_PART bytes)
        self.locked = False
        self.sha256: str | None = None
        self._buffer = bytearray()  # accepted, not stored yet
        self._segment: tuple[int, int, bytes, Any, bytes, Any] | None = None
        self._hash = hashlib.sha256()

    # -- the tail object: bytes stored that do not fill a part yet ----------------------

    @property
    def _tail_key(self) -> str:
        return f"{self.id}.tail"

    def _tail(self) -> bytes:
        return self.store.s3.objects.get(self._tail_key, b"")

    @property
    def offset(self) -> int:
        return self.state.offset

    @property
    def size(self) -> int:
        return self.state.size

    @property
    def deferred(self) -> bool:
        return self.state.deferred

    @property
    def in_segment(self) -> bool:
        return self._segment is not None

    @property
    def path(self) -> str:
        return f"s3://bucket/{self.id}"

    def write(self, data: bytes | memoryview) -> Awaitable[None]:
        self.state.accept(len(data))
        self._buffer += data
        if self._segment is not None:
            self._segment[5].update(data)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def flush(self) -> int:
        if not self._buffer:
            return self.offset
        pending = self._tail() + bytes(self._buffer)
        while len(pending) >= MIN_PART:
            self.part_count += 1
            self.store.s3.upload_part(self.mpu, self.part_count, pending[:MIN_PART])
            pending = pending[MIN_PART:]
        self.store.s3.objects[self._tail_key] = pending
        self._hash.update(self._buffer)
        stored = len(self._buffer)
        self._buffer.clear()
        self.state.stored(stored, time.time())
        return self.offset

    async def begin_segment(self, algorithm: str, expected: bytes) -> None:
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise UploadError(f"unsupported checksum algorithm {algorithm!r}", status=400)
        await self.flush()
        self._segment = (
            self.offset,
            self.part_count,
            self._tail(),
            self._hash.copy(),
            expected,
            hashlib.new(algorithm),
        )

    async def end_segment(self) -> int:
        await self.flush()
        if self._segment is None:
            return self.offset
        if self._segment[5].digest() != self._segment[4]:
            await self.rollback_segment()
            raise UploadError("checksum mismatch; chunk discarded", status=460)
        self._segment = None
        return self.offset

    async def rollback_segment(self) -> int:
        segment, self._segment = self._segment, None
        if segment is None:
            return self.offset
        start, count, tail, sha, _, _ = segment
        self._buffer.clear()
        self.part_count = count  # later parts are not listed at completion
        self.store.s3.objects[self._tail_key] = tail
        self._hash = sha
        self.state.rewind(start, time.time())
        return start

    async def declare_length(self, size: int) -> None:
        self.state.declare_length(size)

    async def finish(self, *, expected_sha256: str | None = None) -> str:
        await self.flush()
        self.state.complete()
        tail = self.store.s3.objects.pop(self._tail_key, b"")
        count = self.part_count
        if tail or count == 0:
            count += 1
            self.store.s3.upload_part(self.mpu, count, tail)
        self.store.s3.complete(self.mpu, self.id, count)
        self.sha256 = self._hash.hexdigest()
        self.store.counters["completed"] += 1
        return self.path

    async def abort(self) -> None:
        if self.state.status is UploadStatus.ACTIVE:
            self.state.abort()
            self.store.s3.uploads.pop(self.mpu, None)
            self.store.s3.objects.pop(self._tail_key, None)
            self.store.handles.pop(self.id, None)

    async def delete(self) -> None:
        if self.state.status is UploadStatus.COMPLETE:
            self.state.abort()
            self.store.s3.objects.pop(self.id, None)
            self.store.handles.pop(self.id, None)
        else:
            await self.abort()

    async def end_write(self) -> None:
        self.locked = False

    def release_later(self) -> None:
        self.locked = False

    def info(self) -> UploadInfo:
        return UploadInfo(
            id=self.id,
            size=None if self.deferred else self.size,
            offset=self.offset,
            metadata=dict(self.metadata),
            concat=self.concat,
            parts=self.parts,
            path=self.path,
            sha256=self.sha256,
            complete=self.state.status is UploadStatus.COMPLETE,
        )


class MultipartStore:
    """An :class:`UploadStorage` on :class:`FakeS3` (one process, no expiry)."""

    def __init__(self, max_size: int = 1 << 30) -> None:
        self.s3 = FakeS3()
        self.max_size = max_size
        self.expire_after = 86400.0
        self.handles: dict[str, MultipartHandle] = {}
        self.counters = {"created": 0, "completed": 0, "rejections": 0, "errors": 0}
        self.refused: dict[str, int] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    async def create(
        self,
        size: int | None,
        *,
        metadata: Mapping[str, str] | None = None,
        now: float | None = None,
        concat: str | None = None,
        parts: Sequence[str] = (),
    ) -> MultipartHandle:
        state = UploadState(size=size, max_size=self.max_size, now=time.time())
        handle = MultipartHandle(self, secrets.token_hex(16), state)
        handle.metadata = dict(metadata or {})
        handle.concat, handle.parts = concat, tuple(parts)
        self.handles[handle.id] = handle
        self.counters["created"] += 1
        return handle

    def _get(self, upload_id: str) -> MultipartHandle:
        handle = self.handles.get(upload_id)
        if handle is None:
            raise UploadError("no such upload", status=404)
        return handle

    async def describe(self, upload_id: str, *, now: float | None = None) -> UploadInfo:
        return self._get(upload_id).info()

    async def durable_offset(self, upload_id: str) -> int:
        return self._get(upload_id).offset

    async def lock_for_write(self, upload_id: str, *, now: float | None = None) -> MultipartHandle:
        handle = self._get(upload_id)
        if handle.locked:
            raise UploadError("another request is writing this upload", status=423)
        handle.locked = True
        return handle

    async def check_partials(self, part_ids: Sequence[str], *, now: float | None = None) -> int:
        total = 0
        for part_id in part_ids:
            info = self._get(part_id).info()
            if info.concat != "partial" or not info.complete:
                raise UploadError(f"{part_id} is not a finished partial upload", status=400)
            total += info.size or 0
        return total

    async def concatenate(
        self,
        part_ids: Sequence[str],
        *,
        metadata: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> MultipartHandle:
        total = await self.check_partials(part_ids)
        handle = await self.create(total, metadata=metadata, concat="final", parts=part_ids)
        for part_id in part_ids:  # UploadPartCopy, in effect
            handle.write(self.s3.objects[part_id])
        await handle.finish()
        return handle

    async def read(self, upload_id: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.s3.objects[self._get(upload_id).id]
        return data[offset:] if length is None else data[offset : offset + length]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def count_refused(self, status: int) -> None:
        self.refused[str(status)] = self.refused.get(str(status), 0) + 1

    def count_hook(self, *, rejected: bool) -> None:
        self.counters["rejections" if rejected else "errors"] += 1

    def stats(self) -> UploadStats:
        return UploadStats(
            created=self.counters["created"],
            completed=self.counters["completed"],
            refused=tuple(sorted(self.refused.items())),
        )

    # what the test fixture calls on a store at the end
    async def drain_tasks(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def close(self) -> None:
        pass


def test_the_multipart_store_keeps_the_protocols() -> None:
    store = MultipartStore()
    assert isinstance(store, UploadStorage)
    # mypy checks the signatures here:
    checked: UploadStorage = store
    assert checked is store


async def test_tuspy_and_the_tus_handler_on_a_multipart_store(tmp_path: Path) -> None:
    store = MultipartStore()
    data = os.urandom(12 << 20)
    done: list[UploadHandle] = []
    async with serve(store, on_complete=done.append) as (server, _):  # type: ignore[arg-type]

        def upload() -> str:
            uploader = tus_client.TusClient(server.url("/files/")).uploader(
                file_stream=io.BytesIO(data), chunk_size=3 << 20, upload_checksum=True
            )
            uploader.upload()
            return str(uploader.url)

        url = await asyncio.to_thread(upload)
    upload_id = url.rsplit("/", 1)[1]
    assert isinstance(done[0], UploadHandle) and done[0].id == upload_id
    assert await store.read(upload_id) == data
    assert store.s3.completed_parts == [[MIN_PART, MIN_PART, 2 << 20]]
    assert done[0].info().sha256 == hashlib.sha256(data).hexdigest()


async def test_offsets_checksums_and_concatenation_on_a_multipart_store() -> None:
    store = MultipartStore()
    async with serve(store) as (server, _), httpx.AsyncClient() as http:  # type: ignore[arg-type]
        base = server.url("/files/")
        resp = await http.post(
            base, headers={**TUS, "Upload-Length": str(6 << 20), "Upload-Concat": "partial"}
        )
        part = urljoin(base, resp.headers["Location"])
        first = os.urandom(1 << 20)
        resp = await http.patch(part, headers={**OCTETS, "Upload-Offset": "0"}, content=first)
        assert resp.headers["Upload-Offset"] == str(1 << 20)  # durable: in the tail object
        bad = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
        resp = await http.patch(
            part,
            headers={**OCTETS, "Upload-Offset": str(1 << 20), "Upload-Checksum": f"sha1 {bad}"},
            content=os.urandom(5 << 20),
        )
        assert resp.status_code == 460
        head = await http.head(part, headers=TUS)
        assert head.headers["Upload-Offset"] == str(1 << 20)  # the part it made is dropped
        rest = os.urandom(5 << 20)
        good = base64.b64encode(hashlib.sha1(rest).digest()).decode()
        resp = await http.patch(
            part,
            headers={**OCTETS, "Upload-Offset": str(1 << 20), "Upload-Checksum": f"sha1 {good}"},
            content=rest,
        )
        assert resp.status_code == 204
        resp = await http.post(base, headers={**TUS, "Upload-Concat": f"final;{part} {part}"})
        assert resp.status_code == 201
        final_id = resp.headers["Location"].rsplit("/", 1)[1]
        resp = await http.patch(
            urljoin(base, final_id), headers={**OCTETS, "Upload-Offset": "0"}, content=b"x"
        )
        assert resp.status_code == 403
    assert await store.read(final_id) == (first + rest) * 2
    assert store.stats().refused == (("403", 1), ("460", 1))
