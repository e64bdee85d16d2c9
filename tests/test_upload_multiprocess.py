"""Two real server processes on one upload directory and one Redis serve the same uploads.

Run as a script, this file is one such server: ``python tests/test_upload_multiprocess.py
--root DIR --redis URL --prefix P`` serves tus at ``/files/`` and the WebSocket upload
protocol at ``/ws`` on a free 127.0.0.1 port,
prints ``READY <port>`` and stops on SIGTERM. ``GET /settle`` answers once no request
writes an upload there and its clean-up tasks ended, with the Redis round trips the
process's upload state sent so far (``{"round_trips": n}``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import secrets
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import websockets
from tusclient import client as tus_client
from websockets.exceptions import ConnectionClosed

from tests.helpers import REDIS_URL, redis_reachable
from tornado_longconn.codes import CloseCode
from tornado_longconn.testing import scaled
from tornado_longconn.upload import UploadStore
from tornado_longconn.upload_state import RedisUploadState
from tornado_longconn.upload_tus import TusUploadHandler
from tornado_longconn.upload_ws import WebSocketUploadHandler, encode_chunk

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}


# -- the server process ------------------------------------------------------------------


async def serve(root: str, redis_url: str, prefix: str) -> None:
    """Serve tus on a free port until SIGTERM; everything is made after the process started."""
    state = RedisUploadState(redis_url, prefix=prefix)
    store = UploadStore(root, chunk_size=64 * 1024, shared=state, lock_ttl=30.0)

    class Settle(tornado.web.RequestHandler):
        async def get(self) -> None:
            await store.wait_writers()
            await store.drain_tasks()
            self.write({"round_trips": state.round_trips})

    app = tornado.web.Application(
        [
            *TusUploadHandler.routes("/files", store=store),
            (r"/settle", Settle),
            (r"/ws", WebSocketUploadHandler, {"store": store}),
        ]
    )
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    os.write(sys.stdout.fileno(), f"READY {port}\n".encode())
    await stop.wait()
    server.stop()
    await store.drain_tasks()
    store.close()
    await state.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="one tus server process on shared state")
    parser.add_argument("--root", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.root, args.redis, args.prefix))


# -- the tests ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def servers(
    root: Path, prefix: str, count: int = 2, procs: list[asyncio.subprocess.Process] | None = None
) -> AsyncIterator[list[str]]:
    if not await redis_reachable():
        pytest.skip("needs Redis")
    procs = [] if procs is None else procs
    urls: list[str] = []
    try:
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--root",
                str(root),
                "--redis",
                REDIS_URL,
                "--prefix",
                prefix,
                stdout=asyncio.subprocess.PIPE,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), scaled(20))
            assert line.startswith(b"READY "), line
            urls.append(f"http://127.0.0.1:{int(line.split()[1])}/files/")
        yield urls
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), scaled(10))
        state = RedisUploadState(REDIS_URL, prefix=prefix)
        keys = [key async for key in state._client.scan_iter(prefix + "*")]
        if keys:
            await state._client.delete(*keys)
        await state.close()


async def test_resume_on_the_other_process_with_tuspy(tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    prefix = f"test-upload-mp-{secrets.token_hex(4)}:"
    async with servers(tmp_path, prefix) as (one, two), httpx.AsyncClient() as http:
        resp = await http.post(one, headers={**TUS, "Upload-Length": str(len(data))})
        assert resp.status_code == 201
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        resp = await http.patch(
            one + upload_id, headers={**OCTETS, "Upload-Offset": "0"}, content=data[:400_000]
        )
        assert resp.status_code == 204
        head = await http.head(two + upload_id, headers=TUS)
        assert head.headers["Upload-Offset"] == "400000"

        def resume() -> int:
            uploader = tus_client.TusClient(two).uploader(
                file_stream=io.BytesIO(data), url=two + upload_id, chunk_size=250_000
            )
            start = int(uploader.offset)  # from a HEAD to the second process
            uploader.upload()
            return start

        assert await asyncio.to_thread(resume) == 400_000
        head = await http.head(one + upload_id, headers=TUS)
        assert head.headers["Upload-Offset"] == str(len(data))
        # The first process's cached view is stale: a PATCH there is told the truth.
        resp = await http.patch(
            one + upload_id, headers={**OCTETS, "Upload-Offset": "400000"}, content=b"x"
        )
        assert resp.status_code == 409
    final = tmp_path / upload_id
    assert await asyncio.to_thread(final.read_bytes) == data


async def settle(http: httpx.AsyncClient, url: str) -> int:
    """Wait until the process of ``url`` wrote and recorded everything; its round trips."""
    resp = await http.get(url.replace("/files/", "/settle"), timeout=scaled(10))
    assert resp.status_code == 200
    return int(resp.json()["round_trips"])


def leftovers(root: Path, upload_id: str) -> list[str]:
    """Files of the upload besides the final file and its record (segments, part)."""
    return sorted(set(os.listdir(root)) - {upload_id, upload_id + ".info"})


async def test_concurrent_patches_on_two_processes_the_first_commit_wins(
    tmp_path: Path,
) -> None:
    prefix = f"test-upload-mp-{secrets.token_hex(4)}:"
    async with servers(tmp_path, prefix) as (one, two), httpx.AsyncClient() as http:
        resp = await http.post(one, headers={**TUS, "Upload-Length": "1000"})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        port = int(one.split(":")[2].split("/")[0])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            # Tornado answers "100 Continue" once prepare() returned; no lock is taken:
            # the body goes to a segment file, committed after it.
            await loop.sock_sendall(
                sock,
                (
                    f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                    "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                    "Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n"
                ).encode(),
            )
            interim = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
            assert interim.startswith(b"HTTP/1.1 100"), interim
            other = await http.patch(
                two + upload_id, headers={**OCTETS, "Upload-Offset": "0"}, content=b"b" * 1000
            )
            assert other.status_code == 204
            await loop.sock_sendall(sock, b"a" * 1000)
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 409"), reply
            assert b"\r\nUpload-Offset: 1000\r\n" in reply
        finally:
            sock.close()
        head = await http.head(one + upload_id, headers=TUS)
        assert head.headers["Upload-Offset"] == "1000"
    final = tmp_path / upload_id
    assert await asyncio.to_thread(final.read_bytes) == b"b" * 1000
    assert leftovers(tmp_path, upload_id) == []  # the loser's segment is gone


async def test_a_writer_killed_mid_patch_leaves_the_recorded_offset(tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    prefix = f"test-upload-mp-{secrets.token_hex(4)}:"
    procs: list[asyncio.subprocess.Process] = []
    async with servers(tmp_path, prefix, procs=procs) as (one, two), httpx.AsyncClient() as http:
        resp = await http.post(one, headers={**TUS, "Upload-Length": str(len(data))})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        resp = await http.patch(
            one + upload_id, headers={**OCTETS, "Upload-Offset": "0"}, content=data[:500_000]
        )
        assert resp.status_code == 204
        port = int(one.split(":")[2].split("/")[0])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(
                sock,
                (
                    f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                    "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 500000\r\n"
                    f"Expect: 100-continue\r\nContent-Length: {len(data) - 500_000}\r\n\r\n"
                ).encode(),
            )
            interim = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
            assert interim.startswith(b"HTTP/1.1 100"), interim
            await loop.sock_sendall(sock, data[500_000:1_500_000])
            # However much of that reached the disk, it was never committed: kill -9.
            procs[0].kill()
            await procs[0].wait()
        finally:
            sock.close()
        # The dead writer held no lock: the upload is free at once, at the recorded offset.
        head = await http.head(two + upload_id, headers=TUS)
        assert head.headers["Upload-Offset"] == "500000"
        resp = await http.patch(
            two + upload_id, headers={**OCTETS, "Upload-Offset": "500000"}, content=data[500_000:]
        )
        assert resp.status_code == 204, resp.text
    final = tmp_path / upload_id
    assert await asyncio.to_thread(final.read_bytes) == data
    assert leftovers(tmp_path, upload_id) == []  # the dead writer's segment too


# -- 3 processes, PATCHes rotating among them and cut at random points ------------------


async def raw_patch_headers(
    port: int, upload_id: str, offset: int, length: int
) -> tuple[socket.socket, bytes]:
    """Send a PATCH's headers with ``Expect: 100-continue``; the socket and the first reply.

    A ``100 Continue`` means prepare() returned.
    No lock is taken: the body will go to a segment file of its own.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(
        sock,
        (
            f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n"
        ).encode(),
    )
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
        assert chunk, reply
        reply += chunk
    return sock, reply


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


