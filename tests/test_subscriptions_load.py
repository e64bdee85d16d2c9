"""1,000 connections x 10 topics over the subscriptions protocol, 5% of the clients stopped.

The clients that read lose nothing (every message of each of their topics, in
order, once); the stopped ones cost at most their writer's high-water mark
(then the ``CLOSE`` policy closes them as slow consumers); the server's buffers
stay bounded. Real sockets on 127.0.0.1, the library's fault-injecting client.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import tornado.web
import tornado.websocket

from tornado_longconn import BroadcastHub, MemoryBackend, SubscriptionMixin, subscription_group
from tornado_longconn.log import parse_cursor
from tornado_longconn.testing import AppServer, WebSocketTestClient, connect_many, scaled

CONNECTIONS = 1000
TOPICS = 100
PER_CONNECTION = 10
MESSAGES = 10  # per topic
HIGH_WATER = 8 * 1024
PAYLOAD = "x" * 300

pytestmark = pytest.mark.timeout(120)


class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub

    def open(self, *args: str, **kwargs: str) -> None:
        if self.get_query_argument("small", None):
            # A small kernel send buffer: a client that stops reading fills the
            # writer soon (as a phone on a bad network does after a while).
            sock = self.ws_connection.stream.socket  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().open(*args, **kwargs)


def topics_of(n: int) -> list[str]:
    return [f"room:{(n * 7 + k * 13) % TOPICS}" for k in range(PER_CONNECTION)]


async def test_thousand_connections_ten_topics_stopped_clients_cost_nothing_to_others() -> None:
    hub = BroadcastHub(MemoryBackend(epoch="load"), history=MESSAGES, high_water=HIGH_WATER)
    app = tornado.web.Application([(r"/ws", Live, {"hub": hub})])
    async with AppServer(app) as server:
        url = server.ws_url("/ws")
        stopped_count = CONNECTIONS // 20
        readers = await connect_many(url, CONNECTIONS - stopped_count)
        stopped = await connect_many(url + "?small=1", stopped_count, rcvbuf=4096)
        clients = readers + stopped
        try:
            for n, client in enumerate(clients):
                for k, topic in enumerate(topics_of(n)):
                    await client.send(json.dumps({"type": "subscribe", "id": k, "topic": topic}))
            for client in clients:
                frames = [
                    json.loads(f) for f in await client.recv_many(1 + PER_CONNECTION, scaled(60))
                ]
                assert frames[0]["type"] == "welcome"
                assert all(f["type"] == "subscribed" for f in frames[1:]), frames
            for client in stopped:
                client.stop_reading()
            groups = [subscription_group(hub, f"room:{t}") for t in range(TOPICS)]
            for i in range(MESSAGES):
                for group in groups:
                    group.publish_nowait(json.dumps({"i": i, "pad": PAYLOAD}))
                await asyncio.sleep(0)  # one loop iteration per round, as a server would
            await asyncio.gather(*(check_everything(n, c) for n, c in enumerate(readers)))
            stats = hub.stats()
            assert stats.members == len(readers) * PER_CONNECTION
            # Bounded: no writer ever held more than its high-water mark plus one frame.
            assert stats.peak_buffered <= HIGH_WATER + len(PAYLOAD) + 200
            assert stats.dropped == 0
            # The stopped clients were closed as slow consumers (4000) once their
            # writer passed its high-water mark; the members left their groups.
            assert stats.closed_slow == stopped_count * PER_CONNECTION
            for client in stopped:
                client.resume_reading()
                await client.wait_closed(scaled(30))
                # 4000 when the close frame got through, else the connection was reset
                # after the writer's close grace (the client read nothing for that long).
                assert client.close_code in (4000, None)
        finally:
            for client in clients:
                client.vanish()
    await hub.close(spread=0)


async def check_everything(n: int, client: WebSocketTestClient) -> None:
    frames: list[Any] = [
        json.loads(f) for f in await client.recv_many(PER_CONNECTION * MESSAGES, scaled(60))
    ]
    seen: dict[str, list[int]] = {}
    for frame in frames:
        seen.setdefault(frame["topic"], []).append(parse_cursor(frame["cursor"]).offset)
        assert frame["data"]["pad"] == PAYLOAD
    assert seen == {topic: list(range(1, MESSAGES + 1)) for topic in topics_of(n)}
