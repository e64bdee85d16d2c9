"""The Python client and its command line against the demo (a subprocess, as users run it).

Two users on one room: presence pages and join/leave events through the client,
a chat message sent with ``call("chat.send")`` arrives on the subscription,
direct messages reach the addressee's ``dm:`` topic, and ``longconn presence``
prints the room's members and counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_client_cli import run_cli
from tests.test_demo import demo_server
from tornado_longconn.client import PresenceChange, TopicMessage, connect
from tornado_longconn.testing import scaled

pytestmark = pytest.mark.timeout(120)


async def test_client_speaks_to_the_demo_rooms_presence_and_calls(tmp_path: Path) -> None:
    async with demo_server(tmp_path) as server:
        ws = f"ws://127.0.0.1:{server.port}/ws"
        async with connect(ws + "?user=ann", open_timeout=scaled(10)) as ann:
            room = await ann.subscribe("room:lobby", params={"presence": True})
            dms = await ann.subscribe("dm:ann")
            async with connect(ws + "?user=bob", open_timeout=scaled(10)) as bob:
                await bob.subscribe("room:lobby")
                joined = []  # ann's own join may come first
                while "bob" not in joined:
                    event = await room.get(scaled(10))
                    if isinstance(event, PresenceChange) and event.kind == "join":
                        joined.append(event.member["user"])
                assert set(joined) <= {"ann", "bob"}

                page = await ann.presence("room:lobby")
                assert page.connections == 2 and page.users == 2 and page.cursor is None
                assert sorted(m["user"] for m in page.members) == ["ann", "bob"]

                status, out, err = await run_cli("presence", ws + "?user=cli", "room:lobby")
                assert status == 0, err
                *members, stats = [json.loads(line) for line in out.splitlines()]
                assert sorted(m["user"] for m in members) == ["ann", "bob"]
                assert stats == {
                    "type": "presence_stats",
                    "topic": "room:lobby",
                    "connections": 2,
                    "users": 2,
                }

                assert await bob.call("chat.send", {"room": "lobby", "text": "hi ann"}) == {
                    "sent": True
                }
                message = await room.get(scaled(10))
                while not (isinstance(message, TopicMessage) and message.data["type"] == "chat"):
                    message = await room.get(scaled(10))  # the room's presence snapshots too
                assert message.data["text"] == "hi ann" and message.data["user"] == "bob"

                await bob.call("dm.send", {"to": "ann", "text": "psst"})
                dm = await dms.get(scaled(10))
                assert isinstance(dm, TopicMessage) and dm.data["text"] == "psst"
            leave = await room.get(scaled(30))
            while not (isinstance(leave, PresenceChange) and leave.kind == "leave"):
                leave = await room.get(scaled(30))
            assert leave.member["user"] == "bob"
