"""The Python upload helper against a real WebSocket upload server (resume after a cut)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import tornado.web

from tests.helpers import read_bytes
from tests.test_client import Proxy
from tornado_longconn import UploadStore, WebSocketUploadHandler
from tornado_longconn.client import ClientError
from tornado_longconn.client_upload import upload
from tornado_longconn.testing import AppServer

pytestmark = pytest.mark.timeout(90)


def make_app(store: UploadStore) -> tornado.web.Application:
    options = {"store": store, "window": 4, "chunk_size": 16 * 1024}
    return tornado.web.Application([(r"/up", WebSocketUploadHandler, options)])


async def test_upload_resumes_after_a_network_cut(tmp_path: Path) -> None:
    store = UploadStore(str(tmp_path / "store"), max_size=1 << 24)
    data = os.urandom(300 * 1024)
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    progress: list[int] = []
    ids: list[str] = []
    async with AppServer(make_app(store)) as server, Proxy(server.port) as proxy:

        def on_progress(stored: int, total: int) -> None:
            assert total == len(data)
            progress.append(stored)
            if len(progress) == 5:
                proxy.cut()  # mid-upload: the next attempt resumes

        result = await upload(
            proxy.ws_url("/up"),
            str(source),
            on_progress=on_progress,
            on_ready=ids.append,
            backoff_base=0.01,
        )
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert ids == [result.id]
    assert progress[-1] == len(data)
    assert progress == sorted(progress)  # never back: stored bytes are not sent again
    assert read_bytes(store.final_path(result.id)) == data


async def test_upload_refused_is_not_retried(tmp_path: Path) -> None:
    store = UploadStore(str(tmp_path / "store"), max_size=1024)
    async with AppServer(make_app(store)) as server:
        with pytest.raises(ClientError) as refused:
            await upload(server.ws_url("/up"), b"x" * 4096, name="big")
    assert refused.value.code == "too_large"


async def test_upload_to_a_page_that_is_not_an_upload_endpoint(tmp_path: Path) -> None:
    store = UploadStore(str(tmp_path / "store"))
    async with AppServer(make_app(store)) as server:
        with pytest.raises(ClientError) as refused:
            await upload(server.ws_url("/nothing"), b"abc")
    assert refused.value.code == "unsupported" and refused.value.status == 404
