"""The tus 1.0.0 handler, driven by httpx, raw sockets and the real tuspy client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import io
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import tornado.web
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from tests.helpers import (
    CountingStore,
    exists,
    listdir,
    open_partial_files,
    run_example,
    size_of,
)
from tests.helpers import read_bytes as read
from tornado_longconn.testing import AppServer, scaled
from tornado_longconn.upload import ChunkedUploadSink, UploadStore, is_upload_id
from tornado_longconn.upload_tus import TusUploadHandler

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}


class Probe(TusUploadHandler):
    """The real handler plus events a test can wait on."""

    events: dict[str, asyncio.Event]

    async def prepare(self) -> None:
        await super().prepare()
        if self._holding:
            self.events["writing"].set()

    def on_connection_close(self) -> None:
        holding = self._holding  # a writer's connection, not an early-answered one
        super().on_connection_close()
        if holding:
            self.events["closed"].set()


@contextlib.asynccontextmanager
async def serve(
    store: UploadStore, handler: type[TusUploadHandler] = Probe, **kwargs: Any
) -> AsyncIterator[tuple[AppServer, dict[str, asyncio.Event]]]:
    events = {"writing": asyncio.Event(), "closed": asyncio.Event()}
    cls = type("H", (handler,), {"events": events})
    app = tornado.web.Application(cls.routes("/files", store=store, **kwargs))
    async with AppServer(app) as server:
        yield server, events
    await store.drain_tasks()
    store.close()


async def create(http: httpx.AsyncClient, server: AppServer, size: int, **headers: str) -> str:
    resp = await http.post(
        server.url("/files/"), headers={**TUS, "Upload-Length": str(size), **headers}
    )
    assert resp.status_code == 201, resp.text
    location = resp.headers["Location"]
    assert location.startswith("/files/")  # relative: never built from the Host header
    return urljoin(server.url("/files/"), location)


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "uploads", max_size=1 << 24, chunk_size=64 * 1024)


async def test_options_advertises_the_extensions(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        resp = await http.options(server.url("/files/"))
    assert resp.status_code == 204
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert resp.headers["Tus-Max-Size"] == str(1 << 24)
    assert set(resp.headers["Tus-Extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "checksum",
        "expiration",
        "creation-defer-length",
        "concatenation",
    }
    assert "sha1" in resp.headers["Tus-Checksum-Algorithm"].split(",")


async def test_create_head_patch_complete(store: UploadStore) -> None:
    data = os.urandom(200_000)
    done: list[ChunkedUploadSink] = []
    async with serve(store, on_complete=done.append) as (server, _), httpx.AsyncClient() as http:
        meta = "filename " + base64.b64encode(b"../../etc/passwd").decode()
        url = await create(http, server, len(data), **{"Upload-Metadata": meta})
        upload_id = url.rsplit("/", 1)[1]
        assert is_upload_id(upload_id)
        head = await http.head(url, headers=TUS)
        assert head.status_code == 200
        assert head.headers["Upload-Offset"] == "0"
        assert head.headers["Upload-Length"] == str(len(data))
        assert head.headers["Cache-Control"] == "no-store"
        assert "Upload-Expires" in head.headers
        assert base64.b64decode(head.headers["Upload-Metadata"].split(" ")[1]) == b"passwd"
        first = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "0"}, content=data[:70_000]
        )
        assert first.status_code == 204
        assert first.headers["Upload-Offset"] == "70000"
        assert "Upload-Expires" in first.headers
        last = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "70000"}, content=data[70_000:]
        )
        assert last.status_code == 204 and last.headers["Upload-Offset"] == str(len(data))
        head = await http.head(url, headers=TUS)
        assert head.headers["Upload-Offset"] == str(len(data))
    assert read(store.final_path(upload_id)) == data
    assert [s.id for s in done] == [upload_id]
    assert done[0].sha256 == hashlib.sha256(data).hexdigest()


async def test_creation_with_upload(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(
            server.url("/files"),
            headers={**OCTETS, "Upload-Length": "10"},
            content=b"01234",
        )
        assert resp.status_code == 201 and resp.headers["Upload-Offset"] == "5"
        url = urljoin(server.url("/files"), resp.headers["Location"])
        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "5"}, content=b"56789")
        assert resp.status_code == 204
    assert read(store.final_path(url.rsplit("/", 1)[1])) == b"0123456789"


async def test_zero_length_upload_completes_on_creation(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 0)
    assert read(store.final_path(url.rsplit("/", 1)[1])) == b""


async def test_offset_mismatch_is_409(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 10)
        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "3"}, content=b"abc")
        assert resp.status_code == 409
        assert resp.headers["Upload-Offset"] == "0"
        assert (await http.head(url, headers=TUS)).headers["Upload-Offset"] == "0"


async def test_checksum_mismatch_is_460_and_discards_the_chunk(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 10)
        good = await http.patch(
            url,
            headers={
                **OCTETS,
                "Upload-Offset": "0",
                "Upload-Checksum": "sha1 "
                + base64.b64encode(hashlib.sha1(b"abcde").digest()).decode(),
            },
            content=b"abcde",
        )
        assert good.status_code == 204 and good.headers["Upload-Offset"] == "5"
        bad = await http.patch(
            url,
            headers={
                **OCTETS,
                "Upload-Offset": "5",
                "Upload-Checksum": "sha256 "
                + base64.b64encode(hashlib.sha256(b"fghij").digest()).decode(),
            },
            content=b"fghiX",
        )
        assert bad.status_code == 460
        upload_id = url.rsplit("/", 1)[1]
        assert (await http.head(url, headers=TUS)).headers["Upload-Offset"] == "5"
        assert read(store.partial_path(upload_id)) == b"abcde"
        unsupported = await http.patch(
            url,
            headers={**OCTETS, "Upload-Offset": "5", "Upload-Checksum": "crc32 AAAA"},
            content=b"fghij",
        )
        assert unsupported.status_code == 400
        ok = await http.patch(url, headers={**OCTETS, "Upload-Offset": "5"}, content=b"fghij")
        assert ok.status_code == 204
    assert read(store.final_path(upload_id)) == b"abcdefghij"


async def test_version_and_header_errors(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(server.url("/files/"), headers={"Upload-Length": "5"})
        assert resp.status_code == 412 and resp.headers["Tus-Version"] == "1.0.0"
        resp = await http.post(
            server.url("/files/"), headers={"Tus-Resumable": "0.2.2", "Upload-Length": "5"}
        )
        assert resp.status_code == 412
        for garbage in ["abc", "-1", "1e3", "", "99999999999999999999999"]:
            resp = await http.post(server.url("/files/"), headers={**TUS, "Upload-Length": garbage})
            assert resp.status_code == 400, garbage
        resp = await http.post(server.url("/files/"), headers=TUS)
        assert resp.status_code == 400
        resp = await http.post(
            server.url("/files/"), headers={**TUS, "Upload-Length": "5", "Upload-Metadata": "x !!"}
        )
        assert resp.status_code == 400
        url = await create(http, server, 5)
        for offset in ["x", "-1", ""]:
            resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": offset}, content=b"a")
            assert resp.status_code == 400, offset
        resp = await http.patch(
            url, headers={**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"}, content=b"a"
        )
        assert resp.status_code == 415
        resp = await http.patch(url, headers={**OCTETS, "Upload-Checksum": "sha1"}, content=b"a")
        assert resp.status_code == 400
        # Ids the store did not make are unknown, whatever they contain.
        for bad_id in ["..%2F..%2Fetc%2Fpasswd", "0" * 31, "A" * 32, "%00"]:
            resp = await http.head(server.url("/files/" + bad_id), headers=TUS)
            assert resp.status_code == 404, bad_id
        resp = await http.head(server.url("/files/" + "0" * 32), headers=TUS)
        assert resp.status_code == 404


async def test_too_large_is_413(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(
            server.url("/files/"), headers={**TUS, "Upload-Length": str(1 << 30)}
        )
        assert resp.status_code == 413
        url = await create(http, server, 10)
        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"x" * 11)
        assert resp.status_code == 413
        assert (await http.head(url, headers=TUS)).headers["Upload-Offset"] == "0"

        # Past the size without a Content-Length (chunked body): cut off at the limit.
        async def body() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"y" * 4

        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=body())
        assert resp.status_code == 413


async def test_termination(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 10)
        await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"abc")
        resp = await http.delete(url, headers=TUS)
        assert resp.status_code == 204
        assert (await http.head(url, headers=TUS)).status_code == 404
        assert (await http.delete(url, headers=TUS)).status_code == 404
    assert listdir(store.root) == []


async def test_expired_uploads_are_gone(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, expire_after=scaled(0.05))
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 10)
        upload_id = url.rsplit("/", 1)[1]
        await asyncio.sleep(scaled(0.1))  # let the expiry deadline pass (the subject here)
        assert await store.sweep() == 1
        assert not exists(store.partial_path(upload_id))
        assert (await http.head(url, headers=TUS)).status_code == 404
        url = await create(http, server, 10)
        await asyncio.sleep(scaled(0.1))
        assert (await http.head(url, headers=TUS)).status_code == 410


async def test_cors_headers_for_browser_clients(store: UploadStore) -> None:
    origin = "https://app.example"
    async with (
        serve(store, cors_origins=[origin]) as (server, _),
        httpx.AsyncClient() as http,
    ):
        pre = await http.options(
            server.url("/files/"),
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 204
        assert pre.headers["Access-Control-Allow-Origin"] == origin
        assert "PATCH" in pre.headers["Access-Control-Allow-Methods"]
        assert "Upload-Offset" in pre.headers["Access-Control-Allow-Headers"]
        resp = await http.post(
            server.url("/files/"), headers={**TUS, "Upload-Length": "3", "Origin": origin}
        )
        exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"Location", "Upload-Offset", "Upload-Length", "Tus-Resumable"} <= exposed
        other = await http.post(
            server.url("/files/"), headers={**TUS, "Upload-Length": "3", "Origin": "https://evil"}
        )
        assert "Access-Control-Allow-Origin" not in other.headers


async def raw_patch(server: AppServer, path: str, offset: int, length: int) -> socket.socket:
    """Open a PATCH with ``length`` body bytes announced; the caller sends the body."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setblocking(False)
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    await asyncio.get_running_loop().sock_sendall(sock, head)
    return sock


