"""Helpers shared by the test files: one copy of each, imported as ``tests.helpers``.

* :func:`free_port` -- a free TCP port of 127.0.0.1 (for a child process to bind);
  :func:`wait_listening` -- wait until a port accepts connections.
* :func:`wait_until` -- wait for a condition: on an :class:`asyncio.Event` that is
  set when it may have changed, or, where nothing can be awaited, by a bounded
  deadline poll.
* :func:`run_on_suite_loop` -- run a coroutine on a fresh loop of the suite's kind
  (asyncio or uvloop), for Hypothesis tests, which cannot be ``async``.
* :func:`run_example` -- a script of ``docs/examples/`` as its own process;
  :func:`load_example` -- one imported in the test's process.
* :data:`CHROMIUM`, :data:`CHROMIUM_ARGS`, :data:`needs_chromium`,
  :func:`chromium` -- one way to start headless Chromium.
* :data:`REDIS_URL`, :func:`redis_reachable`, :func:`require_redis` -- the shared
  Redis server, skipped where it is missing.
* :class:`WriterCtx` / :class:`WriterHandler` -- a WebSocket handler that hands
  each connection's :class:`~tornado_longconn.backpressure.BackpressureWriter` to
  the test; :class:`Seen` -- what a test handler saw (opened, received, closed);
  :class:`WaiterServer` -- an app serving long-poll or SSE from one waiter.
* :func:`close_all` -- abort many :class:`~tornado_longconn.testing.WebSocketTestClient`.
* :func:`read_bytes`, :func:`exists`, :func:`size_of`, :func:`listdir`,
  :func:`open_partial_files`, :class:`CountingStore` -- upload files on disk.

Timing goes through :func:`tornado_longconn.testing.scaled` (one factor,
``LONGCONN_TEST_TIMEOUT_FACTOR``), as everywhere in the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import tornado.websocket

from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.backpressure import BackpressureWriter
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled
from tornado_longconn.upload import UploadStore

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "EXAMPLES",
    "LOOP",
    "REDIS_URL",
    "ROOT",
    "CountingStore",
    "RunningExample",
    "Seen",
    "WaiterServer",
    "WriterCtx",
    "WriterHandler",
    "chromium",
    "close_all",
    "exists",
    "free_port",
    "listdir",
    "load_example",
    "needs_chromium",
    "new_event_loop",
    "open_partial_files",
    "read_bytes",
    "redis_reachable",
    "require_redis",
    "run_example",
    "run_on_suite_loop",
    "size_of",
    "wait_listening",
    "wait_until",
]

T = TypeVar("T")

#: The repository's root directory and its runnable examples.
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"

#: The event loop the suite runs on: ``LONGCONN_EVENT_LOOP`` ("asyncio" or "uvloop").
LOOP = os.environ.get("LONGCONN_EVENT_LOOP", "asyncio")

#: Where the shared Redis server is (``REDIS_URL``, default 127.0.0.1:6379, db 0).
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


# -- ports, waiting, loops ------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now (for a child process to bind).

    In-process servers do not need it: :class:`~tornado_longconn.testing.AppServer`
    binds port 0 itself.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_listening(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Return once ``host:port`` accepts TCP connections; fail after ``scaled(timeout)`` s.

    For a server that says nothing when it listens (nginx): it tries to
    connect every 10 ms. A server of ours prints ``READY`` instead (see
    ``tests/server_process.py``). Raises :class:`AssertionError` at the deadline.
    """

    async def connect() -> None:
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(connect(), scaled(timeout))
    except asyncio.TimeoutError:
        raise AssertionError(f"{host}:{port} not listening within {scaled(timeout):g} s") from None


async def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    *,
    changed: asyncio.Event | None = None,
) -> None:
    """Return once ``predicate()`` is true; fail after ``scaled(timeout)`` seconds.

    With ``changed`` (an event the code under test sets whenever the condition
    may have changed) the wait is event-driven: the predicate is checked again
    only when the event fires. Without it -- for a state change that has no
    event of its own -- the predicate is polled every 2 ms until the deadline.
    Raises :class:`AssertionError` at the deadline.
    """

    async def on_event(event: asyncio.Event) -> None:
        while not predicate():
            event.clear()
            await event.wait()

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(on_event(changed) if changed else poll(), scaled(timeout))
    except asyncio.TimeoutError:
        raise AssertionError(f"condition not reached within {scaled(timeout):g} s") from None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind the suite runs on (:data:`LOOP`)."""
    if LOOP == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_on_suite_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop of the suite's kind (for sync tests).

    As :func:`asyncio.run` does (which takes no loop factory before Python 3.12):
    tasks still pending at the end are cancelled, then the loop is closed.
    """
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


