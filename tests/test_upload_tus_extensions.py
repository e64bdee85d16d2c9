"""tus ``creation-defer-length`` and ``concatenation``: raw HTTP and the real tuspy client."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import shutil
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from tusclient import client as tus_client

from tests.helpers import REDIS_URL, redis_reachable
from tests.helpers import read_bytes as read
from tests.test_upload_tus import OCTETS, TUS, create, serve
from tornado_longconn.testing import scaled
from tornado_longconn.upload import ChunkedUploadSink, UploadStore
from tornado_longconn.upload_state import MemoryUploadState, RedisUploadState, SharedUploadState


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "uploads", max_size=1 << 22, chunk_size=64 * 1024)


def refused(store: UploadStore) -> dict[str, int]:
    return dict(store.stats().refused)


# -- creation-defer-length --------------------------------------------------------------


async def test_deferred_length_is_declared_by_a_later_patch(store: UploadStore) -> None:
    data = os.urandom(150_000)
    done: list[ChunkedUploadSink] = []
    async with serve(store, on_complete=done.append) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(server.url("/files/"), headers={**TUS, "Upload-Defer-Length": "1"})
        assert resp.status_code == 201, resp.text
        url = urljoin(server.url("/files/"), resp.headers["Location"])
        head = await http.head(url, headers=TUS)
        assert head.headers["Upload-Defer-Length"] == "1"
        assert "Upload-Length" not in head.headers
        first = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "0"}, content=data[:100_000]
        )
        assert first.status_code == 204 and first.headers["Upload-Offset"] == "100000"
        assert not done  # the length is unknown: not complete, whatever was received
        last = await http.patch(
            url,
            headers={**OCTETS, "Upload-Offset": "100000", "Upload-Length": str(len(data))},
            content=data[100_000:],
        )
        assert last.status_code == 204 and last.headers["Upload-Offset"] == str(len(data))
        head = await http.head(url, headers=TUS)
        assert head.headers["Upload-Length"] == str(len(data))
        assert "Upload-Defer-Length" not in head.headers
    assert [sink.id for sink in done] == [url.rsplit("/", 1)[1]]
    assert read(done[0].path) == data


async def test_deferred_length_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    first = UploadStore(root)
    async with serve(first) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(server.url("/files/"), headers={**TUS, "Upload-Defer-Length": "1"})
        url = urljoin(server.url("/files/"), resp.headers["Location"])
        upload_id = url.rsplit("/", 1)[1]
        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"abc")
        assert resp.status_code == 204
    second = UploadStore(root)
    async with serve(second) as (server, _), httpx.AsyncClient() as http:
        url = server.url(f"/files/{upload_id}")
        head = await http.head(url, headers=TUS)
        assert head.headers["Upload-Defer-Length"] == "1"
        assert head.headers["Upload-Offset"] == "3"
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "3", "Upload-Length": "5"}, content=b"de"
        )
        assert resp.status_code == 204
    third = UploadStore(root)
    async with serve(third) as (server, _), httpx.AsyncClient() as http:
        head = await http.head(server.url(f"/files/{upload_id}"), headers=TUS)
        assert (head.headers["Upload-Length"], head.headers["Upload-Offset"]) == ("5", "5")
    assert read(third.final_path(upload_id)) == b"abcde"


async def test_deferred_creation_with_upload(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(
            server.url("/files/"), headers={**OCTETS, "Upload-Defer-Length": "1"}, content=b"x" * 10
        )
        assert resp.status_code == 201 and resp.headers["Upload-Offset"] == "10"
        url = urljoin(server.url("/files/"), resp.headers["Location"])
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "10", "Upload-Length": "10"}, content=b""
        )
        assert resp.status_code == 204
    assert read(store.final_path(url.rsplit("/", 1)[1])) == b"x" * 10


async def test_deferred_length_errors(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        base = server.url("/files/")
        for headers in (
            {"Upload-Defer-Length": "2"},
            {"Upload-Defer-Length": "yes"},
            {"Upload-Defer-Length": "1", "Upload-Length": "5"},
        ):
            resp = await http.post(base, headers={**TUS, **headers})
            assert resp.status_code == 400, headers
        assert store.stats().created == 0
        resp = await http.post(base, headers={**TUS, "Upload-Defer-Length": "1"})
        url = urljoin(base, resp.headers["Location"])
        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"abcd")
        assert resp.status_code == 204
        # Below the bytes received: 400; above Tus-Max-Size: 413; body past it: 413.
        for length, status in (("3", 400), (str((1 << 22) + 1), 413), ("5", 413)):
            resp = await http.patch(
                url,
                headers={**OCTETS, "Upload-Offset": "4", "Upload-Length": length},
                content=b"xyz",
            )
            assert resp.status_code == status, length
        head = await http.head(url, headers=TUS)
        assert head.headers["Upload-Defer-Length"] == "1"  # none of them declared it
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "4", "Upload-Length": "8"}, content=b"e"
        )
        assert resp.status_code == 204
        # Once declared the length never changes; repeating it is fine.
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "5", "Upload-Length": "9"}, content=b"f"
        )
        assert resp.status_code == 400
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "5", "Upload-Length": "8"}, content=b"fgh"
        )
        assert resp.status_code == 204
    assert refused(store) == {"400": 5, "413": 2}


# -- concatenation -------------------------------------------------------------------


def tuspy_partial(endpoint: str, data: bytes) -> str:
    """Upload ``data`` as a partial upload with tuspy (extra header on every request)."""
    client = tus_client.TusClient(endpoint, headers={"Upload-Concat": "partial"})
    uploader = client.uploader(file_stream=io.BytesIO(data), chunk_size=50_000)
    uploader.upload()
    return str(uploader.url)


async def test_tuspy_partials_concatenated_by_a_final_upload(store: UploadStore) -> None:
    parts = [os.urandom(120_000), os.urandom(1), os.urandom(70_001)]
    done: list[ChunkedUploadSink] = []
    async with serve(store, on_complete=done.append) as (server, _), httpx.AsyncClient() as http:
        endpoint = server.url("/files/")
        urls = [await asyncio.to_thread(tuspy_partial, endpoint, part) for part in parts]
        assert not done  # partial uploads are not handed to on_complete
        head = await http.head(urls[0], headers=TUS)
        assert head.headers["Upload-Concat"] == "partial"
        # Absolute URLs and paths both name a partial upload.
        concat = "final;" + " ".join([urls[0], "/files/" + urls[1].rsplit("/", 1)[1], urls[2]])
        resp = await http.post(
            endpoint, headers={**TUS, "Upload-Concat": concat, "Upload-Metadata": ""}
        )
        assert resp.status_code == 201, resp.text
        final = urljoin(endpoint, resp.headers["Location"])
        head = await http.head(final, headers=TUS)
        total = str(sum(map(len, parts)))
        assert (head.headers["Upload-Length"], head.headers["Upload-Offset"]) == (total, total)
        ids = [url.rsplit("/", 1)[1] for url in urls]
        assert head.headers["Upload-Concat"] == "final;" + " ".join(f"/files/{i}" for i in ids)
        # A final upload cannot be modified.
        resp = await http.patch(final, headers={**OCTETS, "Upload-Offset": total}, content=b"x")
        assert resp.status_code == 403
        # The parts stay until deleted; the final file is a copy.
        for url in urls:
            assert (await http.delete(url, headers=TUS)).status_code == 204
        head = await http.head(final, headers=TUS)
        assert head.status_code == 200
    final_id = final.rsplit("/", 1)[1]
    assert [sink.id for sink in done] == [final_id]
    assert read(store.final_path(final_id)) == b"".join(parts)
    assert done[0].sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert store.stats().concatenated == 1
    assert refused(store) == {"403": 1}


async def test_concatenation_is_checked_before_anything_is_created(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        base = server.url("/files/")

        async def partial(size: int) -> str:
            url = await create(http, server, size, **{"Upload-Concat": "partial"})
            return url

        done = await partial(3)
        resp = await http.patch(done, headers={**OCTETS, "Upload-Offset": "0"}, content=b"abc")
        assert resp.status_code == 204
        unfinished = await partial(10)
        ordinary = await create(http, server, 0)  # complete, but not a partial upload
        big = await partial(1 << 22)
        resp = await http.patch(big, headers={**OCTETS, "Upload-Offset": "0"}, content=b"")
        created = store.stats().created

        cases = [
            ("partial;x", {}, b"", 400),
            ("final;", {}, b"", 400),
            ("final;/files/not-an-id", {}, b"", 400),
            (f"final;/files/{'0' * 32}", {}, b"", 404),
            (f"final;{done} {unfinished}", {}, b"", 400),
            (f"final;{done} {ordinary}", {}, b"", 400),
            (f"final;{done}", {"Upload-Length": "3"}, b"", 400),
            (f"final;{done}", {"Upload-Defer-Length": "1"}, b"", 400),
            (
                f"final;{done}",
                {"Content-Type": "application/offset+octet-stream"},
                b"body",
                400,
            ),
        ]
        for concat, extra, body, status in cases:
            resp = await http.post(
                base, headers={**TUS, "Upload-Concat": concat, **extra}, content=body
            )
            assert resp.status_code == status, (concat, extra, resp.text)
        assert store.stats().created == created  # nothing was created by any of them
        # An unfinished part, once finished, can be used: nothing was consumed.
        resp = await http.patch(
            unfinished, headers={**OCTETS, "Upload-Offset": "0"}, content=b"0123456789"
        )
        assert resp.status_code == 204
        resp = await http.post(
            base, headers={**TUS, "Upload-Concat": f"final;{done} {unfinished} {done}"}
        )
        assert resp.status_code == 201
        final = urljoin(base, resp.headers["Location"])
    assert read(store.final_path(final.rsplit("/", 1)[1])) == b"abc0123456789abc"
    assert refused(store) == {"400": 8, "404": 1}
    assert store.stats().concatenated == 1


async def test_concatenation_past_the_maximum_is_413(tmp_path: Path) -> None:
    store = UploadStore(tmp_path, max_size=100)
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        urls = []
        for _ in range(2):
            resp = await http.post(
                server.url("/files/"),
                headers={**OCTETS, "Upload-Length": "60", "Upload-Concat": "partial"},
                content=b"z" * 60,
            )
            assert resp.status_code == 201
            urls.append(urljoin(server.url("/files/"), resp.headers["Location"]))
        resp = await http.post(
            server.url("/files/"), headers={**TUS, "Upload-Concat": "final;" + " ".join(urls)}
        )
        assert resp.status_code == 413
    assert store.stats().created == 2


async def test_deferred_partial_upload(store: UploadStore) -> None:
    async with serve(store) as (server, _), httpx.AsyncClient() as http:
        base = server.url("/files/")
        resp = await http.post(
            base, headers={**TUS, "Upload-Defer-Length": "1", "Upload-Concat": "partial"}
        )
        part = urljoin(base, resp.headers["Location"])
        resp = await http.post(base, headers={**TUS, "Upload-Concat": f"final;{part}"})
        assert resp.status_code == 400  # not finished: its length is not even known
        resp = await http.patch(
            part, headers={**OCTETS, "Upload-Offset": "0", "Upload-Length": "2"}, content=b"hi"
        )
        assert resp.status_code == 204
        resp = await http.post(base, headers={**TUS, "Upload-Concat": f"final;{part}"})
        assert resp.status_code == 201
        final = urljoin(base, resp.headers["Location"])
    assert read(store.final_path(final.rsplit("/", 1)[1])) == b"hi"


# -- tus-js-client with parallelUploads (concatenation) under node ----------------------

TUS_JS_SCRIPT = r"""
import { createRequire } from "node:module";
const require = createRequire(process.env.TUS_JS_DIR + "/");
const tus = require("tus-js-client");
const [endpoint, size] = [process.argv[2], Number(process.argv[3])];
const data = Buffer.alloc(size);
for (let i = 0; i < size; i++) data[i] = (i * 7 + (i >> 8)) & 0xff;
const upload = new tus.Upload(data, {
  endpoint,
  parallelUploads: 2,
  chunkSize: 100000,
  retryDelays: [],
  metadata: { filename: "parallel.bin" },
  onSuccess: () => console.log("URL " + upload.url),
  onError: (err) => { console.error(String(err)); process.exit(1); },
});
upload.start();
"""


def tus_js_dir() -> str | None:
    """A directory whose node_modules holds tus-js-client (LONGCONN_TUS_JS_DIR), if any."""
    for candidate in (os.environ.get("LONGCONN_TUS_JS_DIR"), str(Path(__file__).parent.parent)):
        if candidate and (Path(candidate) / "node_modules" / "tus-js-client").is_dir():
            return candidate
    return None


async def test_tus_js_client_parallel_uploads(store: UploadStore, tmp_path: Path) -> None:
    node = shutil.which("node")
    where = tus_js_dir()
    if node is None or where is None:
        pytest.skip("needs node and tus-js-client (npm install tus-js-client; LONGCONN_TUS_JS_DIR)")
    script = tmp_path / "parallel.mjs"
    script.write_text(TUS_JS_SCRIPT)
    size = 450_001
    expected = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(size))
    done: list[ChunkedUploadSink] = []
    async with serve(store, on_complete=done.append) as (server, _):
        proc = await asyncio.create_subprocess_exec(
            node,
            str(script),
            server.url("/files/"),
            str(size),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, TUS_JS_DIR=str(Path(where) / "node_modules")),
        )
        out, err = await asyncio.wait_for(proc.communicate(), scaled(60))
        assert proc.returncode == 0, err.decode()
    url = out.decode().split("URL ", 1)[1].strip()
    final_id = url.rsplit("/", 1)[1]
    assert [sink.id for sink in done] == [final_id]
    assert done[0].concat == "final" and len(done[0].parts) == 2
    assert done[0].metadata["filename"] == "parallel.bin"
    assert read(store.final_path(final_id)) == expected
    assert store.stats().concatenated == 1


# -- tus-js-client: 4 parallel uploads, pause/resume, checksums from a request hook -----

TUS_JS_FULL_SCRIPT = r"""
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
const require = createRequire(process.env.TUS_JS_DIR + "/");
const tus = require("tus-js-client");
const [endpoint, size] = [process.argv[2], Number(process.argv[3])];
const data = Buffer.alloc(size);
for (let i = 0; i < size; i++) data[i] = (i * 13 + (i >> 9)) & 0xff;
let corrupted = false;    // the first PATCH carries a wrong digest: 460, then resume
let paused = false;       // abort once past 40%, then start again
const statuses = [];
const seen = new Set();
const upload = new tus.Upload(data, {
  endpoint,
  parallelUploads: 4,
  chunkSize: 64 * 1024,
  retryDelays: [20, 50, 100, 200, 400, 800],
  metadata: { filename: "four.bin" },
  onBeforeRequest(req) {
    if (req.getMethod() !== "PATCH") return;
    const send = req.send.bind(req);
    req.send = (body) => {
      const digest = createHash("sha1").update(body).digest();
      seen.add(req.getURL());
      // Once the 4 partial uploads exist (their URLs seen), so that resuming needs
      // no new creation.
      if (!corrupted && seen.size === 4 && body.length > 0) {
        corrupted = true;
        digest[0] ^= 0xff;
      }
      req.setHeader("Upload-Checksum", "sha1 " + digest.toString("base64"));
      return send(body);
    };
  },
  onAfterResponse(req, res) {
    if (req.getMethod() === "PATCH") statuses.push(res.getStatus());
  },
  onProgress(sent, total) {
    if (corrupted && !paused && sent > total * 0.4) {
      paused = true;
      upload.abort().then(() => upload.start());
    }
  },
  onSuccess() {
    console.log("STATUSES " + JSON.stringify(statuses));
    console.log("URL " + upload.url);
  },
  onError(err) {
    // (tus-js-client 4 does not report errors of a parallel upload resumed after
    // abort(): the refused chunk comes first.)
    if (String(err).includes("460") && statuses.filter((s) => s === 460).length === 1) {
      upload.abort().then(() => upload.start());  // resume after the refused chunk
      return;
    }
    console.error(String(err));
    process.exit(1);
  },
});
upload.start();
"""


@pytest.mark.parametrize("shared", [None, "memory", "redis"])
async def test_tus_js_client_four_parallel_uploads_paused_resumed_checksummed(
    tmp_path: Path, shared: str | None
) -> None:
    """Also on shared state, where each PATCH appends through a segment and a commit."""
    node = shutil.which("node")
    where = tus_js_dir()
    if node is None or where is None:
        pytest.skip("needs node and tus-js-client (npm install tus-js-client; LONGCONN_TUS_JS_DIR)")
    state: SharedUploadState | None = None
    if shared == "memory":
        state = MemoryUploadState()
    elif shared == "redis":
        if not await redis_reachable():
            pytest.skip("needs Redis")
        state = RedisUploadState(REDIS_URL, prefix=f"test-tus-js-{secrets.token_hex(4)}:")
    try:
        await _four_parallel_uploads(tmp_path, node, where, state)
    finally:
        if isinstance(state, RedisUploadState):
            keys = [key async for key in state._client.scan_iter(state.prefix + "*")]
            if keys:
                await state._client.delete(*keys)
            await state.close()


async def _four_parallel_uploads(
    tmp_path: Path, node: str, where: str, state: SharedUploadState | None
) -> None:
    store = UploadStore(tmp_path / "uploads", max_size=1 << 23, chunk_size=64 * 1024, shared=state)
    script = tmp_path / "four.mjs"
    script.write_text(TUS_JS_FULL_SCRIPT)
    size = 2 * 1024 * 1024 + 17
    expected = bytes((i * 13 + (i >> 9)) & 0xFF for i in range(size))
    done: list[ChunkedUploadSink] = []
    async with serve(store, on_complete=done.append) as (server, _):
        proc = await asyncio.create_subprocess_exec(
            node,
            str(script),
            server.url("/files/"),
            str(size),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, TUS_JS_DIR=str(Path(where) / "node_modules")),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), scaled(60))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
    lines = dict(line.split(" ", 1) for line in out.decode().splitlines() if " " in line)
    assert "STATUSES" in lines, (out.decode(), err.decode())
    statuses = json.loads(lines["STATUSES"])
    final_id = lines["URL"].strip().rsplit("/", 1)[1]
    assert [sink.id for sink in done] == [final_id]
    assert done[0].concat == "final" and len(done[0].parts) == 4
    result = read(store.final_path(final_id))
    assert hashlib.sha256(result).digest() == hashlib.sha256(expected).digest()
    stats = store.stats()
    # The wrong digest was refused (and that chunk cut off: the sha256 above); both
    # resumptions went on with the same 4 partial uploads (5 created, with the final).
    assert statuses.count(460) == 1 and stats.checksum_mismatches == 1
    assert dict(stats.refused).get("460") == 1
    assert stats.created == 5 and stats.concatenated == 1
    assert not [name for name in os.listdir(tmp_path / "uploads") if name.endswith(".seg")]
