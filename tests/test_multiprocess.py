"""Many Tornado processes on one Redis behave as one application.

Three real server processes (``tests/multiprocess_server.py``) share a private
``redis-server`` (started per test on a free port, without persistence, killed
at the end). Clients are spread over the processes with real WebSocket, HTTP
long-poll and SSE clients; messages are published from every process.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.backends.backend_helpers import require_redis
from tests.backends.redisproc import RedisProcess
from tests.helpers import free_port
from tests.server_process import ServerProcess
from tornado_longconn.log import parse_cursor
from tornado_longconn.testing import scaled

websockets_client = pytest.importorskip("websockets.asyncio.client")

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SERVER = Path(__file__).resolve().parent / "multiprocess_server.py"


def room_server(redis_url: str, prefix: str, processes: int = 1) -> ServerProcess:
    """One ``multiprocess_server.py`` process (forking ``processes`` on one port)."""
    args = ["--redis", redis_url, "--prefix", prefix]
    port = None
    if processes != 1:  # every process says READY once it listens
        port = free_port()
        args += ["--processes", str(processes), "--port", str(port)]
    return ServerProcess(SERVER, *args, processes=processes, port=port, uvloop=True)


class Client:
    """A WebSocket client of the room that records what it receives."""

    def __init__(self, server: ServerProcess, name: str) -> None:
        self.server = server
        self.name = name
        self.items: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: Any = None

    async def connect(self, cursor: str) -> None:
        self._ws = await websockets_client.connect(self.server.ws_url(f"/ws?cursor={cursor}"))
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                self.items.append(json.loads(raw))
                self._changed.set()
        except Exception:
            pass
        finally:
            self.closed.set()
            self._changed.set()

    @property
    def data(self) -> list[Any]:
        return [item["data"] for item in self.items if "cursor" in item and "type" not in item]

    @property
    def resyncs(self) -> list[dict[str, Any]]:
        return [item for item in self.items if item.get("type") == "resync"]

    async def wait_until(self, predicate: Any, timeout: float = 15) -> None:
        async def wait() -> None:
            while not predicate():
                if self.closed.is_set():
                    raise AssertionError(f"{self.name} was closed; got {self.items}")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), scaled(timeout))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            await self._task


def assert_no_silent_gap(client: Client) -> None:
    """Consecutive messages have consecutive cursors, unless a resync notice sits between."""
    previous = None
    for item in client.items:
        if item.get("type") == "resync":
            previous = None
            continue
        cursor = parse_cursor(item["cursor"])
        if previous is not None:
            assert cursor == previous.next(), f"{client.name}: silent gap {previous} -> {cursor}"
        previous = cursor


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[RedisProcess, list[ServerProcess]]]:
    await require_redis()
    redis = RedisProcess()
    await redis.start()
    prefix = f"mp-{secrets.token_hex(4)}:"
    servers = [room_server(redis.url, prefix) for _ in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield redis, servers
    finally:
        for server in servers:
            await server.stop()
        await redis.close()


async def head_of(http: httpx.AsyncClient, server: ServerProcess) -> str:
    response = await http.get(server.url("/poll"), params={"timeout": "0"})
    response.raise_for_status()
    cursor: str = response.json()["cursor"]
    return cursor


async def publish(http: httpx.AsyncClient, server: ServerProcess, text: str) -> str:
    response = await http.post(server.url("/publish"), content=text.encode())
    response.raise_for_status()
    cursor: str = response.json()["cursor"]
    return cursor


async def connect_clients(
    http: httpx.AsyncClient, servers: list[ServerProcess], per_server: int
) -> list[Client]:
    start = await head_of(http, servers[0])
    clients = [
        Client(server, f"{i}@{n}") for n, server in enumerate(servers) for i in range(per_server)
    ]
    await asyncio.gather(*(c.connect(start) for c in clients))
    return clients


async def test_every_client_gets_every_message_in_one_order(
    cluster: tuple[RedisProcess, list[ServerProcess]],
) -> None:
    _redis, servers = cluster
    async with httpx.AsyncClient(timeout=scaled(10)) as http:
        clients = await connect_clients(http, servers, per_server=4)
        # Published concurrently from all three processes.
        texts = [f"m{i}" for i in range(60)]
        await asyncio.gather(*(publish(http, servers[i % 3], t) for i, t in enumerate(texts)))
        for client in clients:
            await client.wait_until(lambda c=client: len(c.data) >= 60)
        order = clients[0].data
        assert sorted(order) == sorted(texts)
        for client in clients:
            assert client.data == order, client.name
            assert client.resyncs == []
            assert_no_silent_gap(client)
        for client in clients:
            await client.close()


async def test_killing_one_process_leaves_the_others_working(
    cluster: tuple[RedisProcess, list[ServerProcess]],
) -> None:
    _redis, servers = cluster
    async with httpx.AsyncClient(timeout=scaled(10)) as http:
        clients = await connect_clients(http, servers, per_server=3)
        await publish(http, servers[0], "before")
        for client in clients:
            await client.wait_until(lambda c=client: c.data == ["before"])
        await servers[2].stop(signal.SIGKILL)  # no cleanup, sockets just vanish
        orphans = [c for c in clients if c.server is servers[2]]
        survivors = [c for c in clients if c.server is not servers[2]]
        for orphan in orphans:
            await asyncio.wait_for(orphan.closed.wait(), scaled(10))
        for i in range(10):
            await publish(http, servers[i % 2], f"after{i}")
        expected = ["before", *(f"after{i}" for i in range(10))]
        for client in survivors:
            await client.wait_until(lambda c=client: len(c.data) >= 11)
            assert client.data == survivors[0].data
            assert sorted(client.data) == sorted(expected)
            assert_no_silent_gap(client)
            await client.close()


async def test_redis_restart_gives_an_explicit_resync_never_a_silent_gap(
    cluster: tuple[RedisProcess, list[ServerProcess]],
) -> None:
    redis, servers = cluster
    async with httpx.AsyncClient(timeout=scaled(10)) as http:
        clients = await connect_clients(http, servers, per_server=2)
        for i in range(5):
            await publish(http, servers[i % 3], f"a{i}")
        for client in clients:
            await client.wait_until(lambda c=client: len(c.data) >= 5)
        await redis.restart()  # no persistence: every key and subscription is gone
        for client in clients:
            await client.wait_until(lambda c=client: len(c.resyncs) >= 1)
        # Publishing works again once each process has reconnected.
        for i in range(5):
            server = servers[i % 3]
            for _attempt in range(50):
                response = await http.post(server.url("/publish"), content=f"b{i}".encode())
                if response.status_code == 200:
                    break
                await asyncio.sleep(scaled(0.05))  # the process is still reconnecting
            else:
                raise AssertionError(f"publishing on {server.port} never recovered")
        for client in clients:
            await client.wait_until(lambda c=client: len(c.data) >= 10)
            assert client.data == [*(f"a{i}" for i in range(5)), *(f"b{i}" for i in range(5))], (
                client.items
            )
            assert_no_silent_gap(client)
            assert all(r["reason"] == "reconnect" for r in client.resyncs)
            await client.close()


async def test_long_poll_and_sse_resume_on_another_process(
    cluster: tuple[RedisProcess, list[ServerProcess]],
) -> None:
    _redis, (a, b, c) = cluster
    async with httpx.AsyncClient(timeout=scaled(20)) as http:
        cursors = [await publish(http, a, f"m{i}") for i in range(3)]
        # Long-poll process B from the first message's cursor: it reads the history
        # that process A wrote.
        response = await http.get(b.url("/poll"), params={"cursor": cursors[0], "timeout": "0"})
        body = response.json()
        assert [m["data"] for m in body["messages"]] == ["m1", "m2"]
        assert body["cursor"] == cursors[2] and not body["gap"]
        # A poll waiting on C is woken by a publish on A.
        pending = asyncio.ensure_future(
            http.get(c.url("/poll"), params={"cursor": cursors[2], "timeout": "20"})
        )
        await asyncio.sleep(0)  # let the request leave; the poll is correct either way
        live = await publish(http, a, "live")
        woken = (await asyncio.wait_for(pending, scaled(20))).json()
        assert [m["data"] for m in woken["messages"]] == ["live"]
        assert woken["cursor"] == live
        # SSE on B resumes from the cursor a client got from C.
        async with aconnect_sse(
            http, "GET", b.url("/events"), headers={"Last-Event-ID": cursors[1]}
        ) as events:
            stream = events.aiter_sse().__aiter__()
            first = await asyncio.wait_for(stream.__anext__(), scaled(10))
            assert first.event == "ready"
            replay = [await asyncio.wait_for(stream.__anext__(), scaled(10)) for _ in range(2)]
            assert [(e.data, e.id) for e in replay] == [("m2", cursors[2]), ("live", live)]
            after = await publish(http, c, "from c")
            event = await asyncio.wait_for(stream.__anext__(), scaled(10))
            assert (event.data, event.id) == ("from c", after)
            await stream.aclose()  # type: ignore[attr-defined]


async def test_fork_processes_share_one_port() -> None:
    await require_redis()
    redis = RedisProcess()
    await redis.start()
    forked = room_server(redis.url, f"mp-{secrets.token_hex(4)}:", processes=2)
    try:
        await forked.start()
        async with httpx.AsyncClient(timeout=scaled(10)) as http:
            clients = await connect_clients(http, [forked], per_server=8)
            texts = [f"m{i}" for i in range(20)]
            await asyncio.gather(*(publish(http, forked, t) for t in texts))
            for client in clients:
                await client.wait_until(lambda c=client: len(c.data) >= 20)
                assert client.data == clients[0].data
                assert sorted(client.data) == sorted(texts)
                await client.close()
    finally:
        await forked.stop()
        await redis.close()
