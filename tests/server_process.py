"""A test server in a process of its own: the child's side and the test's side.

A server script of the multi-process tests (``tests/caps_server.py``,
``tests/multiprocess_server.py``, ``tests/backends/faultapp.py``, the
``--serve`` mode of ``tests/test_presence_multiprocess.py``) serves with
:func:`serve_until_signal`: it prints ``READY <port>`` once it listens and
returns at SIGTERM or SIGINT. The test runs it with :class:`ServerProcess`:
start it, wait for that line, stop it with a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from tornado_longconn.testing import scaled

__all__ = ["ServerProcess", "serve_until_signal"]

#: The repository's root (the children's ``PYTHONPATH``, so they import ``tests.*``).
ROOT = Path(__file__).resolve().parent.parent


# -- the child's side ------------------------------------------------------------------


async def serve_until_signal(
    app: tornado.web.Application,
    sockets: list[socket.socket] | None = None,
    **server_options: Any,
) -> tornado.httpserver.HTTPServer:
    """Serve ``app`` until SIGTERM or SIGINT; return the server, no longer listening.

    ``sockets``: where to listen (default: a free port of 127.0.0.1);
    ``server_options`` go to :class:`~tornado.httpserver.HTTPServer` (e.g.
    ``xheaders=True``). Prints ``READY <port>`` on stdout once it listens, in
    one ``write(2)`` (forked processes that share the pipe print whole lines).
    The caller then closes its parts and calls ``server.close_all_connections()``.
    """
    if sockets is None:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server = tornado.httpserver.HTTPServer(app, **server_options)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    os.write(sys.stdout.fileno(), f"READY {sockets[0].getsockname()[1]}\n".encode())
    await stop.wait()
    server.stop()
    return server


# -- the test's side -------------------------------------------------------------------


class ServerProcess:
    """``python <script> <args>`` in a session of its own, started once it printed ``READY``.

    ``processes``: how many ``READY <n>`` lines :meth:`start` waits for (a
    script that forks prints one per process); ``port``: where the script was
    told to listen (default: the number of the last ``READY`` line);
    ``uvloop``: the script takes ``--uvloop``, given when the suite runs on
    uvloop (``LONGCONN_EVENT_LOOP``); ``env``: more environment variables
    (``PYTHONPATH`` is the repository).
    """

    def __init__(
        self,
        script: str | Path,
        *args: str,
        processes: int = 1,
        port: int | None = None,
        uvloop: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.script = Path(script)
        self.args = list(args)
        if uvloop and os.environ.get("LONGCONN_EVENT_LOOP") == "uvloop":
            self.args.append("--uvloop")
        self.processes = processes
        self.port = port or 0
        self._fixed_port = port is not None
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.proc: asyncio.subprocess.Process | None = None
        #: The numbers of the ``READY`` lines read so far.
        self.announced: list[int] = []

    def url(self, path: str) -> str:
        """``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        """``ws://127.0.0.1:<port><path>``."""
        return f"ws://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        """Start the script; return once every process printed ``READY`` (bounded).

        Raises ``RuntimeError`` (the process stopped) when a line is not
        ``READY <n>`` or the output ends first.
        """
        self.announced = []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(self.script),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        try:
            for _ in range(self.processes):
                await self.ready()
        except BaseException:
            await self.stop(signal.SIGKILL)
            raise

    async def ready(self) -> int:
        """Read the next ``READY <n>`` line (bounded); return ``n``."""
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), scaled(20))
        if not line.startswith(b"READY "):
            raise RuntimeError(f"{self.script.name} did not start: {line!r}")
        number = int(line.split()[1])
        self.announced.append(number)
        if not self._fixed_port:
            self.port = number
        return number

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to every process of the script; SIGKILL what still runs after 10 s.

        Returns once the script's processes ended and their output was read to
        the end. Does nothing when not running.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), scaled(10))
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # no forked child outlives the test
        if proc.stdout is not None:
            # EOF once every process (forked children share the pipe) has ended.
            await asyncio.wait_for(proc.stdout.read(), scaled(10))
