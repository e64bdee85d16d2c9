"""Uppy (npm ``uppy``'s bundled dist) in headless Chromium uploads to tus from another origin.

The page is served on one port, the tus endpoint on another (two origins): with the
upload handler's ``cors_origins`` naming the page's origin the upload works and its
sha256 matches; without it the browser refuses the cross-origin requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.web

from tests.helpers import chromium, needs_chromium
from tests.helpers import read_bytes as read
from tornado_longconn.testing import AppServer, scaled
from tornado_longconn.upload import ChunkedUploadSink, UploadStore
from tornado_longconn.upload_tus import TusUploadHandler

pytestmark = [pytest.mark.browser, pytest.mark.slow, needs_chromium, pytest.mark.timeout(120)]

UPPY = Path(__file__).resolve().parent.parent / "node_modules" / "uppy" / "dist" / "uppy.min.js"
SIZE = 1_500_003

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><script src="/uppy.min.js"></script></head>
<body></body></html>
"""

# The page's side: a file of SIZE deterministic bytes, uploaded by Uppy's Tus plugin.
UPLOAD = """
async ([endpoint, size]) => {
  const data = new Uint8Array(size);
  for (let i = 0; i < size; i++) data[i] = (i * 31 + (i >> 10)) & 0xff;
  const uppy = new Uppy.Uppy({ autoProceed: false });
  uppy.use(Uppy.Tus, { endpoint, chunkSize: 256 * 1024, retryDelays: [] });
  uppy.addFile({ name: "cross-origin.bin", type: "application/octet-stream",
                 data: new Blob([data]) });
  const result = await uppy.upload();
  return {
    ok: result.successful.map((f) => f.response.uploadURL),
    failed: result.failed.map((f) => String(f.error)),
  };
}
"""


def expected() -> bytes:
    return bytes((i * 31 + (i >> 10)) & 0xFF for i in range(SIZE))


class Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE)


class Script(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.finish(UPPY.read_bytes())


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not UPPY.exists():
        pytest.skip("needs npm ci (node_modules/uppy)")
    async with chromium() as b:
        yield b


async def upload_from_other_origin(
    browser: Any, store: UploadStore, cors: bool
) -> tuple[dict[str, list[str]], list[ChunkedUploadSink]]:
    page_app = tornado.web.Application([(r"/", Page), (r"/uppy.min.js", Script)])
    done: list[ChunkedUploadSink] = []
    async with AppServer(page_app) as page_server:
        origin = page_server.url("/").rstrip("/")
        kwargs: dict[str, Any] = {"store": store, "on_complete": done.append}
        if cors:
            kwargs["cors_origins"] = [origin]
        upload_app = tornado.web.Application(TusUploadHandler.routes("/files", **kwargs))
        async with AppServer(upload_app) as upload_server:
            endpoint = upload_server.url("/files/")
            assert endpoint.split("/")[2] != origin.split("/")[2]  # two origins
            context = await browser.new_context()
            try:
                page = await context.new_page()
                page.set_default_timeout(scaled(30) * 1000)
                await page.goto(page_server.url("/"))
                result: dict[str, list[str]] = await page.evaluate(UPLOAD, [endpoint, SIZE])
            finally:
                await context.close()
    await store.drain_tasks()
    return result, done


async def test_uppy_uploads_from_another_origin_with_cors_origins(
    browser: Any, tmp_path: Path
) -> None:
    store = UploadStore(tmp_path / "uploads", max_size=1 << 22, chunk_size=64 * 1024)
    result, done = await upload_from_other_origin(browser, store, cors=True)
    assert result["failed"] == [] and len(result["ok"]) == 1
    upload_id = result["ok"][0].rsplit("/", 1)[1]
    assert [sink.id for sink in done] == [upload_id]
    assert done[0].metadata["filename"] == "cross-origin.bin"
    data = read(store.final_path(upload_id))
    assert hashlib.sha256(data).digest() == hashlib.sha256(expected()).digest()
    store.close()


async def test_without_cors_origins_the_browser_refuses(browser: Any, tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads", max_size=1 << 22, chunk_size=64 * 1024)
    result, done = await upload_from_other_origin(browser, store, cors=False)
    assert result["ok"] == [] and len(result["failed"]) == 1
    assert done == []
    store.close()