async def test_two_concurrent_patches_exactly_one_proceeds(store: UploadStore) -> None:
    async with serve(store) as (server, events), httpx.AsyncClient() as http:
        url = await create(http, server, 100)
        path = "/files/" + url.rsplit("/", 1)[1]
        sock = await raw_patch(server, path, 0, 100)
        try:
            await asyncio.wait_for(events["writing"].wait(), scaled(5))
            second = await http.patch(
                url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"b" * 100
            )
            assert second.status_code == 423
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"a" * 100)
            reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(5))
            assert reply.startswith(b"HTTP/1.1 204")
        finally:
            sock.close()
    assert read(store.final_path(path.rsplit("/", 1)[1])) == b"a" * 100


async def test_disconnect_mid_patch_keeps_the_partial(store: UploadStore) -> None:
    data = os.urandom(500_000)
    async with serve(store) as (server, events), httpx.AsyncClient() as http:
        url = await create(http, server, len(data))
        upload_id = url.rsplit("/", 1)[1]
        sock = await raw_patch(server, "/files/" + upload_id, 0, len(data))
        await asyncio.get_running_loop().sock_sendall(sock, data[:300_000])
        sock.close()
        await asyncio.wait_for(events["closed"].wait(), scaled(5))
        await store.drain_tasks()
        head = await http.head(url, headers=TUS)
        offset = int(head.headers["Upload-Offset"])
        assert offset == size_of(store.partial_path(upload_id)) == 300_000
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": str(offset)}, content=data[offset:]
        )
        assert resp.status_code == 204
    assert read(store.final_path(upload_id)) == data