# -- examples -----------------------------------------------------------------------


def load_example(name: str) -> ModuleType:
    """Import ``docs/examples/<name>.py`` in this process (as module ``example_<name>``)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class RunningExample:
    """An example script running as its own process (from :func:`run_example`)."""

    #: The child process; stdout and stderr are merged into ``process.stdout``.
    process: asyncio.subprocess.Process
    #: Its first output line (the "listening on ..." banner), stripped.
    banner: str
    #: The port it was told to listen on (``PORT``).
    port: int


@contextlib.asynccontextmanager
async def run_example(
    script: str | Path, port: int | None = None, *, ready: str = "", **env_vars: str
) -> AsyncIterator[RunningExample]:
    """Run ``script`` (a file name under ``docs/examples/``, or a path) as a process.

    The child gets ``PORT`` (``port``, or a free one), ``PYTHONPATH`` = the
    repository and unbuffered output, plus ``env_vars``. The context is entered
    once the child printed its first line; the test fails if it exits first or
    that line lacks ``ready``. On exit the child gets SIGTERM (unless it already
    ended), then SIGKILL if it is still running after ``scaled(10)`` seconds.
    """
    path = Path(script) if os.path.isabs(script) else EXAMPLES / script
    port = free_port() if port is None else port
    env = dict(os.environ, PORT=str(port), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(env_vars)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), scaled(20))
        if not line or ready not in line.decode(errors="replace"):
            rest = b""
            with contextlib.suppress(asyncio.TimeoutError):
                rest = await asyncio.wait_for(proc.stdout.read(), scaled(5))
            output = (line + rest).decode(errors="replace")
            pytest.fail(f"{path.name} did not start (wanted {ready!r}):\n{output}")
        yield RunningExample(proc, line.decode(errors="replace").strip(), port)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.communicate(), scaled(10))
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- Chromium -------------------------------------------------------------------------

#: The Chromium binary the browser tests drive.
CHROMIUM = "/usr/bin/chromium"

#: Launch arguments: headless, no sandbox (containers), no GPU, no QUIC (every
#: request goes over the TCP connection under test), and nothing that talks to
#: the network on its own (background networking, component updates, sync).
#: The profile is fresh for every browser: Playwright's ``launch()`` gives each
#: one its own temporary ``--user-data-dir`` (and refuses that flag in ``args``).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

#: Skip marker for tests that need :data:`CHROMIUM`.
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"Chromium not installed at {CHROMIUM}"
)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A Playwright ``Browser``: :data:`CHROMIUM` with :data:`CHROMIUM_ARGS`, closed on exit.

    Skips the test when Playwright is not installed (mark it :data:`needs_chromium`
    for a missing browser).
    """
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            await browser.close()


# -- Redis ----------------------------------------------------------------------------


async def redis_reachable(url: str = REDIS_URL) -> bool:
    """Whether something accepts TCP connections where ``url`` points."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            opening = asyncio.open_unix_connection(parts.path)
        else:
            opening = asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379)
        _reader, writer = await asyncio.wait_for(opening, scaled(2))
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def require_redis() -> None:
    """Skip the calling test when Redis or the redis package is missing."""
    pytest.importorskip("redis.asyncio", reason="the redis package is not installed")
    if not await redis_reachable():
        pytest.skip(f"no Redis server at {REDIS_URL} (set REDIS_URL to point at one)")


# -- server-side fixtures -------------------------------------------------------------


@dataclass
class WriterCtx:
    """What :class:`WriterHandler` hands to the test: each opened connection's writer.

    ``writer_kwargs`` and ``compression`` configure the next connections;
    ``closed`` gets ``(close_code, close_reason)`` of every closed one;
    ``finish`` ends streaming HTTP handlers that wait on it.
    """

    writer_kwargs: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    writers: asyncio.Queue[BackpressureWriter] = field(default_factory=asyncio.Queue)
    closed: asyncio.Queue[tuple[int | None, str | None]] = field(default_factory=asyncio.Queue)
    finish: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self) -> BackpressureWriter:
        """The next opened connection's writer (waits at most ``scaled(10)``)."""
        return await asyncio.wait_for(self.writers.get(), scaled(10))


