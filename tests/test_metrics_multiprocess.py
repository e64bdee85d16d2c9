"""Several processes behind one port: any process answers a scrape with the sum of all.

``docs/examples/metrics_multiprocess.py`` forks three processes sharing a port
(``fork_processes``), each publishing five messages to its own room; every scrape,
whichever process answers it, reports three groups and fifteen messages, and
``prometheus_client``'s own multiprocess counter of the application sums to three.
A child killed with SIGKILL is restarted by ``fork_processes``: its counters stay in
the totals (twenty messages, four starts), its gauges leave with it (three groups).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, free_port
from tornado_longconn.testing import scaled

EXAMPLE = ROOT / "docs" / "examples" / "metrics_multiprocess.py"
PROCESSES = 3
MESSAGES = 5


class Forked:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.pids: list[int] = []

    async def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PROMETHEUS_MULTIPROC_DIR=str(self.directory))
        args = [str(EXAMPLE), "--port", str(self.port), "--processes", str(PROCESSES)]
        args += ["--messages", str(MESSAGES)]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True
        )
        for _ in range(PROCESSES):
            await self.ready()

    async def ready(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), scaled(20))
        if not line.startswith(b"READY "):
            raise RuntimeError(f"example did not start: {line!r}")
        pid = int(line.split()[1])
        self.pids.append(pid)
        return pid

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), scaled(10))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            if proc.stdout is not None:
                await asyncio.wait_for(proc.stdout.read(), scaled(10))


@pytest.fixture
async def forked(tmp_path: Path) -> AsyncIterator[Forked]:
    server = Forked(tmp_path)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


async def scrape(port: int) -> tuple[int, dict[str, float]]:
    """One new connection: which process answered, and the samples of its scrape."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=scaled(10)) as http:
        pid = (await http.get("/pid")).json()["pid"]  # same keep-alive connection
        text = (await http.get("/metrics")).text
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
    return pid, samples


async def test_every_process_answers_with_the_sum_of_all(forked: Forked) -> None:
    answered = set()
    for _ in range(8):
        pid, samples = await scrape(forked.port)
        answered.add(pid)
        assert samples["longconn_groups"] == PROCESSES
        assert samples["longconn_messages_published_total"] == PROCESSES * MESSAGES
        assert samples["example_process_starts_total"] == PROCESSES
    assert answered <= set(forked.pids)

    # A child dies; fork_processes starts another, which publishes its own five.
    os.kill(forked.pids[0], signal.SIGKILL)
    await forked.ready()
    for _ in range(4):
        _pid, samples = await scrape(forked.port)
        assert samples["longconn_groups"] == PROCESSES  # the dead one's gauge is gone
        # ... and its counters stay: totals never go backwards.
        assert samples["longconn_messages_published_total"] == (PROCESSES + 1) * MESSAGES
        assert samples["example_process_starts_total"] == PROCESSES + 1
