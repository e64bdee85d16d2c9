"""The runnable examples under docs/examples/ work as the docs say.

Each example is started as its own process, on a free port, and driven with the
``websockets`` library as an independent client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets

from tornado_longconn.testing import scaled

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def run_example(name: str, port: int) -> AsyncIterator[str]:
    """Run ``docs/examples/<name>`` with ``PORT=port``; yield its first output line."""
    env = dict(os.environ, PORT=str(port), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), scaled(20))
        if not line:
            rest = await asyncio.wait_for(proc.stdout.read(), scaled(5))
            pytest.fail(f"{name} exited before it listened:\n{rest.decode(errors='replace')}")
        yield line.decode().strip()
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.communicate(), scaled(10))
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_quickstart_broadcasts_to_every_member() -> None:
    port = free_port()
    async with run_example("quickstart.py", port) as banner:
        assert f"ws://localhost:{port}/chat" in banner
        url = f"ws://127.0.0.1:{port}/chat"
        async with websockets.connect(url) as alice:
            # alice's own message coming back proves she is a member of the room.
            await alice.send("alice here")
            assert await asyncio.wait_for(alice.recv(), scaled(5)) == "alice here"
            async with websockets.connect(url) as bob:
                await bob.send("hello from bob")
                assert await asyncio.wait_for(bob.recv(), scaled(5)) == "hello from bob"
                assert await asyncio.wait_for(alice.recv(), scaled(5)) == "hello from bob"
                await alice.send(b"\x00\x01binary")
                assert await asyncio.wait_for(bob.recv(), scaled(5)) == b"\x00\x01binary"
                assert await asyncio.wait_for(alice.recv(), scaled(5)) == b"\x00\x01binary"