class TinyDisk(UploadStore):
    """A store whose "disk" holds ``capacity`` bytes per file (ENOSPC past it)."""

    capacity = 100_000

    def write_at(self, fd: int, data: memoryview, offset: int) -> int:
        room = self.capacity - offset
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_at(fd, data[:room], offset)


async def test_disk_full_is_507_and_the_server_stays_up(tmp_path: Path) -> None:
    store = TinyDisk(tmp_path, chunk_size=32 * 1024)
    data = os.urandom(200_000)
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, len(data))
        upload_id = url.rsplit("/", 1)[1]
        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=data)
        assert resp.status_code == 507
        offset = int((await http.head(url, headers=TUS)).headers["Upload-Offset"])
        assert offset == size_of(store.partial_path(upload_id)) <= 100_000
        assert (await http.options(server.url("/files/"))).status_code == 204
        store.capacity = 1 << 30
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": str(offset)}, content=data[offset:]
        )
        assert resp.status_code == 204
    assert read(store.final_path(upload_id)) == data
    assert store.stats().storage_errors == 1


# -- the real tuspy client -------------------------------------------------------------


def tus_upload(url: str, data: bytes, **kwargs: Any) -> str:
    uploader = tus_client.TusClient(url).uploader(file_stream=io.BytesIO(data), **kwargs)
    uploader.upload()
    return str(uploader.url)


