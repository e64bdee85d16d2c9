"""docs/examples/broadcast_rooms.py works as the broadcast how-to says.

The example runs as its own process on a free port and is driven with the
``websockets`` library and httpx, as independent clients.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import httpx
import pytest
import websockets

from tests.helpers import free_port, run_example
from tornado_longconn.codes import CloseCode
from tornado_longconn.testing import scaled


async def recv_json(ws: Any) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))


async def test_rooms_example_isolates_rooms_resumes_and_shuts_down() -> None:
    port = free_port()
    base = f"ws://127.0.0.1:{port}/rooms"
    async with run_example("broadcast_rooms.py", port, ready="rooms on") as example:
        proc = example.process
        alice = await websockets.connect(f"{base}/kitchen")
        bob = await websockets.connect(f"{base}/kitchen")
        joined = await recv_json(alice)  # bob joined; bob himself is excluded
        assert joined["data"] == {"event": "joined", "members": 2}
        carol = await websockets.connect(f"{base}/garden")  # another room

        await alice.send("hello")
        for ws in (alice, bob):
            msg = await recv_json(ws)
            assert msg["data"] == {"event": "message", "text": "hello"}
        last_seen = msg["cursor"]

        # bob drops; while he is away two messages are published.
        await bob.close()
        assert (await recv_json(alice))["data"] == {"event": "left", "members": 1}
        await alice.send("while you were away")
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"http://127.0.0.1:{port}/rooms/kitchen/announce",
                content=b"from a thread",
                timeout=scaled(5),
            )
            assert r.status_code == 200 and r.json()["delivered"] == 1
        away = [await recv_json(alice) for _ in range(2)]

        # bob resumes from his cursor: the missed messages first, in order.
        bob = await websockets.connect(f"{base}/kitchen?cursor={last_seen}")
        replay = [await recv_json(bob) for _ in range(3)]
        assert [m["data"] for m in replay[:3]] == [
            {"event": "left", "members": 1},
            *[m["data"] for m in away],
        ]
        assert replay[1]["data"] == {"event": "message", "text": "while you were away"}
        assert replay[2]["data"] == {"event": "announcement", "text": "from a thread"}
        with pytest.raises(asyncio.TimeoutError):  # carol's room heard nothing
            await asyncio.wait_for(carol.recv(), scaled(0.2))

        # A malformed cursor is refused with 1008.
        bad = await websockets.connect(f"{base}/kitchen?cursor=nope")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(bad.recv(), scaled(5))
        assert bad.close_code == 1008

        # SIGTERM: every member gets 1001 (going away).
        proc.send_signal(signal.SIGTERM)
        for ws in (alice, bob, carol):
            await asyncio.wait_for(ws.wait_closed(), scaled(10))
            assert ws.close_code == CloseCode.GOING_AWAY
        assert proc.stdout is not None
        assert b"closed" in await asyncio.wait_for(proc.stdout.read(), scaled(10))
        await asyncio.wait_for(proc.wait(), scaled(10))
