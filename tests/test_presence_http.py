"""Long-poll and SSE clients in presence and in the user registry (one process).

Real server on 127.0.0.1, real HTTP client (httpx): a long-poll client is a
member while it polls, gets join/leave events and messages to its user in its
answers, and a disconnect answers its poll and refuses its client id; an SSE
stream gets ``event: direct`` and a final ``event: disconnect``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import tornado.web

from tests.helpers import wait_until
from tests.test_subscriptions_http import read_events
from tornado_longconn import BroadcastHub, LongPollWaiter
from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.presence import MemoryPresence, PresenceStats
from tornado_longconn.presence_http import PollSessions, disconnect_status
from tornado_longconn.presence_users import UserRegistry
from tornado_longconn.subscriptions_http import SubscriptionPollHandler, SubscriptionSSEHandler
from tornado_longconn.testing import AppServer, scaled


class Identified:
    def get_current_user(self) -> str | None:
        return self.get_query_argument("user", None)  # type: ignore[attr-defined,no-any-return]


class SSE(Identified, SubscriptionSSEHandler):
    pass


class Poll(Identified, SubscriptionPollHandler):
    presence_grace = scaled(2.0)  # longer than any pause between polls here


class Served:
    def __init__(self, server: AppServer, presence: MemoryPresence, users: UserRegistry) -> None:
        self.server = server
        self.presence = presence
        self.users = users
        self.sessions = PollSessions.for_application(server.app)

    async def poll(self, http: httpx.AsyncClient, /, **params: str) -> httpx.Response:
        params.setdefault("topics", "room")
        params.setdefault("timeout", "0")
        return await http.get(self.server.url("/poll"), params=params)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    backend = MemoryBackend(epoch="ep1")
    hub = BroadcastHub(backend, history=100)
    presence = MemoryPresence()
    users = UserRegistry(backend, presence)
    waiter = LongPollWaiter(backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/events", SSE, {"hub": hub, "waiter": waiter}),
            (r"/poll", Poll, {"hub": hub, "waiter": waiter}),
        ],
        longconn_presence=presence,
        longconn_users=users,
        longconn_poll_sessions=PollSessions(buffer=3),
    )
    async with AppServer(app) as server:
        yield Served(server, presence, users)
        PollSessions.for_application(app).close()
    await users.close()
    await waiter.close()
    await hub.close(spread=0)


async def test_long_poll_gets_presence_events_in_topic_order(served: Served) -> None:
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        first = await served.poll(client, client="lp-a", user="ann", presence="1")
        body = first.json()
        assert first.status_code == 200
        # its own join first: the session watches the topic before it joins
        assert [(e["type"], e["member"]["client"]) for e in body["events"]] == [("join", "lp-a")]
        assert body["events"][0]["member"]["transport"] == "longpoll"
        assert await served.presence.presence_stats("room") == PresenceStats(1, 1)
        # a pending poll is answered when someone joins
        pending = asyncio.ensure_future(
            served.poll(client, client="lp-a", presence="1", user="ann", timeout="20")
        )
        await wait_until(
            lambda: (
                served.sessions.get("lp-a") is not None and served.sessions.get("lp-a").polls == 1
            )
        )  # type: ignore[union-attr]
        async with client.stream(
            "GET", served.server.url("/events"), params={"topics": "room", "client": "tab-1"}
        ) as stream:
            await read_events(stream.aiter_lines(), 1)  # ready
            answer = (await pending).json()
            assert [(e["type"], e["member"]["client"]) for e in answer["events"]] == [
                ("join", "tab-1")
            ]
            assert answer["events"][0]["member"]["transport"] == "sse"
            assert answer["messages"] == []
        await wait_until(lambda: served.presence.state.stats("room").connections == 1)
        # between polls the SSE stream closed and a poller joined and left: kept, in order
        other = await served.poll(client, client="lp-b")
        assert other.status_code == 200
        await served.poll(client, client="lp-b", topics="elsewhere")  # lp-b left "room" now
        answer = (await served.poll(client, client="lp-a", presence="1", user="ann")).json()
        seen = [(e["type"], e["member"]["client"]) for e in answer["events"]]
        assert seen == [("leave", "tab-1"), ("join", "lp-b"), ("leave", "lp-b")]
        assert answer["events"][-1]["reason"] == "left"
        assert await served.presence.presence_stats("room") == PresenceStats(1, 1)
        # a poll that names other topics unsubscribes lp-a from room at once
        await served.poll(client, client="lp-a", user="ann", topics="elsewhere")
        assert await served.presence.presence_stats("room") == PresenceStats(0, 0)
    # the sessions expire presence_grace after their last poll
    await wait_until(lambda: served.sessions.stats().sessions == 0)
    assert await served.presence.presence_stats("elsewhere") == PresenceStats(0, 0)
    assert served.sessions.stats().expired == 2


async def test_presence_overflow_is_a_gap(served: Served) -> None:
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        await served.poll(client, client="watcher", presence="1")
        for i in range(5):
            await served.poll(client, client=f"lp-{i}")
        events = (await served.poll(client, client="watcher", presence="1")).json()["events"]
    assert [e["type"] for e in events] == ["join", "join", "join", "presence_gap"]
    assert events[-1] == {"type": "presence_gap", "topic": "room", "reason": "overflow"}
    assert served.sessions.stats().presence_dropped >= 2  # (+ leaves of expired pollers)


async def test_long_poll_and_sse_are_user_connections(served: Served) -> None:
    users = served.users
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        assert (await served.poll(client, client="lp-ann", user="ann")).status_code == 200
        params = {"topics": "room", "client": "sse-ann", "user": "ann"}
        async with client.stream("GET", served.server.url("/events"), params=params) as stream:
            lines = stream.aiter_lines()
            await read_events(lines, 1)  # ready
            found = await users.connections_of("ann")
            assert {(m.client, m.transport) for m in found} == {
                ("lp-ann", "longpoll"),
                ("sse-ann", "sse"),
            }
            # sent while the poller is between polls: nothing lost within its buffer
            await users.send_to_user("ann", {"n": 1})
            await users.send_to_user("ann", {"n": 2})
            (one, two) = await read_events(lines, 2)
            assert one["event"] == "direct"
            assert json.loads(one["data"]) == {"type": "direct", "data": {"n": 1}}
            assert json.loads(two["data"])["data"] == {"n": 2}
            answer = (await served.poll(client, client="lp-ann", user="ann")).json()
            assert answer["events"] == [
                {"type": "direct", "data": {"n": 1}},
                {"type": "direct", "data": {"n": 2}},
            ]
            # past the buffer (3): the oldest kept, the rest counted and reported
            for n in range(5):
                await users.send_to_user("ann", n)
            answer = (await served.poll(client, client="lp-ann", user="ann")).json()
            assert [e.get("data") for e in answer["events"][:3]] == [0, 1, 2]
            assert answer["events"][3] == {"type": "direct_gap", "dropped": 2}
            assert served.sessions.stats().direct_dropped == 2
            await read_events(lines, 5)
            # a pending poll is woken by a message
            pending = asyncio.ensure_future(
                served.poll(client, client="lp-ann", user="ann", timeout="20")
            )
            await wait_until(lambda: served.sessions.get("lp-ann").polls == 1)  # type: ignore[union-attr]
            await users.send_to_user("ann", "wake")
            assert (await pending).json()["events"] == [{"type": "direct", "data": "wake"}]
            await read_events(lines, 1)  # the SSE stream got it too
            # disconnect: the SSE stream's last event, the pending poll's answer
            pending = asyncio.ensure_future(
                served.poll(client, client="lp-ann", user="ann", timeout="20")
            )
            await wait_until(lambda: served.sessions.get("lp-ann").polls == 1)  # type: ignore[union-attr]
            await users.disconnect_user("ann", 4403, "revoked")
            (final,) = await read_events(lines, 1)
            assert final["event"] == "disconnect"
            assert json.loads(final["data"]) == {
                "type": "disconnect",
                "code": 4403,
                "reason": "revoked",
            }
            with pytest.raises(AssertionError, match="stream ended"):
                await read_events(lines, 1)
            refused = await pending
            assert refused.status_code == 403
            assert refused.json() == {
                "code": "disconnected",
                "close_code": 4403,
                "reason": "revoked",
            }
        # further polls and streams with those ids are refused; a new id is not
        again = await served.poll(client, client="lp-ann", user="ann")
        assert again.status_code == 403 and again.json()["close_code"] == 4403
        again = await client.get(served.server.url("/events"), params=params)
        assert again.status_code == 403 and again.json()["code"] == "disconnected"
        assert (await served.poll(client, client="lp-ann-2", user="ann")).status_code == 200
        assert {m.client for m in await users.connections_of("ann")} == {"lp-ann-2"}
    stats = served.sessions.stats()
    assert (stats.disconnected, stats.refused, stats.revoked) == (2, 2, 2)


async def test_disconnect_codes_map_to_statuses(served: Served) -> None:
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        for n, (code, status) in enumerate([(4401, 401), (1001, 503), (4429, 429), (1000, 403)]):
            user = f"u{n}"
            assert (await served.poll(client, client=user, user=user)).status_code == 200
            await served.users.disconnect_user(user, code, "bye")
            answer = await served.poll(client, client=user, user=user)
            assert (answer.status_code, answer.json()["close_code"]) == (status, code)
            assert disconnect_status(code) == status


def test_revoked_ids_expire_and_are_bounded() -> None:
    sessions = PollSessions(revoked_ttl=10.0)
    sessions.revoke("a", 4403, "x", now=100.0)
    assert sessions.revoked("a", now=109.0) == (4403, "x")
    assert sessions.revoked("a", now=110.0) is None
    assert sessions.stats().revoked == 0 and sessions.stats().refused == 1
    with pytest.raises(ValueError, match="buffer"):
        PollSessions(buffer=0)


async def test_presence_families_in_metrics(served: Served) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from tornado_longconn.metrics import LongConnCollector

    registry = CollectorRegistry()
    registry.register(LongConnCollector(application=served.server.app, topic_labels=5))
    async with httpx.AsyncClient(timeout=scaled(20)) as client:
        await served.poll(client, client="a", user="ann", topics="room,hall")
        await served.poll(client, client="b", user="bob")
        await served.poll(client, client="b", user="bob", topics="hall")  # leaves room
        await served.users.disconnect_user("bob", 4403, "revoked")
        assert (await served.poll(client, client="b", user="bob")).status_code == 403
    text = generate_latest(registry).decode()
    lines = set(text.splitlines())
    # memberships: a in room and hall, and a's user registry entry (b was disconnected)
    assert "longconn_presence_members 3.0" in lines
    assert "longconn_presence_joins_total 6.0" in lines  # a: 3; b: room, user#bob, hall
    assert "longconn_presence_leaves_total 3.0" in lines  # b: room, then hall and user#bob
    assert "longconn_poll_sessions 1.0" in lines
    assert "longconn_user_disconnects_total 1.0" in lines
    assert "longconn_user_disconnected_refused_total 1.0" in lines
    assert 'longconn_user_events_dropped_total{kind="direct"} 0.0' in lines
    assert 'longconn_topic_presence_members{topic="hall"} 1.0' in lines
    assert 'longconn_topic_presence_members{topic="room"} 1.0' in lines
    assert "user#" not in text


async def test_inspection_fills_presence_cluster() -> None:
    from tornado_longconn.inspection import InspectionHandler
    from tornado_longconn.presence import Member

    presence = MemoryPresence(process="p1")
    presence.join_nowait("room", Member("c1", "ann"))
    presence.join_nowait("room", Member("c2", "ann"))
    presence.join_nowait("hall", Member("c3", None))
    presence.join_nowait("user#ann", Member("c1", "ann"))
    app = tornado.web.Application(
        [(r"/inspect", InspectionHandler, {"authorize": lambda request: True})],
        longconn_presence=presence,
    )
    async with AppServer(app) as server, httpx.AsyncClient(timeout=scaled(20)) as client:
        doc = (await client.get(server.url("/inspect"))).json()
    assert doc["presence"]["cluster"] == {
        "process": "p1",
        "held": 4,
        "topics": {
            "room": {"connections": 2, "users": 1},
            "hall": {"connections": 1, "users": 0},
        },
    }


@pytest.mark.parametrize("transport", ["longpoll", "sse"])
async def test_python_client_over_http_gets_presence_and_is_disconnected(
    served: Served, transport: str
) -> None:
    from tornado_longconn.client import ClientError, PresenceChange, connect

    base = served.server.url("")
    async with connect(
        "ws://127.0.0.1:1/unused?user=ann",
        sse_url=base + "/events?user=ann",
        poll_url=base + "/poll?user=ann",
        transports=[transport],
        open_timeout=scaled(10),
        poll_timeout=scaled(5),
    ) as client:
        room = await client.subscribe("room", params={"presence": True})
        first = client.presence_client
        event = await room.get(scaled(10))
        assert isinstance(event, PresenceChange) and event.kind == "join"
        assert event.member["client"] == first and event.member["transport"] == transport
        async with httpx.AsyncClient(timeout=scaled(20)) as http:
            await served.poll(http, client="other", user="bob")
        event = await room.get(scaled(10))
        assert isinstance(event, PresenceChange) and event.member["client"] == "other"
        assert {m.client for m in await served.users.connections_of("ann")} == {first}
        await served.users.disconnect_user("ann", 4403, "revoked")
        with pytest.raises(ClientError) as raised:  # noqa: PT012 (drain until the end)
            while True:
                await room.get(scaled(10))
        assert raised.value.code == "forbidden"
        assert client.presence_client != first