async def test_tuspy_uploads_with_checksums(store: UploadStore) -> None:
    data = os.urandom(1_500_000)
    async with serve(store) as (server, _):
        url = await asyncio.to_thread(
            tus_upload,
            server.url("/files/"),
            data,
            chunk_size=400_000,
            upload_checksum=True,
            metadata={"filename": "/abs/../x.bin"},
        )
    upload_id = url.rsplit("/", 1)[1]
    assert read(store.final_path(upload_id)) == data
    assert (await store.open(upload_id)).metadata["filename"] == "x.bin"


class DropHalfway(Probe):
    """Drops the connection of the first PATCH once half of the upload arrived."""

    dropped = False

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        result = super().data_received(chunk)
        sink = self._sink
        if not DropHalfway.dropped and sink is not None and sink.state.accepted >= sink.size // 2:
            DropHalfway.dropped = True
            self.request.connection.stream.close()  # type: ignore[union-attr]
        return result


async def test_tuspy_resumes_an_interrupted_upload(store: UploadStore) -> None:
    data = os.urandom(2_000_000)
    async with serve(store, DropHalfway) as (server, events):
        created: list[str] = []

        def first_attempt() -> None:
            uploader = tus_client.TusClient(server.url("/files/")).uploader(
                file_stream=io.BytesIO(data), chunk_size=len(data)
            )
            created.append(str(uploader.create_url()))
            uploader.set_url(created[0])
            uploader.upload()

        with pytest.raises(TusCommunicationError):
            await asyncio.to_thread(first_attempt)
        await asyncio.wait_for(events["closed"].wait(), scaled(5))
        await store.drain_tasks()
        upload_id = created[0].rsplit("/", 1)[1]
        stored = size_of(store.partial_path(upload_id))
        assert len(data) // 2 <= stored < len(data)

        def resume() -> int:
            uploader = tus_client.TusClient(server.url("/files/")).uploader(
                file_stream=io.BytesIO(data), url=created[0]
            )
            start = int(uploader.offset)  # tuspy asked the server (HEAD)
            uploader.upload()
            return start

        assert await asyncio.to_thread(resume) == stored
    assert read(store.final_path(upload_id)) == data


# -- restart of a real server process --------------------------------------------------


