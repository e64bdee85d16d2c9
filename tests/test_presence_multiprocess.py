"""Presence across three real server processes on one Redis, with clients on each.

Every client sees the same members once joins settle; a process killed with
SIGKILL has its members leave everywhere within the TTL (+ the reap
interval), one ``leave`` event each. Run as a script (``--serve``) this file is
one server process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REDIS_URL, require_redis
from tests.server_process import ServerProcess, serve_until_signal
from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.presence_redis import RedisPresence
from tornado_longconn.presence_users import UserRegistry
from tornado_longconn.testing import scaled

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]


# ---------------------------------------------------------------------- the server


async def serve(redis_url: str, prefix: str, ttl: float) -> None:
    """One server process: the subscriptions protocol with Redis presence on ``/ws``."""
    import tornado.web
    import tornado.websocket

    from tornado_longconn import BroadcastHub
    from tornado_longconn.backends.redis import RedisBackend
    from tornado_longconn.longpoll import LongPollWaiter
    from tornado_longconn.presence_redis import RedisPresence
    from tornado_longconn.presence_users import UserRegistry
    from tornado_longconn.subscriptions import SubscriptionMixin
    from tornado_longconn.subscriptions_http import (
        SubscriptionPollHandler,
        SubscriptionSSEHandler,
    )

    class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
        def get_current_user(self) -> str | None:
            return self.get_query_argument("user", None)

    class SSE(SubscriptionSSEHandler):
        def get_current_user(self) -> str | None:
            return self.get_query_argument("user", None)

    class Poll(SubscriptionPollHandler):
        def get_current_user(self) -> str | None:
            return self.get_query_argument("user", None)

    backend = RedisBackend(redis_url, prefix=prefix, reconnect_base=0.02, reconnect_cap=0.5)
    await backend.start()
    hub = BroadcastHub(backend)
    presence = RedisPresence(backend, ttl=ttl)
    await presence.start()
    users = UserRegistry(backend, presence)
    waiter = LongPollWaiter(backend, linger=0)
    app = tornado.web.Application(
        [
            (r"/ws", Live),
            (r"/events", SSE, {"hub": hub, "waiter": waiter}),
            (r"/poll", Poll, {"hub": hub, "waiter": waiter}),
        ],
        longconn_hub=hub,
        longconn_presence=presence,
        longconn_users=users,
    )
    server = await serve_until_signal(app)
    await waiter.close()
    await users.close()
    await presence.close()
    await hub.close(spread=0)
    await server.close_all_connections()
    await backend.close()


# ---------------------------------------------------------------------- the test side


def presence_server(prefix: str, ttl: float, redis_url: str = REDIS_URL) -> ServerProcess:
    """This file's ``--serve`` process on ``redis_url`` with key prefix ``prefix``."""
    return ServerProcess(
        __file__, "--serve", "--redis", redis_url, "--prefix", prefix, "--ttl", repr(ttl)
    )


