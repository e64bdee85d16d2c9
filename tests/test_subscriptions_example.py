"""docs/examples/subscriptions_app.py works as the how-to says (its own process, real clients)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import tornado.web
import websockets

from tests.helpers import free_port, run_example
from tornado_longconn.testing import scaled

SECRET = "test-cookie-secret-0123456789abcdef"


def session(user: str) -> dict[str, str]:
    value = tornado.web.create_signed_value(SECRET, "user", user).decode()
    return {"Cookie": f"user={value}"}


async def test_one_connection_many_topics_and_the_same_rules_over_http() -> None:
    port = free_port()
    base = f"127.0.0.1:{port}"
    async with run_example("subscriptions_app.py", port, ready="ws://", COOKIE_SECRET=SECRET):
        # No user: closed with 4401.
        async with websockets.connect(f"ws://{base}/ws") as anonymous:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(anonymous.recv(), scaled(5))
            assert anonymous.close_code == 4401

        async def recv(ws: websockets.ClientConnection) -> dict[str, object]:
            reply: dict[str, object] = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
            return reply

        async with websockets.connect(f"ws://{base}/ws", additional_headers=session("ann")) as ann:
            assert (await recv(ann))["type"] == "welcome"
            for n, topic in enumerate(("room:lobby", "dm:ann", "notify:ann", "dm:bob"), 1):
                await ann.send(json.dumps({"type": "subscribe", "id": n, "topic": topic}))
            replies = [await recv(ann) for _ in range(4)]
            assert [r["type"] for r in replies] == ["subscribed"] * 3 + ["error"]
            assert replies[3]["code"] == "forbidden"
            await ann.send(json.dumps({"type": "call", "id": 9, "method": "whoami"}))
            assert await recv(ann) == {"type": "result", "id": 9, "result": "ann"}

            async with httpx.AsyncClient(base_url=f"http://{base}", timeout=scaled(10)) as http:
                # bob writes to ann's direct messages over HTTP; ann reads it on her socket
                sent = await http.post(
                    "/publish",
                    json={"topic": "dm:ann", "data": {"text": "hi"}},
                    headers=session("bob"),
                )
                assert sent.status_code == 200
                message = await recv(ann)
                assert message == {
                    "topic": "dm:ann",
                    "cursor": sent.json()["cursor"],
                    "data": {"text": "hi"},
                }
                refused = await http.post(
                    "/publish", json={"topic": "notify:ann", "data": {}}, headers=session("bob")
                )
                assert refused.status_code == 403
                # ann's long-poll of two topics: bob's message, and her other topic's head
                poll = await http.get(
                    "/poll",
                    params={"topics": "dm:ann,room:lobby", "cursors": "dm:ann=", "timeout": 0},
                    headers=session("ann"),
                )
                assert poll.status_code == 200
                assert poll.json()["cursors"]["dm:ann"] == sent.json()["cursor"]
                # bob may not read ann's direct messages over HTTP either
                poll = await http.get(
                    "/poll",
                    params={"topics": "dm:ann", "timeout": 0},
                    headers=session("bob"),
                )
                assert [e["code"] for e in poll.json()["errors"]] == ["forbidden"]
