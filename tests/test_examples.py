"""The runnable examples under docs/examples/ work as the docs say.

Each example is started as its own process, on a free port, and driven with the
``websockets`` library as an independent client.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import tornado.web
import websockets

from tests.helpers import free_port, load_example, run_example
from tornado_longconn.testing import scaled


async def test_quickstart_broadcasts_to_every_member() -> None:
    port = free_port()
    async with run_example("quickstart.py", port) as example:
        assert f"ws://localhost:{port}/chat" in example.banner
        url = f"ws://127.0.0.1:{port}/chat"
        async with websockets.connect(url) as alice:
            # alice's own message coming back proves she is a member of the room.
            await alice.send("alice here")
            assert await asyncio.wait_for(alice.recv(), scaled(5)) == "alice here"
            async with websockets.connect(url) as bob:
                await bob.send("hello from bob")
                assert await asyncio.wait_for(bob.recv(), scaled(5)) == "hello from bob"
                assert await asyncio.wait_for(alice.recv(), scaled(5)) == "hello from bob"
                await alice.send(b"\x00\x01binary")
                assert await asyncio.wait_for(bob.recv(), scaled(5)) == b"\x00\x01binary"
                assert await asyncio.wait_for(alice.recv(), scaled(5)) == b"\x00\x01binary"


SECRET = "test-cookie-secret-0123456789abcdef"


def session(user: str) -> str:
    """The Cookie header a login page would have set for ``user``."""
    value = tornado.web.create_signed_value(SECRET, "user", user).decode()
    return f"user={value}"


async def test_secure_chat_checks_every_transport() -> None:
    port = free_port()
    origin = f"http://localhost:{port}"
    base = f"127.0.0.1:{port}"
    async with run_example("secure_chat.py", port, COOKIE_SECRET=SECRET):

        async def refused(path: str, headers: dict[str, str], origin: str = origin) -> int:
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(
                    f"ws://{base}{path}", origin=origin, additional_headers=headers
                ):
                    pass
            status: int = info.value.response.status_code
            return status

        # WebSocket: no session, a forged session, another site's page, a room not allowed.
        assert await refused("/ws/lobby", {}) == 401
        assert await refused("/ws/lobby", {"Cookie": "user=alice"}) == 401
        assert (
            await refused("/ws/lobby", {"Cookie": session("alice")}, "https://evil.example") == 403
        )
        assert await refused("/ws/staff", {"Cookie": session("bob")}) == 403

        async with httpx.AsyncClient(base_url=f"http://{base}") as http:
            # SSE and long-poll refuse the same way, before any stream or wait starts.
            for path in ("/events/lobby", "/poll/lobby?timeout=0"):
                assert (await http.get(path, timeout=scaled(5))).status_code == 401
            bob = {"Cookie": session("bob")}
            assert (
                await http.get("/events/staff", headers=bob, timeout=scaled(5))
            ).status_code == 403
            assert (
                await http.get("/poll/staff?timeout=0", headers=bob, timeout=scaled(5))
            ).status_code == 403

            head = (await http.get("/poll/lobby?timeout=0", headers=bob, timeout=scaled(5))).json()
            async with websockets.connect(
                f"ws://{base}/ws/lobby",
                origin=origin,
                additional_headers={"Cookie": session("alice")},
            ) as alice:
                await alice.send("hello bob")
                echo = json.loads(await asyncio.wait_for(alice.recv(), scaled(5)))
                assert echo["data"] == {"user": "alice", "text": "hello bob"}
                # The author comes from the session, and bob reads it over long-poll.
                poll = await http.get(
                    f"/poll/lobby?timeout=5&cursor={head['cursor']}",
                    headers=bob,
                    timeout=scaled(10),
                )
                messages = poll.json()["messages"]
                assert [json.loads(m["data"]) for m in messages] == [echo["data"]]
                assert messages[0]["cursor"] == echo["cursor"]

                # A message above websocket_max_message_size closes the socket with 1009.
                await alice.send("x" * (16 * 1024 + 1))
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(alice.recv(), scaled(5))
                assert alice.close_code == 1009


def test_json_logs_example_writes_the_connection_fields() -> None:
    import io
    import logging

    example = load_example("json_logs")
    out = io.StringIO()
    handler = example.setup_logging(out)
    try:
        log = logging.getLogger("tornado_longconn.test")
        log.warning("no connection here")

        class Request:
            remote_ip = "127.0.0.1"

        class Handler:
            request = Request()

        from tornado_longconn.logfields import ConnectionLogAdapter

        ConnectionLogAdapter(logging.getLogger("app"), Handler(), topic="t").info("hello")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines()[-2:])
    assert first["message"] == "no connection here" and first["longconn_conn"] is None
    assert second["longconn_topic"] == "t" and second["longconn_remote"] == "127.0.0.1"
    assert second["longconn_conn"].startswith("c") and second["longconn_user"] is None
