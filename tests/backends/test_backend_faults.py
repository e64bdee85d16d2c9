"""Faults of the distributed backends under load: nothing is lost silently.

Three app processes (``faultapp.py``) share one backend; two WebSocket clients
per process follow the room from the same cursor. A publisher sends numbered
messages round-robin through the processes while a fault is injected (a NATS
server restart, a Sentinel failover, a Redis Cluster master killed). Per
client we count what it received, duplicates, explicit gaps (resync notices)
and silent losses -- consecutive messages whose cursors are not consecutive
with no resync notice between them. Silent losses must be zero, and every
client must get the messages published after the fault.

The servers are started by the tests on free ports (see ``serverprocs.py``)
and skipped with the reason when their binaries are missing.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serverprocs import NatsServer, RedisCluster, SentinelSet, which

from tests.server_process import ServerProcess
from tests.test_multiprocess import Client, assert_no_silent_gap
from tornado_longconn.log import parse_cursor
from tornado_longconn.testing import scaled

pytestmark = [pytest.mark.slow]

APP = Path(__file__).resolve().parent / "faultapp.py"


def fault_app(url: str, prefix: str) -> ServerProcess:
    """One ``faultapp.py`` process on a backend URL."""
    return ServerProcess(APP, "--backend", url, "--prefix", prefix)


@dataclass
class Counts:
    """What one client saw."""

    received: int
    duplicated: int
    lost_silently: int
    explicit_gaps: int
    skipped: int  # messages not received, each covered by a resync notice


def count(client: Client, published: list[str]) -> Counts:
    """Count ``client``'s messages against what was published (acknowledged)."""
    data = client.data
    lost_silently = 0
    skipped = 0
    previous = None
    for item in client.items:
        if item.get("type") == "resync":
            previous = None
            continue
        cursor = parse_cursor(item["cursor"])
        if previous is not None and cursor != previous.next():
            lost_silently += 1
        previous = cursor
    got = set(data)
    skipped = sum(1 for text in published if text not in got)
    return Counts(len(got), len(data) - len(got), lost_silently, len(client.resyncs), skipped)


async def publish_until_ok(http: httpx.AsyncClient, app: ServerProcess, text: str) -> None:
    """POST until the process answers 200 (it may be reconnecting), bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(30)
    while True:
        try:
            response = await http.post(app.url("/publish"), content=text.encode())
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if loop.time() > deadline:
            raise AssertionError(f"publishing {text!r} through {app.port} never recovered")
        await asyncio.sleep(scaled(0.05))  # a retry deadline: the process is reconnecting


async def run_fault(
    url: str, fault: Callable[[], None], *, before: int = 30, after: int = 30
) -> list[Counts]:
    """Publish ``before`` messages; keep publishing while ``fault`` runs (in a thread)
    until every client got a resync notice; then publish ``after`` more, which
    every client must receive. Returns each client's :class:`Counts`."""
    prefix = f"f{secrets.token_hex(4)}"
    apps = [fault_app(url, prefix) for _ in range(3)]
    clients: list[Client] = []
    try:
        await asyncio.gather(*(app.start() for app in apps))
        async with httpx.AsyncClient(timeout=scaled(10)) as http:
            response = await http.get(apps[0].url("/poll"), params={"timeout": "0"})
            start = response.json()["cursor"]
            clients = [Client(app, f"{i}@{n}") for n, app in enumerate(apps) for i in range(2)]
            await asyncio.gather(*(c.connect(start) for c in clients))
            published: list[str] = []
            for i in range(before):
                await publish_until_ok(http, apps[i % 3], f"m{i}")
                published.append(f"m{i}")
            for client in clients:
                await client.wait_until(lambda c=client: len(c.data) >= before)
            # During the fault a publisher keeps sending; every client must be told.
            stop = asyncio.Event()

            async def keep_publishing() -> None:
                while not stop.is_set():
                    n = len(published)
                    await publish_until_ok(http, apps[n % 3], f"m{n}")
                    published.append(f"m{n}")

            publisher = asyncio.create_task(keep_publishing())
            await asyncio.to_thread(fault)
            for client in clients:
                await client.wait_until(lambda c=client: len(c.resyncs) >= 1, timeout=30)
            stop.set()
            await publisher
            # Every process is back: what is published now reaches everyone.
            for _ in range(after):
                n = len(published)
                await publish_until_ok(http, apps[n % 3], f"m{n}")
                published.append(f"m{n}")
            last = published[-1]
            for client in clients:
                await client.wait_until(lambda c=client: last in c.data, timeout=30)
            counts = [count(client, published) for client in clients]
            for client, counted in zip(clients, counts, strict=True):
                print(f"{url.split(':')[0]} client {client.name}: {counted}")
                assert_no_silent_gap(client)
                assert counted.lost_silently == 0
                assert all(f"m{i}" in client.data for i in range(before))
            return counts
    finally:
        for client in clients:
            await client.close()
        for app in apps:
            await app.stop()


@pytest.fixture
def nats_server() -> AsyncIterator[NatsServer]:
    """A private ``nats-server -js`` (this test restarts it)."""
    pytest.importorskip("nats", reason="nats-py is not installed")
    binary = which("nats-server")
    if binary is None:
        pytest.skip("no nats-server binary on PATH (apt-get install nats-server)")
    server = NatsServer(binary)
    server.start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.close()


async def test_nats_restart_loses_nothing_silently(nats_server: NatsServer) -> None:
    counts = await run_fault(nats_server.url, nats_server.restart)
    # The restart drops every connection: each client is told (one resync notice at least).
    assert all(c.explicit_gaps >= 1 for c in counts)


@pytest.fixture
def sentinel_set() -> AsyncIterator[SentinelSet]:
    """A private Sentinel set (this test kills its master)."""
    pytest.importorskip("redis.asyncio", reason="the redis package is not installed")
    binary = which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on PATH (apt-get install redis-server)")
    servers = SentinelSet(binary)
    try:
        servers.start()
        yield servers  # type: ignore[misc]
    finally:
        servers.close()


async def test_sentinel_failover_loses_nothing_silently(sentinel_set: SentinelSet) -> None:
    counts = await run_fault(sentinel_set.url, sentinel_set.failover)
    # Every client is told: the connection dropped, and the new master starts a new epoch.
    assert all(c.explicit_gaps >= 1 for c in counts)


@pytest.fixture
def redis_cluster() -> AsyncIterator[RedisCluster]:
    """A private 3-master Redis Cluster (this test kills a master)."""
    pytest.importorskip("redis.asyncio.cluster", reason="the redis package is not installed")
    binary, cli = which("redis-server"), which("redis-cli")
    if binary is None or cli is None:
        pytest.skip("no redis-server/redis-cli binary on PATH (apt-get install redis-server)")
    cluster = RedisCluster(binary, cli)
    try:
        cluster.start()
        yield cluster  # type: ignore[misc]
    finally:
        cluster.close()


async def test_cluster_master_kill_loses_nothing_silently(redis_cluster: RedisCluster) -> None:
    counts = await run_fault(redis_cluster.url, lambda: redis_cluster.fail_master_of("room"))
    # The room's shard went away: every client is told, on a new epoch.
    assert all(c.explicit_gaps >= 1 for c in counts)