async def test_patches_rotating_on_three_processes_cut_at_30_points(tmp_path: Path) -> None:
    """Every cut leaves HEAD's offset == the bytes on disk (sha256 of the prefix checked),
    and a PATCH that stored bytes cost one Redis round trip (one that stored none, none)."""
    rng = random.Random(18)
    data = rng.randbytes(3 * 1024 * 1024)
    cuts = sorted(rng.sample(range(1, len(data)), 30))
    prefix = f"test-upload-mp-{secrets.token_hex(4)}:"
    loop = asyncio.get_running_loop()
    checked = heads = moved = 0
    last = 0
    async with servers(tmp_path, prefix, count=3) as urls, httpx.AsyncClient() as http:
        resp = await http.post(urls[0], headers={**TUS, "Upload-Length": str(len(data))})
        assert resp.status_code == 201
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        partial = tmp_path / f"{upload_id}.part"
        for request, cut in enumerate([*cuts, None]):
            # A tus client's loop: HEAD on one process, PATCH on the next.
            head = await http.head(urls[request % 3] + upload_id, headers=TUS)
            heads += 1
            assert head.status_code == 200
            offset = int(head.headers["Upload-Offset"])
            moved += offset != last
            last = offset
            patch_url = urls[(request + 1) % 3]
            sock, reply = await raw_patch_headers(
                port_of(patch_url), upload_id, offset, len(data) - offset
            )
            try:
                assert reply.startswith(b"HTTP/1.1 100"), reply
                # Every earlier request settled: the offset HEAD (on a third process)
                # reports is what the part file holds, and those bytes are the client's.
                check = await http.head(urls[(request + 2) % 3] + upload_id, headers=TUS)
                heads += 1
                assert int(check.headers["Upload-Offset"]) == offset
                on_disk = await asyncio.to_thread(partial.read_bytes)
                assert len(on_disk) == offset
                assert hashlib.sha256(on_disk).digest() == hashlib.sha256(data[:offset]).digest()
                checked += 1
                if cut is None:
                    await loop.sock_sendall(sock, data[offset:])
                    reply = b""
                    while b"\r\n\r\n" not in reply:
                        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
                        assert chunk, reply
                        reply += chunk
                    assert reply.startswith(b"HTTP/1.1 204"), reply
                    moved += 1
                    break
                await loop.sock_sendall(sock, data[offset : max(cut, offset)])
                if checked % 2:  # half the cuts are a reset, half a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.close()
            # The cut request commits what it stored (as a tus server keeps a cut body).
            await settle(http, patch_url)
        head = await http.head(urls[0] + upload_id, headers=TUS)
        heads += 1
        assert head.headers["Upload-Offset"] == str(len(data))
        trips = sum([await settle(http, url) for url in urls])
    assert checked == 31
    assert moved > 15  # most cuts stored bytes
    # Creation, the HEADs, and one commit per PATCH that stored bytes: nothing else.
    assert trips == 1 + heads + moved
    final = await asyncio.to_thread((tmp_path / upload_id).read_bytes)
    assert hashlib.sha256(final).digest() == hashlib.sha256(data).digest()
    assert leftovers(tmp_path, upload_id) == []


