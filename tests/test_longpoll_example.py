"""docs/examples/longpoll_app.py works as the how-to says (own process, real clients)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from tornado_longconn.testing import scaled

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "longpoll_app.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_long_poll_and_sse_share_cursors() -> None:
    port = _free_port()
    env = dict(os.environ, PORT=str(port), PYTHONPATH=str(EXAMPLE.parents[2]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), scaled(20))
        assert b"/poll/lobby" in line
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=scaled(10)) as client:
            first = (await client.get("/poll/lobby", params={"timeout": "0"})).json()
            waiting = asyncio.ensure_future(
                client.get("/poll/lobby", params={"cursor": first["cursor"], "timeout": "20"})
            )
            sent = (await client.post("/send/lobby", content="hello")).json()
            answer = (await waiting).json()
            assert answer["messages"] == [{"cursor": sent["cursor"], "data": "hello"}]
            await client.post("/send/lobby", content="second")
            # an SSE client resumes after the cursor the long-poll gave
            async with aconnect_sse(
                client, "GET", "/events/lobby", headers={"Last-Event-ID": answer["cursor"]}
            ) as es:
                events = es.aiter_sse().__aiter__()
                ready = await asyncio.wait_for(events.__anext__(), scaled(5))
                event = await asyncio.wait_for(events.__anext__(), scaled(5))
                await events.aclose()  # type: ignore[attr-defined]
            assert ready.event == "ready" and event.data == "second"
    finally:
        proc.terminate()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), scaled(10))
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