class Client:
    """A protocol client that records every frame (of a :func:`presence_server` or a demo server)."""

    def __init__(self, ws: Any, client_id: str) -> None:
        self.ws = ws
        self.id = client_id
        self.frames: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())
        self._next = 0

    @classmethod
    async def connect(cls, server: ServerProcess, user: str) -> Client:
        from websockets.asyncio.client import connect

        ws = await connect(f"ws://127.0.0.1:{server.port}/ws?user={user}")
        welcome = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
        return cls(ws, welcome["client"])

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame.get("type") == "ping":  # the demo's application heartbeat
                    await self.ws.send('{"type":"pong"}')
                    continue
                self.frames.append(frame)
                self.changed.set()
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._next += 1
        rid = self._next
        await self.ws.send(json.dumps({"type": kind, "id": rid, **fields}))
        await self.until(lambda: any(f.get("id") == rid for f in self.frames), scaled(10))
        return next(f for f in self.frames if f.get("id") == rid)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_three_processes_agree_and_a_killed_one_leaves_once() -> None:
    await require_redis()
    pytest.importorskip("websockets.asyncio.client")
    prefix = f"test:presence-mp:{secrets.token_hex(4)}:"
    ttl = scaled(1.5)
    servers = [presence_server(prefix, ttl) for _ in range(3)]
    clients: list[Client] = []
    try:
        await asyncio.gather(*(s.start() for s in servers))
        for i, server in enumerate(servers):
            for _ in range(2):
                clients.append(await Client.connect(server, f"u{i}"))
        for client in clients:
            answer = await client.request("subscribe", topic="room", params={"presence": True})
            assert answer["type"] == "subscribed"
        # A client's own join event is published by the script that stored it:
        # once every client has seen its own, every join is in Redis.
        for client in clients:
            await client.until(
                lambda c=client: any(e["member"]["client"] == c.id for e in c.events("join")),
                scaled(10),
            )
        everyone = {c.id for c in clients}
        for client in clients:
            answer = await client.request("presence", topic="room")
            assert {m["client"] for m in answer["members"]} == everyone
            assert (answer["connections"], answer["users"]) == (6, 3)
            assert {m["transport"] for m in answer["members"]} == {"websocket"}

        # The user registry, from a fourth process (this one): connections on every
        # process, a message to each of them, a disconnect of each.
        backend = RedisBackend(REDIS_URL, prefix=prefix)
        await backend.start()
        store = RedisPresence(backend, ttl=ttl)
        await store.start()
        users = UserRegistry(backend, store)
        try:
            found = await users.connections_of("u1")
            assert {m.client for m in found} == {c.id for c in clients[2:4]}
            await users.send_to_user("u1", {"text": "hi"})
            for client in clients[2:4]:
                await client.until(lambda c=client: bool(c.events("direct")), scaled(10))
                assert client.events("direct") == [{"type": "direct", "data": {"text": "hi"}}]
            assert not any(c.events("direct") for c in clients[:2] + clients[4:])
            seen: list[Any] = []
            left = asyncio.Event()

            def on_leave(event: Any) -> None:
                seen.append(event)
                if sum(1 for e in seen if e.kind == "leave") == 2:
                    left.set()

            await store.watch("user#u2", on_leave)
            await users.disconnect_user("u2", 4403, "revoked")
            for client in clients[4:6]:
                await asyncio.wait_for(client.ws.wait_closed(), scaled(10))
                assert (client.ws.close_code, client.ws.close_reason) == (4403, "revoked")
            await asyncio.wait_for(left.wait(), scaled(10))
            assert await users.connections_of("u2") == []
        finally:
            await users.close()
            await store.close()
            await backend.close()
        for client in clients[4:]:
            await client.close()
        # a watching client on the third process again
        again = await Client.connect(servers[2], "w")
        clients = [*clients[:4], again]
        await again.request("subscribe", topic="room", params={"presence": True})
        await again.until(
            lambda: any(e["member"]["client"] == again.id for e in again.events("join")),
            scaled(10),
        )
        everyone = {c.id for c in clients}

        # kill -9 the first process: its two members leave everywhere, once each
        dead = {c.id for c in clients[:2]}
        survivors = clients[2:]
        await servers[0].stop(signal.SIGKILL)
        bound = ttl + 1.0 + scaled(1.0)  # the TTL + the reap interval (1 s), + delivery

        def expired(c: Client) -> list[str]:
            return [
                e["member"]["client"] for e in c.events("leave") if e.get("reason") == "expired"
            ]

        await asyncio.gather(
            *(c.until(lambda c=c: set(expired(c)) >= dead, bound) for c in survivors)
        )
        # A later join is ordered after every leave the reapers published before it.
        late = await Client.connect(servers[1], "late")
        clients.append(late)
        await late.request("subscribe", topic="room")
        for client in survivors:
            await client.until(
                lambda c=client: any(e["member"]["client"] == late.id for e in c.events("join")),
                scaled(10),
            )
            assert sorted(expired(client)) == sorted(dead)  # one leave each
        answer = await survivors[0].request("presence", topic="room")
        assert {m["client"] for m in answer["members"]} == (everyone - dead) | {late.id}
        assert (answer["connections"], answer["users"]) == (4, 3)
        # the dead process's user connections were reaped with its topic members
        backend = RedisBackend(REDIS_URL, prefix=prefix)
        await backend.start()
        try:
            store = RedisPresence(backend, ttl=ttl)
            assert await UserRegistry(backend, store).connections_of("u0") == []
        finally:
            await backend.close()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for server in servers:
            await server.stop()


