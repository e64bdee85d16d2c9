"""Hooks of the tus handler: overridden methods and a TusHooks object, sync and async."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Awaitable, Mapping
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from tornado.httputil import HTTPServerRequest
from tusclient import client as tus_client

from tests.helpers import exists
from tests.helpers import read_bytes as read
from tests.test_upload_tus import OCTETS, TUS, Probe, create, serve
from tornado_longconn.exceptions import UploadError
from tornado_longconn.upload import UploadStore
from tornado_longconn.upload_hooks import TusHooks, UploadInfo


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "uploads", max_size=1 << 22, chunk_size=64 * 1024)


class Recorder(TusHooks):
    """Records every hook; async and sync methods mixed on purpose."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, UploadInfo]] = []

    async def pre_create(
        self, info: UploadInfo, request: HTTPServerRequest
    ) -> Mapping[str, str] | None:
        self.calls.append(("pre_create", info))
        await asyncio.sleep(0)
        if info.metadata.get("filename") == "forbidden.exe":
            raise UploadError("executables are not accepted", status=415)
        if "filename" not in info.metadata:
            return None
        return {**info.metadata, "owner": request.headers.get("X-User", "anonymous")}

    def post_create(self, info: UploadInfo, request: HTTPServerRequest) -> None:
        self.calls.append(("post_create", info))

    async def post_receive(self, info: UploadInfo, request: HTTPServerRequest) -> None:
        self.calls.append(("post_receive", info))

    def pre_finish(self, info: UploadInfo, request: HTTPServerRequest) -> None:
        self.calls.append(("pre_finish", info))
        if read(info.path).startswith(b"MZ"):
            raise UploadError("content refused", status=422)

    async def post_finish(self, info: UploadInfo, request: HTTPServerRequest) -> None:
        self.calls.append(("post_finish", info))

    def post_terminate(self, info: UploadInfo, request: HTTPServerRequest) -> None:
        self.calls.append(("post_terminate", info))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


async def test_hooks_object_sees_every_step_with_tuspy(store: UploadStore) -> None:
    hooks = Recorder()
    data = os.urandom(300_000)
    async with serve(store, hooks=hooks) as (server, _):

        def upload() -> str:
            client = tus_client.TusClient(server.url("/files/"), headers={"X-User": "ann"})
            uploader = client.uploader(
                file_stream=io.BytesIO(data), chunk_size=100_000, metadata={"filename": "a.bin"}
            )
            uploader.upload()
            return str(uploader.url)

        url = await asyncio.to_thread(upload)
        upload_id = url.rsplit("/", 1)[1]
        async with httpx.AsyncClient() as http:
            assert (await http.delete(url, headers=TUS)).status_code == 204
    assert hooks.names() == [
        "pre_create",
        "post_create",
        "post_receive",
        "post_receive",
        "post_receive",
        "pre_finish",
        "post_finish",
        "post_terminate",
    ]
    by_name = dict(hooks.calls)
    assert by_name["pre_create"].id == "" and by_name["pre_create"].size == len(data)
    assert by_name["post_create"].id == upload_id
    # pre_create rewrote the metadata: the upload keeps the new one.
    assert by_name["post_create"].metadata == {"filename": "a.bin", "owner": "ann"}
    offsets = [info.offset for name, info in hooks.calls if name == "post_receive"]
    assert offsets == [100_000, 200_000, 300_000]
    assert not by_name["pre_finish"].complete and by_name["pre_finish"].path.endswith(".part")
    finished = by_name["post_finish"]
    assert finished.complete and finished.sha256 == hashlib.sha256(data).hexdigest()
    assert by_name["post_terminate"].id == upload_id
    assert store.stats().hook_rejections == 0


async def test_pre_create_rejects_with_its_status(store: UploadStore) -> None:
    hooks = Recorder()
    async with serve(store, hooks=hooks) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(
            server.url("/files/"),
            headers={
                **OCTETS,
                "Upload-Length": "4",
                "Upload-Metadata": "filename Zm9yYmlkZGVuLmV4ZQ==",
            },
            content=b"abcd",
        )
        assert resp.status_code == 415
        assert "executables are not accepted" in resp.text
    assert hooks.names() == ["pre_create"]
    assert store.stats().created == 0 and store.stats().hook_rejections == 1
    assert dict(store.stats().refused) == {"415": 1}


