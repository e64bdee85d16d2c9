"""A private ``redis-server`` for tests that stop, restart or break Redis.

It runs without persistence (``--save "" --appendonly no``) in a temporary
directory on a free port of 127.0.0.1, so a restart loses every key, as a
production Redis without persistence would. Readiness is read from the
server's own log line, not polled. :meth:`RedisProcess.stop` always kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

from tests.helpers import free_port
from tornado_longconn.testing import scaled

__all__ = ["REDIS_SERVER", "RedisProcess"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisProcess:
    """``redis-server`` on a free port; ``await start()``, ``await stop()``, ``await restart()``."""

    def __init__(self, *extra_args: str) -> None:
        self.port = free_port()
        self.extra_args = extra_args
        self._dir = tempfile.TemporaryDirectory(prefix="longconn-redis-")
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the server and wait (bounded) until it accepts connections."""
        args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(Path(self._dir.name)), "--logfile", "", *self.extra_args,
        ]  # fmt: skip
        proc = self._proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert proc.stdout is not None

        async def ready() -> None:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                if b"Ready to accept connections" in line:
                    return
            raise RuntimeError(f"redis-server on port {self.port} exited before it was ready")

        try:
            await asyncio.wait_for(ready(), scaled(10))
        except BaseException:
            await self.stop()
            raise
        self._drain = asyncio.create_task(self._drain_output(proc))

    @staticmethod
    async def _drain_output(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while await proc.stdout.readline():
            pass

    async def stop(self) -> None:
        """Kill the server (SIGKILL: no chance to save anything) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
        drain, self._drain = self._drain, None
        if drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    async def restart(self) -> None:
        """Kill and start again on the same port, with an empty dataset."""
        await self.stop()
        await self.start()

    async def close(self) -> None:
        """Stop the server and delete its directory."""
        await self.stop()
        self._dir.cleanup()