@contextlib.asynccontextmanager
async def server_process(
    root: Path, **extra_env: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    env = dict(UPLOAD_DIR=str(root), **extra_env)
    async with run_example("upload_server.py", ready="/files/", **env) as example:
        yield example.process, example.port


async def test_upload_survives_a_server_kill(tmp_path: Path) -> None:
    data = os.urandom(6 << 20)
    async with server_process(tmp_path) as (proc, port), httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{port}/files/"
        resp = await http.post(base, headers={**TUS, "Upload-Length": str(len(data))})
        url = urljoin(base, resp.headers["Location"])
        upload_id = url.rsplit("/", 1)[1]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(
                sock,
                (
                    f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                    "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode()
                + data[: 3 << 20],
            )
            # Wait (bounded) until the server reports at least 2 MiB stored, then kill it
            # with SIGKILL in the middle of the request: no clean-up code runs.
            deadline = loop.time() + scaled(20)
            while True:
                head = await http.head(url, headers=TUS)
                if int(head.headers["Upload-Offset"]) >= 2 << 20:
                    break
                assert loop.time() < deadline, "server never stored 2 MiB"
                await asyncio.sleep(scaled(0.01))
            proc.kill()
            await proc.wait()
        finally:
            sock.close()
    on_disk = size_of(tmp_path / (upload_id + ".part"))
    assert 2 << 20 <= on_disk <= 3 << 20

    async with server_process(tmp_path) as (proc, port), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{port}/files/{upload_id}"
        head = await http.head(url, headers=TUS)
        assert int(head.headers["Upload-Offset"]) == on_disk

        def resume() -> None:
            uploader = tus_client.TusClient(f"http://127.0.0.1:{port}/files/").uploader(
                file_stream=io.BytesIO(data), url=url, chunk_size=1 << 20
            )
            uploader.upload()

        await asyncio.to_thread(resume)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        output = (await asyncio.wait_for(proc.communicate(), scaled(10)))[0].decode()
    digest = hashlib.sha256(data).hexdigest()
    # The server re-hashed the partial file after the restart and got the same digest.
    assert f"sha256={digest}" in output
    assert hashlib.sha256(read(tmp_path / upload_id)).hexdigest() == digest


async def test_body_is_not_read_while_the_disk_is_busy(tmp_path: Path) -> None:
    """data_received returns the sink's awaitable: a slow disk stops Tornado reading."""
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    writing = asyncio.Event()

    class SlowDisk(UploadStore):
        def write_at(self, fd: int, data: memoryview, offset: int) -> int:
            loop.call_soon_threadsafe(writing.set)
            gate.wait(scaled(10))
            return super().write_at(fd, data, offset)

    chunk = 64 * 1024
    store = SlowDisk(tmp_path, chunk_size=chunk, max_in_flight=1)
    data = os.urandom(8 << 20)
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, len(data))
        upload_id = url.rsplit("/", 1)[1]
        sock = await raw_patch(server, "/files/" + upload_id, 0, len(data))
        sender = asyncio.ensure_future(loop.sock_sendall(sock, data))
        try:
            await asyncio.wait_for(writing.wait(), scaled(5))
            await asyncio.sleep(
                scaled(0.1)
            )  # a window in which an unthrottled reader would read on
            sink = await store.open(upload_id)
            # One chunk at the disk, at most one queued, one being coalesced.
            assert sink.state.accepted <= 3 * chunk
            assert not sender.done()  # the client is blocked by TCP flow control
            gate.set()
            await asyncio.wait_for(sender, scaled(20))
            reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(20))
            assert reply.startswith(b"HTTP/1.1 204")
        finally:
            gate.set()
            sock.close()
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    assert (
        hashlib.sha256(read(store.final_path(upload_id))).hexdigest()
        == hashlib.sha256(data).hexdigest()
    )


# -- early answers reach the client ----------------------------------------------------


