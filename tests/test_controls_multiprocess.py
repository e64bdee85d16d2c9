"""Connection caps across processes: two real server processes share one Redis count.

Each process is ``tests/caps_server.py`` (its own event loop, its own
:class:`~tornado_longconn.caps_redis.RedisConnectionCaps`) on the shared Redis
with a prefix of its own. Clients claim an address with ``X-Real-Ip`` (the
servers run with ``xheaders=True``, as behind a proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.helpers import REDIS_URL, require_redis
from tests.server_process import ServerProcess
from tornado_longconn.testing import scaled

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

SERVER = Path(__file__).resolve().parent / "caps_server.py"
FLOOD_IP = "203.0.113.7"


class CapsServer(ServerProcess):
    """One ``caps_server.py`` process."""

    def __init__(self, prefix: str, *args: str) -> None:
        super().__init__(SERVER, "--redis", REDIS_URL, "--prefix", prefix, *args, uvloop=True)

    async def stats(self) -> Any:
        async with httpx.AsyncClient(timeout=scaled(10)) as client:
            return (await client.get(self.url("/stats"))).json()


@contextlib.asynccontextmanager
async def servers(n: int, *args: str) -> AsyncIterator[list[CapsServer]]:
    await require_redis()
    prefix = f"test:caps:{secrets.token_hex(4)}:"
    running = [CapsServer(prefix, *args) for _ in range(n)]
    try:
        await asyncio.gather(*(s.start() for s in running))
        yield running
    finally:
        for server in running:
            await server.stop(signal.SIGKILL)
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def attempt(url: str, ip: str) -> tuple[ClientConnection | None, int | None]:
    """Open a WebSocket as ``ip``: (the open connection, None) when welcomed, else (None, close code)."""
    ws = await websockets.connect(url, additional_headers={"X-Real-Ip": ip})
    try:
        first = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
    except ConnectionClosed:
        return None, ws.close_code
    assert first["type"] == "welcome"
    return ws, None


async def test_per_ip_cap_holds_across_two_processes_and_a_killed_process_is_released() -> None:
    cap = 50
    ttl = scaled(1.5)
    async with servers(2, "--cap", str(cap), "--ttl", str(ttl)) as (a, b):
        # 100 connections from one address, spread over both processes.
        results = []
        for i in range(0, 100, 10):
            results += await asyncio.gather(
                *(attempt((a, b)[j % 2].ws_url("/ws"), FLOOD_IP) for j in range(i, i + 10))
            )
        opened = [ws for ws, _ in results if ws is not None]
        codes = [code for ws, code in results if ws is None]
        assert len(opened) == cap
        assert codes == [4429] * (100 - cap)
        on_a = sum(1 for j, (ws, _) in enumerate(results) if ws is not None and j % 2 == 0)
        assert 0 < on_a < cap  # both processes accepted some
        # counted in each process's stats, summed: every refusal once
        stats = [await a.stats(), await b.stats()]
        assert sum(s["refused"].get("ip", 0) for s in stats) == 100 - cap
        assert sum(s["caps"]["refused"] for s in stats) == 100 - cap
        # another address is not affected
        other, code = await attempt(a.ws_url("/ws"), "198.51.100.1")
        assert other is not None, code
        await other.close()
        # a closed connection frees a slot for the other process
        await opened.pop(0).close()  # index 0 was on a
        for _ in range(100):  # the release is one round trip in a task: bounded retries
            ws, code = await attempt(b.ws_url("/ws"), FLOOD_IP)
            if ws is not None:
                opened.append(ws)
                break
            await asyncio.sleep(scaled(0.02))
        else:
            raise AssertionError("the released slot was not given to another process")
        # kill a: its connections stop counting once its TTL passed
        held_on_a = sum(1 for ws in opened if ws.remote_address[1] == a.port)
        await a.stop(signal.SIGKILL)
        for ws in opened:  # a's sockets are gone; b's stay
            if ws.remote_address[1] == a.port:
                with contextlib.suppress(ConnectionClosed):
                    await asyncio.wait_for(ws.wait_closed(), scaled(10))
        still = [ws for ws in opened if ws.remote_address[1] == b.port]
        assert len(still) == cap - held_on_a
        gained: list[ClientConnection] = []
        deadline = asyncio.get_running_loop().time() + ttl + scaled(5)
        while len(gained) < held_on_a:
            assert asyncio.get_running_loop().time() < deadline, (len(gained), held_on_a)
            ws, code = await attempt(b.ws_url("/ws"), FLOOD_IP)
            if ws is None:
                assert code == 4429
                await asyncio.sleep(scaled(0.1))  # waiting for the TTL: a clock, no event
            else:
                gained.append(ws)
        # ...and no more than the cap
        ws, code = await attempt(b.ws_url("/ws"), FLOOD_IP)
        assert ws is None and code == 4429
        for ws in [*still, *gained]:
            await ws.close()


async def test_a_thousand_connections_from_one_address_past_the_cap() -> None:
    """The issue's scale: 1,000 handshakes from one address, 50 kept, over two processes."""
    cap = 50
    async with servers(2, "--cap", str(cap)) as (a, b):
        kept: list[ClientConnection] = []
        refused = 0
        for i in range(0, 1000, 50):
            results = await asyncio.gather(
                *(attempt((a, b)[j % 2].ws_url("/ws"), FLOOD_IP) for j in range(i, i + 50))
            )
            kept += [ws for ws, _ in results if ws is not None]
            refused += sum(1 for ws, code in results if ws is None and code == 4429)
        assert (len(kept), refused) == (cap, 1000 - cap)
        stats = [await a.stats(), await b.stats()]
        assert sum(s["refused"]["ip"] for s in stats) == 1000 - cap
        for ws in kept:
            await ws.close()