class WriterHandler(tornado.websocket.WebSocketHandler):
    """Wraps each connection in a ``BackpressureWriter`` and puts it in ``ctx.writers``."""

    def initialize(self, ctx: WriterCtx) -> None:
        self.ctx = ctx

    def get_compression_options(self) -> dict[str, Any] | None:
        return self.ctx.compression

    def open(self, *args: str, **kwargs: str) -> None:
        self.ctx.writers.put_nowait(BackpressureWriter(self, **self.ctx.writer_kwargs))

    def on_close(self) -> None:
        self.ctx.closed.put_nowait((self.close_code, self.close_reason))


@dataclass
class WaiterServer:
    """A running app whose long-poll or SSE handlers share one backend and waiter."""

    server: AppServer
    backend: MemoryBackend
    waiter: LongPollWaiter

    def url(self, path: str) -> str:
        """``http://127.0.0.1:PORT`` + ``path``."""
        return self.server.url(path)


@dataclass
class Seen:
    """What a test's WebSocket handlers saw, as queues the test awaits.

    The handler puts itself in ``handlers`` when it opens, each message in
    ``received``, each pong's data in ``pongs`` and ``(close_code,
    close_reason)`` in ``closed``.
    """

    handlers: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    closed: asyncio.Queue[tuple[int | None, str | None]] = field(default_factory=asyncio.Queue)
    received: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    pongs: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    async def handler(self) -> Any:
        """The next opened handler (waits at most ``scaled(5)``)."""
        return await asyncio.wait_for(self.handlers.get(), scaled(5))

    async def close_seen(self) -> tuple[int | None, str | None]:
        """The next ``(close_code, close_reason)`` (waits at most ``scaled(5)``)."""
        return await asyncio.wait_for(self.closed.get(), scaled(5))


# -- test clients ---------------------------------------------------------------------


async def close_all(clients: Iterable[WebSocketTestClient]) -> None:
    """Abort every client (:meth:`~WebSocketTestClient.vanish`) and wait until each is gone."""
    clients = list(clients)
    for client in clients:
        client.vanish()
    await asyncio.gather(*(client.wait_closed() for client in clients))


# -- upload files (sync, so async tests do no blocking file I/O of their own) ---------


def read_bytes(path: str | Path) -> bytes:
    """The contents of the file at ``path``."""
    return Path(path).read_bytes()


def exists(path: str | Path) -> bool:
    """Whether ``path`` exists."""
    return os.path.exists(path)


def size_of(path: str | Path) -> int:
    """The size of the file at ``path`` in bytes."""
    return os.path.getsize(path)


def listdir(path: str | Path) -> list[str]:
    """The names in the directory ``path``."""
    return os.listdir(path)


def open_partial_files(root: str) -> int:
    """Descriptors of this process open on ``<root>/*.part`` (read from /proc/self/fd)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith(root + os.sep) and target.endswith(".part"):
                count += 1
    return count


class CountingStore(UploadStore):
    """An :class:`UploadStore` that records the most partial files open at once.

    ``most_open`` is read from ``/proc/self/fd`` after every open of a partial file
    and at every write job. Opens and counts hold one lock: a count lists the
    descriptor numbers first and reads their targets after, so a number freed by
    a concurrent listing and reused by a concurrent open would be counted twice.
    """

    most_open = 0
    _count_lock = threading.Lock()

    def _count(self) -> None:
        self.most_open = max(self.most_open, open_partial_files(self.root))

    def _open_partial(self, upload_id: str) -> int:
        with self._count_lock:
            fd = super()._open_partial(upload_id)
            self._count()
            return fd

    def write_at(self, fd: int, data: memoryview, offset: int) -> int:
        with self._count_lock:
            self._count()
        return super().write_at(fd, data, offset)