async def test_pre_finish_rejection_removes_the_upload(store: UploadStore) -> None:
    hooks = Recorder()
    async with serve(store, hooks=hooks) as (server, _), httpx.AsyncClient() as http:
        url = await create(http, server, 4)
        upload_id = url.rsplit("/", 1)[1]
        resp = await http.patch(
            url, headers={**OCTETS, "Upload-Offset": "0"}, content=b"MZ\x90\x00"
        )
        assert resp.status_code == 422
        assert (await http.head(url, headers=TUS)).status_code == 404
        # Another upload is not affected.
        other = await create(http, server, 2)
        resp = await http.patch(other, headers={**OCTETS, "Upload-Offset": "0"}, content=b"ok")
        assert resp.status_code == 204
    assert not exists(store.partial_path(upload_id)) and not exists(store.final_path(upload_id))
    assert store.stats().hook_rejections == 1
    assert hooks.names()[-2:] == ["pre_finish", "post_finish"]


class Overriding(Probe):
    """Hooks as overridden handler methods (Tornado style), one of them failing."""

    seen: list[str] = []

    def pre_create(self, info: UploadInfo) -> Mapping[str, str] | None:
        if self.request.headers.get("Authorization") != "Bearer good":
            raise UploadError("sign in first", status=401)
        return {"filename": "renamed.txt"}

    async def post_finish(self, info: UploadInfo) -> None:
        self.seen.append(info.metadata["filename"])
        raise RuntimeError("a post hook that fails does not change the answer")

    def post_receive(self, info: UploadInfo) -> Awaitable[None] | None:
        self.seen.append(f"offset {info.offset}")
        return None


async def test_overridden_methods_are_hooks(store: UploadStore) -> None:
    Overriding.seen = []
    async with serve(store, Overriding) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(server.url("/files/"), headers={**TUS, "Upload-Length": "2"})
        assert resp.status_code == 401
        resp = await http.post(
            server.url("/files/"),
            headers={**OCTETS, "Upload-Length": "2", "Authorization": "Bearer good"},
            content=b"hi",
        )
        assert resp.status_code == 201
        url = urljoin(server.url("/files/"), resp.headers["Location"])
        upload_id = url.rsplit("/", 1)[1]
    assert Overriding.seen == ["offset 2", "renamed.txt"]
    assert read(store.final_path(upload_id)) == b"hi"
    stats = store.stats()
    assert (stats.hook_rejections, stats.hook_errors, stats.completed) == (1, 1, 1)


async def test_hooks_of_a_concatenation(store: UploadStore) -> None:
    hooks = Recorder()
    async with serve(store, hooks=hooks) as (server, _), httpx.AsyncClient() as http:
        resp = await http.post(
            server.url("/files/"),
            headers={**OCTETS, "Upload-Length": "3", "Upload-Concat": "partial"},
            content=b"abc",
        )
        part = urljoin(server.url("/files/"), resp.headers["Location"])
        hooks.calls.clear()
        resp = await http.post(
            server.url("/files/"), headers={**TUS, "Upload-Concat": f"final;{part}"}
        )
        assert resp.status_code == 201
    assert hooks.names() == ["pre_create", "post_create", "post_finish"]
    pre = hooks.calls[0][1]
    assert (pre.concat, pre.size, pre.parts) == ("final", 3, (part.rsplit("/", 1)[1],))
    assert hooks.calls[2][1].complete


async def test_progress_interval_reports_while_the_body_arrives(store: UploadStore) -> None:
    hooks = Recorder()
    data = os.urandom(1 << 20)
    async with (
        serve(store, hooks=hooks, progress_interval=0.0) as (server, _),
        httpx.AsyncClient() as http,
    ):
        url = await create(http, server, len(data))
        resp = await http.patch(url, headers={**OCTETS, "Upload-Offset": "0"}, content=data)
        assert resp.status_code == 204
        await store.drain_tasks()
    offsets = [info.offset for name, info in hooks.calls if name == "post_receive"]
    assert offsets[-1] == len(data)
    assert len(offsets) > 2  # reports before the body was complete
    assert offsets == sorted(set(offsets))  # each one further, none twice
    assert hooks.names()[-2:] == ["pre_finish", "post_finish"]