async def test_patches_rotating_on_three_processes_cost_one_round_trip_each(
    tmp_path: Path,
) -> None:
    """12 PATCHes, each on the next process: 12 round trips (and one for the creation)."""
    data = os.urandom(3 * 1024 * 1024)
    step = len(data) // 12
    prefix = f"test-upload-mp-{secrets.token_hex(4)}:"
    async with servers(tmp_path, prefix, count=3) as urls, httpx.AsyncClient() as http:
        resp = await http.post(urls[0], headers={**TUS, "Upload-Length": str(len(data))})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        for n, offset in enumerate(range(0, len(data), step)):
            resp = await http.patch(
                urls[n % 3] + upload_id,
                headers={**OCTETS, "Upload-Offset": str(offset)},
                content=data[offset : offset + step],
            )
            assert resp.status_code == 204, resp.text
        trips = [await settle(http, url) for url in urls]
    assert sum(trips) == 1 + 12
    assert trips == [1 + 4, 4, 4]
    final = await asyncio.to_thread((tmp_path / upload_id).read_bytes)
    assert final == data
    assert leftovers(tmp_path, upload_id) == []


async def test_two_processes_racing_at_one_offset_exactly_one_proceeds(tmp_path: Path) -> None:
    prefix = f"test-upload-mp-{secrets.token_hex(4)}:"
    size = 2 * 1024 * 1024
    bodies = [b"a" * size, b"b" * size]
    async with servers(tmp_path, prefix, count=2) as urls, httpx.AsyncClient() as http:
        resp = await http.post(urls[0], headers={**TUS, "Upload-Length": str(size)})
        upload_id = resp.headers["Location"].rsplit("/", 1)[1]
        answers = await asyncio.gather(
            *(
                http.patch(url + upload_id, headers={**OCTETS, "Upload-Offset": "0"}, content=body)
                for url, body in zip(urls, bodies, strict=True)
            )
        )
        statuses = [answer.status_code for answer in answers]
        # Both write a segment; the first to commit wins, the other is told the
        # offset moved (409); never two writers' bytes in the file.
        assert sorted(statuses) == [204, 409], statuses
        winner = statuses.index(204)
        loser = answers[1 - winner]
        assert loser.headers["Upload-Offset"] == str(size)
        trips = [await settle(http, url) for url in urls]
    final = await asyncio.to_thread((tmp_path / upload_id).read_bytes)
    assert final == bodies[winner]
    # Creation, and one commit each (the loser's refused); a loser that arrives only
    # after the upload was finished is answered by the locked path (two).
    assert sum(trips) in (1 + 2, 1 + 1 + 2)
    assert leftovers(tmp_path, upload_id) == []  # exactly one segment was committed


