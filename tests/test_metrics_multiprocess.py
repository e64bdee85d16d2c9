"""Several processes behind one port: any process answers a scrape with the sum of all.

``docs/examples/metrics_multiprocess.py`` forks three processes sharing a port
(``fork_processes``), each publishing five messages to its own room; every scrape,
whichever process answers it, reports three groups and fifteen messages, and
``prometheus_client``'s own multiprocess counter of the application sums to three.
A child killed with SIGKILL is restarted by ``fork_processes``: its counters stay in
the totals (twenty messages, four starts), its gauges leave with it (three groups).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, free_port
from tests.server_process import ServerProcess
from tornado_longconn.testing import scaled

EXAMPLE = ROOT / "docs" / "examples" / "metrics_multiprocess.py"
PROCESSES = 3
MESSAGES = 5


class Forked(ServerProcess):
    """The example forking :data:`PROCESSES` processes on one port; each prints ``READY <pid>``."""

    def __init__(self, directory: Path) -> None:
        port = free_port()
        args = ["--port", str(port), "--processes", str(PROCESSES), "--messages", str(MESSAGES)]
        env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
        super().__init__(EXAMPLE, *args, processes=PROCESSES, port=port, env=env)

    @property
    def pids(self) -> list[int]:
        """The processes that said READY so far (a restarted child says it again)."""
        return self.announced


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