async def test_user_sse_and_long_poll_on_another_process_are_reached() -> None:
    """Process B holds a user's SSE stream and long-poll session; this process (A) finds
    them with connections_of, reaches them with send_to_user and ends them with
    disconnect_user."""
    await require_redis()
    import httpx

    from tests.test_subscriptions_http import read_events

    prefix = f"test:presence-http-mp:{secrets.token_hex(4)}:"
    server = presence_server(prefix, scaled(5.0))
    backend = RedisBackend(REDIS_URL, prefix=prefix)
    store = RedisPresence(backend, ttl=scaled(5.0))
    users = UserRegistry(backend, store)
    try:
        await server.start()
        await backend.start()
        await store.start()
        joins: list[Any] = []
        both = asyncio.Event()

        def on_join(event: Any) -> None:
            joins.append(event)
            if sum(1 for e in joins if e.kind == "join") == 2:
                both.set()

        await store.watch("user#u9", on_join)
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(timeout=scaled(20)) as http:
            poll = {"topics": "room", "client": "lp-9", "user": "u9", "timeout": "0"}
            assert (await http.get(base + "/poll", params=poll)).status_code == 200
            params = {"topics": "room", "client": "sse-9", "user": "u9"}
            async with http.stream("GET", base + "/events", params=params) as stream:
                lines = stream.aiter_lines()
                await read_events(lines, 1)  # ready
                # B reports a connection present once it is subscribed to the user
                await asyncio.wait_for(both.wait(), scaled(10))
                found = {(m.client, m.transport) for m in await users.connections_of("u9")}
                assert found == {("lp-9", "longpoll"), ("sse-9", "sse")}
                assert {m.process for m in await users.connections_of("u9")} != {store.process}
                await users.send_to_user("u9", {"text": "hi"})
                (direct,) = await asyncio.wait_for(read_events(lines, 1), scaled(10))
                assert json.loads(direct["data"]) == {"type": "direct", "data": {"text": "hi"}}
                answer = (await http.get(base + "/poll", params=poll)).json()
                assert answer["events"] == [{"type": "direct", "data": {"text": "hi"}}]
                pending = asyncio.ensure_future(
                    http.get(base + "/poll", params=dict(poll, timeout="20"))
                )
                await users.disconnect_user("u9", 4401, "session expired")
                (final,) = await asyncio.wait_for(read_events(lines, 1), scaled(10))
                assert final["event"] == "disconnect"
                assert json.loads(final["data"])["code"] == 4401
                refused = await pending
                # the disconnect answered the pending poll, or refused it on arrival
                assert refused.status_code == 401
                assert refused.json() == {
                    "code": "disconnected",
                    "close_code": 4401,
                    "reason": "session expired",
                }
            assert (await http.get(base + "/poll", params=poll)).status_code == 401
    finally:
        await users.close()
        await store.close()
        await backend.close()
        await server.stop()