class GatedDisk(UploadStore):
    """A store whose writes wait for ``gate`` (a threading.Event) once ``closed``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def write_at(self, fd: int, data: memoryview, offset: int) -> int:
        if not self.gate.is_set():
            self.loop.call_soon_threadsafe(self.waiting.set)
            self.gate.wait(scaled(20))
        return super().write_at(fd, data, offset)


async def test_ten_concurrent_patches_one_204_and_nine_423_read_by_the_clients(
    tmp_path: Path,
) -> None:
    store = GatedDisk(tmp_path, chunk_size=64 * 1024)
    store.gate.clear()  # the PATCH that gets the lock stays in it until the others answered
    data = os.urandom(200_000)
    async with (
        serve(store) as (server, _),
        httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as http,
    ):
        url = await create(http, server, len(data))
        patches = [
            asyncio.ensure_future(
                http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=data)
            )
            for _ in range(10)
        ]
        try:
            answered: list[httpx.Response] = []
            for next_done in asyncio.as_completed(patches):
                answered.append(await asyncio.wait_for(next_done, scaled(20)))
                if len(answered) == 9:
                    store.gate.set()  # let the holder store its body
        finally:
            store.gate.set()
            await asyncio.gather(*patches, return_exceptions=True)
        statuses = sorted(r.status_code for r in answered)
        assert statuses == [204] + [423] * 9
        for resp in answered:
            if resp.status_code == 423:
                assert resp.headers["Connection"] == "close"
                assert resp.headers["Upload-Offset"] == "0"
    assert read(store.final_path(url.rsplit("/", 1)[1])) == data
    assert store.stats().lock_conflicts == 9


async def test_resume_right_after_a_cut_reads_423_and_409_then_succeeds(tmp_path: Path) -> None:
    store = GatedDisk(tmp_path, chunk_size=64 * 1024)
    data = os.urandom(1_000_000)
    async with serve(store) as (server, events), httpx.AsyncClient() as http:
        url = await create(http, server, len(data))
        upload_id = url.rsplit("/", 1)[1]
        store.gate.clear()
        try:
            sock = await raw_patch(server, "/files/" + upload_id, 0, len(data))
            await asyncio.get_running_loop().sock_sendall(sock, data[:300_000])
            await asyncio.wait_for(store.waiting.wait(), scaled(5))
            # The network cut: the server has not noticed yet (its request waits for
            # the disk), so it still holds the upload.
            sock.close()

            def tus_resume() -> None:
                tus_client.TusClient(server.url("/files/")).uploader(
                    file_stream=io.BytesIO(data), url=url
                ).upload()

            # An immediate resume reads 423 (not a connection reset).
            with pytest.raises(TusCommunicationError) as locked:
                await asyncio.to_thread(tus_resume)
            assert locked.value.status_code == 423
            stale = (await http.head(url, headers=TUS)).headers["Upload-Offset"]
        finally:
            store.gate.set()
        await asyncio.wait_for(events["closed"].wait(), scaled(5))
        await store.drain_tasks()
        # A PATCH at the offset seen before the cut was settled: 409, read.
        conflict = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": stale}, content=data[int(stale) :]
        )
        assert conflict.status_code == 409 and conflict.headers["Connection"] == "close"
        assert int(conflict.headers["Upload-Offset"]) > int(stale)
        await asyncio.to_thread(tus_resume)
    assert read(store.final_path(upload_id)) == data


async def test_next_request_on_the_socket_after_each_early_status(store: UploadStore) -> None:
    from tests.test_early_answer import RawHTTP, request

    async with serve(store) as (server, events), httpx.AsyncClient() as http:
        url = await create(http, server, 100_000)
        path = "/files/" + url.rsplit("/", 1)[1]
        ok = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"a" * 10)
        assert ok.status_code == 204
        body = 50_000
        cases = {
            409: {"Upload_Offset": "3"},
            413: {"Upload_Offset": "10", "Content_Length_Over": "1"},
            415: {"Upload_Offset": "10", "Content_Type": "text/plain"},
            412: {"Tus_Resumable": "0.2.2"},
            400: {"Upload_Offset": "x"},
        }
        for status, extra in cases.items():
            headers = {
                "Tus_Resumable": "1.0.0",
                "Content_Type": "application/offset+octet-stream",
                **extra,
            }
            length = 200_000 if headers.pop("Content_Length_Over", None) else body
            client = await RawHTTP.connect(server.port)
            try:
                await client.send(request("PATCH", path, length, **headers))
                answer = await client.response()
                assert answer.status == status, (status, answer)
                assert answer.closes
                await client.send(b"b" * length + request("HEAD", path, 0, Tus_Resumable="1.0.0"))
                assert await client.end_of_stream() == b""  # a clean close, never a reset
            finally:
                client.close()
        # 423: another request holds the upload.
        holder = await raw_patch(server, path, 10, 10)
        try:
            await asyncio.wait_for(events["writing"].wait(), scaled(5))
            client = await RawHTTP.connect(server.port)
            try:
                await client.send(
                    request(
                        "PATCH",
                        path,
                        body,
                        Tus_Resumable="1.0.0",
                        Content_Type="application/offset+octet-stream",
                        Upload_Offset="10",
                    )
                )
                answer = await client.response()
                assert (answer.status, answer.closes) == (423, True)
                await client.send(b"c" * body)
                assert await client.end_of_stream() == b""
            finally:
                client.close()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(holder, b"h" * 10)
            reply = await asyncio.wait_for(loop.sock_recv(holder, 4096), scaled(5))
            assert reply.startswith(b"HTTP/1.1 204")
        finally:
            holder.close()
        # An answer after the whole body was read (a checksum mismatch) keeps the
        # connection: the next request on the socket is served.
        client = await RawHTTP.connect(server.port)
        try:
            digest = base64.b64encode(hashlib.sha1(b"right").digest()).decode()
            await client.send(
                request(
                    "PATCH",
                    path,
                    5,
                    Tus_Resumable="1.0.0",
                    Content_Type="application/offset+octet-stream",
                    Upload_Offset="20",
                    Upload_Checksum="sha1 " + digest,
                )
                + b"wrong"
            )
            answer = await client.response()
            assert (answer.status, answer.closes) == (460, False)
            await client.send(request("HEAD", path, 0, Tus_Resumable="1.0.0"))
            head = await client.response()
            assert (head.status, head.headers["upload-offset"]) == (200, "20")
        finally:
            client.close()


# -- termination, method override, Location ------------------------------------------


async def test_delete_of_a_completed_upload_is_204_and_frees_it(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 5)
        upload_id = url.rsplit("/", 1)[1]
        done = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"12345")
        assert done.status_code == 204 and exists(store.final_path(upload_id))
        resp = await http.delete(url, headers=TUS)
        assert resp.status_code == 204
        assert (await http.head(url, headers=TUS)).status_code == 404
        assert (await http.delete(url, headers=TUS)).status_code == 404
    assert listdir(store.root) == []
    assert store.stats().deleted == 1


async def test_method_override_is_honoured(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 6)

        def override(method: str, **headers: str) -> dict[str, str]:
            return {**TUS, "X-HTTP-Method-Override": method, **headers}

        resp = await http.post(
            url,
            headers=override("PATCH", **OCTETS, **{"Upload-Offset": "0"}),
            content=b"abc",
        )
        assert resp.status_code == 204 and resp.headers["Upload-Offset"] == "3"
        head = await http.post(url, headers=override("head"))
        assert head.status_code == 200 and head.headers["Upload-Offset"] == "3"
        assert head.content == b""
        refused = await http.post(url, headers=override("GET"))
        assert refused.status_code == 405
        gone = await http.post(url, headers=override("DELETE"))
        assert gone.status_code == 204
        assert (await http.head(url, headers=TUS)).status_code == 404
        # A real PATCH ignores the header (only a POST is overridden).
        other = await create(http, server, 3)
        resp = await http.patch(
            other,
            headers={**OCTETS, "Upload-Offset": "0", "X-HTTP-Method-Override": "DELETE"},
            content=b"xyz",
        )
        assert resp.status_code == 204
    other_id = other.rsplit("/", 1)[1]
    assert sorted(listdir(store.root)) == [other_id, other_id + ".info"]


async def test_location_never_reflects_the_host_header(store: UploadStore) -> None:
    hostile = {**TUS, "Upload-Length": "1", "Host": "evil.example"}
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "uploads.example"}
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(server.url("/files/"), headers={**hostile, **forwarded})
        assert resp.status_code == 201
        assert resp.headers["Location"].startswith("/files/")  # forwarded not trusted
        assert "evil" not in resp.headers["Location"]
    async with serve(store, base_url="https://cdn.example/up/") as (server, _):
        async with httpx.AsyncClient() as http:
            resp = await http.post(server.url("/files/"), headers=hostile)
        location = resp.headers["Location"]
        assert location.startswith("https://cdn.example/up/")
        assert is_upload_id(location.rsplit("/", 1)[1])
    async with serve(store, trust_forwarded=True) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(server.url("/files/"), headers={**hostile, **forwarded})
        assert resp.headers["Location"].startswith("https://uploads.example/files/")
        resp = await http.post(
            server.url("/files/"),
            headers={**hostile, "Forwarded": 'for=1.2.3.4;proto=http;host="up.example:8080"'},
        )
        assert resp.headers["Location"].startswith("http://up.example:8080/files/")
        for bad in ("evil.example/x", "a b", "evil.example@x"):
            resp = await http.post(
                server.url("/files/"),
                headers={**hostile, "X-Forwarded-Proto": "https", "X-Forwarded-Host": bad},
            )
            assert resp.headers["Location"].startswith("/files/"), bad


# -- open files --------------------------------------------------------------------------


async def test_many_tus_uploads_stay_within_the_open_file_budget(tmp_path: Path) -> None:
    store = CountingStore(tmp_path, chunk_size=16 * 1024, max_open_files=3)
    uploads = {}
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        urls = [await create(http, server, 60_000) for _ in range(40)]
        assert open_partial_files(store.root) == 0  # creation holds no descriptor
        for url in urls:
            uploads[url] = os.urandom(60_000)

        async def send(url: str, start: int, end: int) -> None:
            piece = uploads[url][start:end]
            digest = base64.b64encode(hashlib.sha256(piece).digest()).decode()
            resp = await http.patch(
                url,
                headers={
                    **OCTETS,
                    "Upload-Offset": str(start),
                    "Upload-Checksum": "sha256 " + digest,
                },
                content=piece,
            )
            assert resp.status_code == 204, resp.text

        for start, end in ((0, 25_000), (25_000, 60_000)):
            await asyncio.gather(*(send(url, start, end) for url in urls))
            assert open_partial_files(store.root) <= 3
    assert store.most_open <= 3
    assert store.stats().files_closed > 0 and store.stats().rehashed == 0
    for url, data in uploads.items():
        upload_id = url.rsplit("/", 1)[1]
        sink = await store.open(upload_id)
        assert sink.sha256 == hashlib.sha256(data).hexdigest()
        assert read(store.final_path(upload_id)) == data


async def test_example_server_tus_conformance(tmp_path: Path) -> None:
    """The example server: early answers read, DELETE of a completed upload, override, Location."""
    from tests.test_early_answer import RawHTTP, request

    public = "https://uploads.example/files"
    async with (
        server_process(tmp_path, UPLOAD_BASE_URL=public, UPLOAD_MAX_OPEN_FILES="8") as (_, port),
        httpx.AsyncClient() as http,
    ):
        base = f"http://127.0.0.1:{port}/files/"
        resp = await http.post(base, headers={**TUS, "Upload-Length": "5", "Host": "evil"})
        assert resp.status_code == 201 and resp.headers["Location"].startswith(public + "/")
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        url = base + upload_id
        # An early answer (wrong offset) over a body still being sent is read.
        client = await RawHTTP.connect(port)
        try:
            await client.send(
                request(
                    "PATCH",
                    "/files/" + upload_id,
                    500_000,
                    Tus_Resumable="1.0.0",
                    Content_Type="application/offset+octet-stream",
                    Upload_Offset="3",
                )
            )
            answer = await client.response()
            assert (answer.status, answer.closes) == (409, True)
            await client.send(b"x" * 500_000)
            assert await client.end_of_stream() == b""
        finally:
            client.close()
        head = await http.post(url, headers={**TUS, "X-HTTP-Method-Override": "HEAD"})
        assert head.status_code == 200 and head.headers["Upload-Offset"] == "0"
        done = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"12345")
        assert done.status_code == 204
        assert (await http.delete(url, headers=TUS)).status_code == 204
        assert (await http.head(url, headers=TUS)).status_code == 404
    assert not (tmp_path / upload_id).exists()
