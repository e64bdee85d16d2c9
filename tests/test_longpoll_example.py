"""docs/examples/longpoll_app.py works as the how-to says (own process, real clients)."""

from __future__ import annotations

import asyncio

import httpx
from httpx_sse import aconnect_sse

from tests.helpers import run_example
from tornado_longconn.testing import scaled


async def test_long_poll_and_sse_share_cursors() -> None:
    async with run_example("longpoll_app.py", ready="/poll/lobby") as example:
        base = f"http://127.0.0.1:{example.port}"
        async with httpx.AsyncClient(base_url=base, timeout=scaled(10)) as client:
            first = (await client.get("/poll/lobby", params={"timeout": "0"})).json()
            waiting = asyncio.ensure_future(
                client.get("/poll/lobby", params={"cursor": first["cursor"], "timeout": "20"})
            )
            sent = (await client.post("/send/lobby", content="hello")).json()
            answer = (await waiting).json()
            assert answer["messages"] == [{"cursor": sent["cursor"], "data": "hello"}]
            await client.post("/send/lobby", content="second")
            # an SSE client resumes after the cursor the long-poll gave
            async with aconnect_sse(
                client, "GET", "/events/lobby", headers={"Last-Event-ID": answer["cursor"]}
            ) as es:
                events = es.aiter_sse().__aiter__()
                ready = await asyncio.wait_for(events.__anext__(), scaled(5))
                event = await asyncio.wait_for(events.__anext__(), scaled(5))
                await events.aclose()  # type: ignore[attr-defined]
            assert ready.event == "ready" and event.data == "second"