async def test_redis_restart_rebuilds_presence_without_the_dead(tmp_path: Path) -> None:
    """Redis restarts empty right after a process was killed: the two live processes
    report their members again; the dead one's never come back."""
    pytest.importorskip("websockets.asyncio.client")
    from tests.backends.redisproc import REDIS_SERVER, RedisProcess

    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    redis = RedisProcess()
    await redis.start()
    ttl = scaled(1.5)
    servers = [presence_server("test:presence-restart:", ttl, redis.url) for _ in range(3)]
    clients: list[Client] = []
    try:
        await asyncio.gather(*(s.start() for s in servers))
        for i, server in enumerate(servers):
            client = await Client.connect(server, f"u{i}")
            clients.append(client)
            await client.request("subscribe", topic="room", params={"presence": True})
        for client in clients:
            await client.until(
                lambda c=client: any(e["member"]["client"] == c.id for e in c.events("join")),
                scaled(10),
            )
        await servers[0].stop(signal.SIGKILL)
        await redis.restart()
        survivors = {c.id for c in clients[1:]}
        for client in clients[1:]:
            # Told that events were missed, a client reads the members again, then
            # applies the events that follow (the survivors report themselves again).
            await client.until(lambda c=client: bool(c.events("presence_gap")), scaled(15))
            start = len(client.frames)
            answer = await client.request("presence", topic="room")
            for _ in range(20):  # Redis may answer the pub/sub before the command pool
                if answer["type"] != "error":
                    break
                assert answer["code"] == "unavailable"
                answer = await client.request("presence", topic="room")
            assert answer["type"] == "presence"
            view = {m["client"] for m in answer["members"]}

            def current(c: Client = client, base: set[str] = view, mark: int = start) -> set[str]:
                seen = set(base)
                for frame in c.frames[mark:]:
                    if frame.get("type") == "join":
                        seen.add(frame["member"]["client"])
                    elif frame.get("type") == "leave":
                        seen.discard(frame["member"]["client"])
                return seen

            await client.until(lambda f=current: f() == survivors, ttl + scaled(10))
            assert clients[0].id not in current()
        answer = await clients[1].request("presence", topic="room")
        assert {m["client"] for m in answer["members"]} == survivors
        assert (answer["connections"], answer["users"]) == (2, 2)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for server in servers:
            await server.stop()
        await redis.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--redis", default=REDIS_URL)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--ttl", type=float, default=1.5)
    args = parser.parse_args()
    asyncio.run(serve(args.redis, args.prefix, args.ttl))


if __name__ == "__main__":
    main()


async def test_demo_member_list_is_right_on_three_processes(tmp_path: Path) -> None:
    """The demo's member list comes from presence: the same on every process, and a
    process killed with SIGKILL drops out of it within the TTL."""
    await require_redis()
    pytest.importorskip("websockets.asyncio.client")
    from tests.test_demo import DemoServer

    prefix = f"test:presence-demo:{secrets.token_hex(4)}:"
    ttl = scaled(1.5)
    args = ("--redis", REDIS_URL, "--redis-prefix", prefix, "--presence-ttl", repr(ttl))
    servers = [DemoServer(tmp_path / f"uploads{i}", *args) for i in range(3)]
    clients: list[Client] = []

    def members(client: Client) -> set[str] | None:
        """The users of the last presence snapshot ``client`` received (None: none yet)."""
        snapshots = [
            f["data"]
            for f in client.frames
            if f.get("topic") == "room:lobby"
            and isinstance(f.get("data"), dict)
            and f["data"].get("type") == "presence"
        ]
        return {m["user"] for m in snapshots[-1]["members"]} if snapshots else None

    try:
        await asyncio.gather(*(s.start() for s in servers))
        for i, server in enumerate(servers):
            client = await Client.connect(server, f"u{i}")  # type: ignore[arg-type]
            clients.append(client)
            answer = await client.request("subscribe", topic="room:lobby")
            assert answer["type"] == "subscribed"
        everyone = {"u0", "u1", "u2"}
        for client in clients:
            await client.until(lambda c=client: members(c) == everyone, scaled(15))
        assert servers[0].proc is not None
        servers[0].proc.kill()
        await servers[0].proc.wait()
        bound = ttl + 1.0 + scaled(2.0)  # the TTL + the reap interval (1 s), + delivery
        for client in clients[1:]:
            await client.until(lambda c=client: members(c) == {"u1", "u2"}, bound)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for server in servers:
            await server.stop()