# -- WebSocket uploads: a resume on another process takes the upload over ----------------


async def test_websocket_resume_on_another_process_closes_the_older_with_4409(
    tmp_path: Path,
) -> None:
    data = os.urandom(600_000)
    prefix = f"test-upload-mp-{secrets.token_hex(4)}:"
    async with servers(tmp_path, prefix) as (one, two):
        ws_one, ws_two = (
            url.replace("http://", "ws://").replace("/files/", "/ws") for url in (one, two)
        )
        async with websockets.connect(ws_one) as older, websockets.connect(ws_two) as newer:
            await older.send(json.dumps({"type": "start", "size": len(data)}))
            ready = json.loads(await asyncio.wait_for(older.recv(), scaled(10)))
            upload_id = ready["id"]
            await older.send(encode_chunk(0, data[:200_000]))
            ack = json.loads(await asyncio.wait_for(older.recv(), scaled(10)))
            assert ack == {"type": "ack", "offset": 200_000}
            # The older connection is still open on process one (a half-open phone
            # connection, say): the client resumes on process two.
            await newer.send(json.dumps({"type": "resume", "id": upload_id}))
            ready = json.loads(await asyncio.wait_for(newer.recv(), scaled(15)))
            assert ready["type"] == "ready" and ready["offset"] == 200_000
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(older.recv(), scaled(10))
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == CloseCode.UPLOAD_CONFLICT
            assert closed.value.rcvd.reason == "upload resumed on another connection"
            await newer.send(encode_chunk(200_000, data[200_000:]))
            ack = json.loads(await asyncio.wait_for(newer.recv(), scaled(10)))
            assert ack == {"type": "ack", "offset": len(data)}
            complete = json.loads(await asyncio.wait_for(newer.recv(), scaled(10)))
            assert complete["type"] == "complete"
            assert complete["sha256"] == hashlib.sha256(data).hexdigest()
    final = tmp_path / upload_id
    assert await asyncio.to_thread(final.read_bytes) == data


if __name__ == "__main__":
    main()
