"""UploadState (I/O-free), metadata/name helpers, and UploadStore/ChunkedUploadSink on disk."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import resource
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import CountingStore, exists, open_partial_files, size_of
from tests.helpers import read_bytes as read
from tornado_longconn.exceptions import UploadError
from tornado_longconn.upload import (
    ChunkedUploadSink,
    UploadState,
    UploadStatus,
    UploadStore,
    default_max_open_files,
    encode_tus_metadata,
    is_upload_id,
    parse_tus_metadata,
    sanitize_filename,
)

# -- UploadState -----------------------------------------------------------------------


def test_state_counts_accepted_and_stored_bytes() -> None:
    state = UploadState(size=10, max_size=100, now=0.0)
    state.accept(4)
    assert (state.offset, state.accepted, state.remaining) == (0, 4, 6)
    state.stored(4, now=5.0)
    assert state.offset == 4 and state.last_activity == 5.0
    state.check_offset(4)
    with pytest.raises(UploadError) as info:
        state.check_offset(3)
    assert info.value.status == 409


def test_state_rejects_bytes_past_the_declared_size() -> None:
    state = UploadState(size=10, max_size=100, now=0.0)
    state.accept(10)
    with pytest.raises(UploadError) as info:
        state.accept(1)
    assert info.value.status == 413
    assert state.accepted == 10


def test_state_limits_and_bad_values() -> None:
    with pytest.raises(UploadError) as info:
        UploadState(size=101, max_size=100, now=0.0)
    assert info.value.status == 413
    with pytest.raises(UploadError) as info:
        UploadState(size=-1, max_size=100, now=0.0)
    assert info.value.status == 400


def test_state_offset_check_fails_while_bytes_are_queued() -> None:
    state = UploadState(size=10, max_size=10, now=0.0)
    state.accept(3)
    with pytest.raises(UploadError):
        state.check_offset(0)
    state.drop_queued()
    state.check_offset(0)


def test_state_complete_and_abort() -> None:
    state = UploadState(size=2, max_size=10, now=0.0)
    with pytest.raises(UploadError) as info:
        state.complete()
    assert info.value.status == 409
    state.accept(2)
    state.stored(2, now=1.0)
    state.complete()
    assert state.status is UploadStatus.COMPLETE
    with pytest.raises(UploadError):
        state.accept(0)
    other = UploadState(size=2, max_size=10, now=0.0)
    other.abort()
    with pytest.raises(UploadError) as info:
        other.check_offset(0)
    assert info.value.status == 404


def test_state_expiry_follows_last_activity() -> None:
    state = UploadState(size=5, max_size=10, now=100.0)
    assert not state.is_expired(now=159.0, expire_after=60.0)
    assert state.is_expired(now=160.0, expire_after=60.0)
    state.accept(1)
    state.stored(1, now=150.0)
    assert state.expires_at(60.0) == 210.0
    assert not state.is_expired(now=160.0, expire_after=60.0)


def test_state_rewind() -> None:
    state = UploadState(size=10, max_size=10, now=0.0)
    state.accept(8)
    state.stored(8, now=1.0)
    state.rewind(5, now=2.0)
    assert state.offset == state.accepted == 5
    with pytest.raises(ValueError, match="rewind"):
        state.rewind(6, now=3.0)


@given(
    size=st.integers(0, 1000),
    ops=st.lists(st.tuples(st.sampled_from(["accept", "store", "rewind"]), st.integers(0, 400))),
)
def test_state_invariants_hold_for_any_sequence(size: int, ops: list[tuple[str, int]]) -> None:
    state = UploadState(size=size, max_size=1000, now=0.0)
    for i, (op, n) in enumerate(ops):
        before = (state.offset, state.accepted)
        refused = None
        try:
            if op == "accept":
                state.accept(n)
            elif op == "store":
                state.stored(min(n, state.accepted - state.offset), now=float(i))
            else:
                state.rewind(min(n, state.offset), now=float(i))
        except UploadError as err:
            refused = err
        if refused is not None:
            assert refused.status == 413 and (state.offset, state.accepted) == before
        assert 0 <= state.offset <= state.accepted <= state.size


# -- names and metadata ------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\system32",
    "a\x00b.txt",
    "x" * 5000,
    "\u2025\uff0f\u2025\uff0fetc\uff0fpasswd",  # full-width slash, two-dot leader
    "..",
    ".hidden",
    "",
    "\u202e\u0000\n",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_sanitize_filename_removes_paths_and_controls(name: str) -> None:
    clean = sanitize_filename(name)
    assert clean
    assert "/" not in clean and "\\" not in clean and "\x00" not in clean
    assert not clean.startswith(".")
    assert len(clean.encode("utf-8")) <= 255


@given(st.text())
def test_sanitize_filename_any_text(name: str) -> None:
    clean = sanitize_filename(name)
    assert clean and "/" not in clean and "\\" not in clean
    assert all(ord(c) >= 32 for c in clean)
    assert not clean.startswith(".") and len(clean.encode("utf-8")) <= 255
    assert sanitize_filename(clean) == clean


def test_metadata_round_trip_and_errors() -> None:
    meta = {"filename": "héllo wörld.txt", "filetype": "text/plain", "empty": ""}
    assert parse_tus_metadata(encode_tus_metadata(meta)) == meta
    assert parse_tus_metadata("") == {}
    assert parse_tus_metadata("flag") == {"flag": ""}
    for bad in [
        "filename !!!notbase64",
        "a b c",
        "a YQ==,a YQ==",
        "a YQ==,,b YQ==",
        "k" * 70,
        "é YQ==",
    ]:
        with pytest.raises(UploadError) as info:
            parse_tus_metadata(bad)
        assert info.value.status == 400, bad
    with pytest.raises(UploadError):
        parse_tus_metadata("k " + "QUFB" * 2000)


@given(st.text(max_size=200))
def test_metadata_parser_never_crashes(header: str) -> None:
    refused = None
    try:
        result = parse_tus_metadata(header)
    except UploadError as err:
        refused = err
    if refused is not None:
        assert refused.status == 400
    else:
        assert all(isinstance(v, str) for v in result.values())


def test_upload_id_shape() -> None:
    assert is_upload_id("0" * 32)
    assert not is_upload_id("../" + "0" * 29)
    assert not is_upload_id("0" * 32 + "\n")
    assert not is_upload_id("A" * 32)


# -- store and sink ----------------------------------------------------------------------


def age_file(path: str, seconds: float) -> float:
    past = os.path.getmtime(path) - seconds
    os.utime(path, (past, past))
    return past


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "store", max_size=1 << 24, chunk_size=64 * 1024)


async def write_all(sink: ChunkedUploadSink, data: bytes, piece: int = 10_000) -> int:
    for i in range(0, len(data), piece):
        await sink.write(data[i : i + piece])
    return await sink.flush()


async def test_upload_finishes_atomically_with_sha256(store: UploadStore) -> None:
    data = os.urandom(300_000)
    sink = await store.create(len(data), metadata={"filename": "../../photo.jpg"})
    assert is_upload_id(sink.id)
    assert await write_all(sink, data) == len(data)
    assert not exists(store.final_path(sink.id))
    path = await sink.finish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert path == store.final_path(sink.id)
    assert read(path) == data
    assert not exists(store.partial_path(sink.id))
    info = json.loads(read(store.info_path(sink.id)))
    assert info["sha256"] == sink.sha256 == hashlib.sha256(data).hexdigest()
    assert info["metadata"]["filename"] == "photo.jpg"
    assert store.stats().completed == 1 and store.stats().bytes_stored == len(data)
    # Reopening a completed upload reports it complete (tus HEAD answers offset == size).
    again = await store.open(sink.id)
    assert again.state.status is UploadStatus.COMPLETE and again.offset == len(data)
    store.close()


async def test_finish_with_wrong_sha256_discards_the_upload(store: UploadStore) -> None:
    sink = await store.create(5)
    await write_all(sink, b"hello")
    with pytest.raises(UploadError) as info:
        await sink.finish(expected_sha256="0" * 64)
    assert info.value.status == 460
    assert files_under(Path(store.root)) == set()


async def test_write_waits_when_the_window_is_full(tmp_path: Path) -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    class SlowStore(UploadStore):
        def write_at(self, fd: int, data: memoryview, offset: int) -> int:
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            return super().write_at(fd, data, offset)

    store = SlowStore(tmp_path, chunk_size=1000, max_in_flight=2)
    sink = await store.create(10_000)
    first = sink.write(b"a" * 1000)  # chunk 1 goes to the executor
    assert first.done()
    await started.wait()
    second = sink.write(b"b" * 1000)  # queue: 2 chunks = window full
    assert not second.done()
    with pytest.raises(UploadError):
        sink.state.check_offset(0)  # bytes are queued, not stored
    release.set()
    await asyncio.wait_for(second, 5)
    assert await sink.flush() == 2000
    assert read(store.partial_path(sink.id)) == b"a" * 1000 + b"b" * 1000
    store.close()


async def test_chunk_past_declared_size_is_refused(store: UploadStore) -> None:
    sink = await store.create(10)
    await sink.write(b"x" * 8)
    with pytest.raises(UploadError) as info:
        sink.write(b"y" * 3)
    assert info.value.status == 413
    assert await sink.flush() == 8
    store.close()


async def test_abort_removes_every_file(store: UploadStore) -> None:
    sink = await store.create(100)
    await write_all(sink, b"z" * 50)
    await sink.abort()
    assert files_under(Path(store.root)) == set()
    with pytest.raises(UploadError) as info:
        await store.open(sink.id)
    assert info.value.status == 404
    assert store.stats().aborted == 1


async def test_reopen_after_restart_rehashes_the_partial_file(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    first = UploadStore(tmp_path, chunk_size=32 * 1024)
    sink = await first.create(len(data), metadata={"filename": "a.bin"})
    await write_all(sink, data[:123_456])
    first.close()  # "process exit": only the files remain

    second = UploadStore(tmp_path, chunk_size=32 * 1024)
    again = await second.open(sink.id)
    assert again.offset == 123_456 and again.filename == "a.bin"
    assert second.stats().rehashed == 1
    with again.lock():
        again.state.check_offset(123_456)
        await write_all(again, data[123_456:])
    await again.finish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert read(second.final_path(sink.id)) == data


async def test_checksummed_segment_mismatch_truncates_back(store: UploadStore) -> None:
    sink = await store.create(20)
    await write_all(sink, b"0123456789")
    await sink.begin_segment("sha1", hashlib.sha1(b"abcde").digest())
    await write_all(sink, b"abcdX")
    with pytest.raises(UploadError) as info:
        await sink.end_segment()
    assert info.value.status == 460
    assert sink.offset == 10
    assert read(store.partial_path(sink.id)) == b"0123456789"
    await sink.begin_segment("md5", hashlib.md5(b"abcdefghij").digest())
    await write_all(sink, b"abcdefghij")
    assert await sink.end_segment() == 20
    # The whole-file digest never saw the discarded bytes.
    await sink.finish(expected_sha256=hashlib.sha256(b"0123456789abcdefghij").hexdigest())
    assert store.stats().checksum_mismatches == 1


async def test_crash_inside_a_segment_is_rolled_back_on_open(tmp_path: Path) -> None:
    first = UploadStore(tmp_path)
    sink = await first.create(20)
    await write_all(sink, b"0123456789")
    await sink.begin_segment("sha256", hashlib.sha256(b"abcde").digest())
    await write_all(sink, b"abc")  # the process "dies" before the segment ends
    first.close()
    second = UploadStore(tmp_path)
    again = await second.open(sink.id)
    assert again.offset == 10
    assert not exists(os.path.join(tmp_path, sink.id + ".seg"))
    second.close()


async def test_unsupported_checksum_algorithm(store: UploadStore) -> None:
    sink = await store.create(1)
    with pytest.raises(UploadError) as info:
        await sink.begin_segment("crc32", b"")
    assert info.value.status == 400
    store.close()


async def test_storage_full_keeps_offset_at_bytes_on_disk(tmp_path: Path) -> None:
    class TinyDisk(UploadStore):
        capacity = 150_000

        def write_at(self, fd: int, data: memoryview, offset: int) -> int:
            room = self.capacity - offset
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write_at(fd, data[:room], offset)

    store = TinyDisk(tmp_path, chunk_size=64 * 1024)
    sink = await store.create(300_000)
    with pytest.raises(UploadError) as info:
        await write_all(sink, os.urandom(300_000))
    assert info.value.status == 507
    on_disk = size_of(store.partial_path(sink.id))
    assert sink.offset == on_disk == 140_000  # two whole coalesced chunks of 7 pieces
    assert store.stats().storage_errors == 1
    # The sink is usable again once there is room.
    store.capacity = 1 << 30
    sink.state.check_offset(on_disk)
    assert await write_all(sink, b"x" * 1000) == on_disk + 1000
    store.close()


async def test_sweep_removes_only_expired_partials(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, expire_after=60.0)
    old = await store.create(10)
    fresh = await store.create(10)
    held = await store.create(10)
    done = await store.create(1)
    await write_all(done, b"x")
    await done.finish()
    past = age_file(store.partial_path(old.id), 120)
    age_file(store.partial_path(held.id), 120)
    for sink in (old, held):
        sink.state.last_activity = past
    held.acquire()
    assert await store.sweep() == 1
    assert not exists(store.partial_path(old.id))
    assert not exists(store.info_path(old.id))
    assert exists(store.partial_path(fresh.id))
    assert exists(store.partial_path(held.id))
    assert exists(store.final_path(done.id))
    assert store.stats().expired == 1
    held.release()
    with pytest.raises(UploadError) as info:
        await store.open(held.id)
    assert info.value.status == 410
    store.close()


async def test_cache_is_bounded_and_rebuilds_evicted_uploads(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, max_cached=2)
    first = await store.create(10)
    await write_all(first, b"abc")
    others = [await store.create(10) for _ in range(3)]
    assert len(store._sinks) == 2 and store.stats().evicted == 2
    with pytest.raises(UploadError):
        first.write(b"d")  # an evicted handle is closed
    again = await store.open(first.id)
    assert again is not first and again.offset == 3 and store.stats().rehashed == 1
    assert others[0].id not in store._sinks  # the least recently used went first
    store.close()


async def test_open_files_never_exceed_the_budget(tmp_path: Path) -> None:
    store = CountingStore(tmp_path, chunk_size=4096, max_open_files=4)
    datas = [os.urandom(50_000) for _ in range(30)]
    sinks = [await store.create(len(d)) for d in datas]
    assert open_partial_files(store.root) == 0  # creating holds no descriptor
    piece = 7_000

    async def write_piece(sink: ChunkedUploadSink, data: bytes, start: int) -> None:
        with sink.lock():
            await sink.write(data[start : start + piece])
            await sink.flush()

    for start in range(0, 50_000, piece):  # every upload a piece at a time, all at once
        await asyncio.gather(*(write_piece(s, d, start) for s, d in zip(sinks, datas, strict=True)))
        assert open_partial_files(store.root) <= 4
        assert store.stats().open_files <= 4
    assert store.most_open <= 4
    assert store.stats().files_closed > 0
    assert store.stats().rehashed == 0  # reopened descriptors, the hash state kept
    for sink, data in zip(sinks, datas, strict=True):
        path = await sink.finish()
        assert sink.sha256 == hashlib.sha256(data).hexdigest()
        assert read(path) == data
    assert open_partial_files(store.root) == 0 and store.stats().open_files == 0
    store.close()


async def test_checksummed_segment_survives_its_descriptor_being_closed(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, chunk_size=4096, max_open_files=1)
    first, second = await store.create(20_000), await store.create(10)
    await write_all(first, b"a" * 5_000)
    await first.begin_segment("sha1", hashlib.sha1(b"b" * 5_000).digest())
    await write_all(first, b"b" * 5_000)
    await write_all(second, b"x")  # takes the only descriptor: first's is closed
    assert first._fd < 0 and store.stats().files_closed >= 1
    assert await first.end_segment() == 10_000
    await first.begin_segment("sha1", hashlib.sha1(b"right").digest())
    await write_all(first, b"wrong")
    await write_all(second, b"y")
    with pytest.raises(UploadError) as info:
        await first.end_segment()  # rolled back on a reopened descriptor
    assert info.value.status == 460 and first.offset == 10_000
    await write_all(first, b"c" * 10_000)
    await first.finish()
    expected = b"a" * 5_000 + b"b" * 5_000 + b"c" * 10_000
    assert first.sha256 == hashlib.sha256(expected).hexdigest()
    assert read(store.final_path(first.id)) == expected
    store.close()


async def test_idle_uploads_hold_no_descriptor(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, max_open_files=16)
    sinks = [await store.create(10) for _ in range(1100)]  # e.g. unauthenticated creations
    assert open_partial_files(store.root) == 0 and store.stats().open_files == 0
    for sink in sinks[-40:]:  # the first 100 states were evicted (max_cached=1000)
        await write_all(sink, b"abc")
    assert open_partial_files(store.root) <= 16 and store.stats().open_files <= 16
    store.close()
    assert open_partial_files(store.root) == 0


def test_default_open_file_budget_follows_the_soft_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert default_max_open_files() == 256
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, hard))
        assert default_max_open_files() == 16
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with pytest.raises(ValueError, match="max_open_files"):
        UploadStore("/tmp/unused-upload-root", max_open_files=0)


async def test_delete_removes_a_completed_upload(store: UploadStore) -> None:
    sink = await store.create(3)
    await write_all(sink, b"abc")
    await sink.finish()
    reopened = await store.open(sink.id)
    await reopened.delete()
    assert not exists(store.final_path(sink.id)) and not exists(store.info_path(sink.id))
    with pytest.raises(UploadError) as info:
        await store.open(sink.id)
    assert info.value.status == 404
    await reopened.delete()  # idempotent
    assert store.stats().deleted == 1
    partial = await store.create(3)
    await partial.delete()  # a partial upload is aborted
    assert store.stats().aborted == 1 and not exists(store.partial_path(partial.id))


async def test_concurrent_writers_are_refused(store: UploadStore) -> None:
    sink = await store.create(10)
    sink.acquire()
    with pytest.raises(UploadError) as info, sink.lock():
        pass
    assert info.value.status == 423 and store.stats().lock_conflicts == 1
    sink.release()
    with sink.lock():
        assert sink.locked
    store.close()


@settings(max_examples=40, deadline=None)
@given(
    name=st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=300)),
    upload_id=st.one_of(st.sampled_from(["../x", "/etc/passwd", "a" * 32 + "/..", ""]), st.text()),
)
def test_hostile_names_and_ids_never_leave_the_root(
    tmp_path_factory: pytest.TempPathFactory, name: str, upload_id: str
) -> None:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"

    async def scenario() -> None:
        store = UploadStore(root)
        sink = await store.create(3, metadata={"filename": name, "name": name})
        await write_all(sink, b"abc")
        await sink.finish()
        if not is_upload_id(upload_id):
            with pytest.raises(UploadError) as info:
                await store.open(upload_id)
            assert info.value.status == 404
        for method in (store.partial_path, store.final_path, store.info_path):
            try:
                path = method(upload_id)
            except UploadError:
                continue
            assert os.path.dirname(path) == store.root
        store.close()

    asyncio.run(scenario())
    assert {p.parent for p in files_under(base)} == {root}
    assert all(is_upload_id(p.name.split(".")[0]) for p in files_under(base))
