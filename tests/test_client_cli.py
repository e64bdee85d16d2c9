"""``python -m tornado_longconn``: each subcommand as a subprocess against a test server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import tornado.web

from tests.helpers import ROOT, read_bytes
from tests.test_client import make_app, publish
from tornado_longconn import BroadcastHub, MemoryBackend, UploadStore, WebSocketUploadHandler
from tornado_longconn.testing import AppServer, scaled

pytestmark = pytest.mark.timeout(120)


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the command line to its end (bounded); its status, stdout and stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tornado_longconn",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), scaled(60))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_tail_from_a_cursor_and_publish(tmp_path: Path) -> None:
    hub = BroadcastHub(MemoryBackend(epoch="cli"), history=100)
    async with AppServer(make_app(hub)) as server:
        for n in range(3):
            await publish(hub, "room:1", {"n": n})
        url = server.ws_url("/ws")
        status, out, err = await run_cli("tail", url, "room:1", "--cursor", "cli-1", "--count", "2")
        assert status == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines == [
            {"topic": "room:1", "cursor": "cli-2", "data": {"n": 1}},
            {"topic": "room:1", "cursor": "cli-3", "data": {"n": 2}},
        ]
        status, out, err = await run_cli("publish", url, "room:1", '{"n": 3}')
        assert status == 0, err
        assert json.loads(out) == {"topic": "room:1", "cursor": "cli-4"}
        # A resync is a line of its own: this cursor is from another epoch.
        status, out, err = await run_cli("tail", url, "room:1", "--cursor", "old-9", "--count", "1")
        assert status == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0] == {
            "type": "resync",
            "topic": "room:1",
            "cursor": "cli-0",
            "reason": "epoch",
        }
        assert lines[1]["cursor"] == "cli-1"
        status, out, err = await run_cli("publish", url, "ro:1", "x")
        assert status == 1 and "forbidden" in err
    await hub.close(spread=0)


async def test_upload_with_progress(tmp_path: Path) -> None:
    store = UploadStore(str(tmp_path / "store"), max_size=1 << 24)
    source = tmp_path / "file.bin"
    data = os.urandom(100_000)
    source.write_bytes(data)
    options = {"store": store, "chunk_size": 16 * 1024}
    app = tornado.web.Application([(r"/up", WebSocketUploadHandler, options)])
    async with AppServer(app) as server:
        status, out, err = await run_cli("upload", server.ws_url("/up"), str(source))
    assert status == 0, err
    result = json.loads(out)
    assert result["size"] == len(data)
    assert "100000/100000 bytes (100.0%)" in err
    assert read_bytes(store.final_path(result["id"])) == data


async def test_metrics() -> None:
    pytest.importorskip("prometheus_client")
    from tornado_longconn.metrics import LongConnCollector, MetricsHandler

    hub = BroadcastHub()
    hub.group("room")
    collector = LongConnCollector(hubs=[hub])
    app = tornado.web.Application(
        [(r"/metrics", MetricsHandler, {"collector": collector, "registry": None})]
    )
    async with AppServer(app) as server:
        status, out, err = await run_cli("metrics", server.url("/metrics"))
        assert status == 0, err
        assert "longconn_" in out
        status, out, err = await run_cli("metrics", server.url("/nothing"))
        assert status == 1 and "HTTP 404" in err
    await hub.close(spread=0)
