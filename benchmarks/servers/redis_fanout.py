"""Server process of the cross-process fan-out benchmark (``bench_redis.py``).

Usage: ``python -m benchmarks.servers.redis_fanout VARIANT --redis URL --prefix P --expect N``. Clients
connect to ``/ws``; once ``N`` members receive live messages the process counts
itself in Redis (``INCR <P>joined``), so the publisher process knows when every
client of every process is ready. Messages published to the topic ``bench`` are written to every
member as binary frames.

* ``ours``: ``RedisBackend`` + ``BroadcastHub``/``BroadcastGroup`` with history
  (1,000 messages kept), ``room.join(self)``. With ``--backend URL`` the backend
  is :func:`~tornado_longconn.backends.backend_from_url`'s for that URL
  (``redis+cluster://``, ``redis+sentinel://``, ``nats://``) and ``--redis`` only
  holds the ready counter.
* ``plain``: the hand-written floor: ``redis.asyncio`` pub/sub subscribed once per
  process, each message's WebSocket frame built once and written straight to every
  handler's ``IOStream`` from a ``set`` of handlers (no history, no cursors, no
  backpressure, no resync).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import redis.asyncio as aioredis
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from benchmarks.harness import serve_until_sigterm
from tornado_longconn.backends import backend_from_url
from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.broadcast import BroadcastGroup, BroadcastHub

__all__ = ["main"]

TOPIC = "bench"


class Ready:
    """Counts live members; tells Redis once this process has all it expects."""

    def __init__(self, counter: Any, key: str, expect: int) -> None:
        self.counter = counter
        self.key = key
        self.expect = expect
        self.live = 0

    async def joined(self) -> None:
        self.live += 1
        if self.live == self.expect:
            await self.counter.incr(self.key)


class OursSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, room: BroadcastGroup, ready: Ready) -> None:
        self.room = room
        self.ready = ready

    async def open(self) -> None:  # type: ignore[override]
        await self.room.join(self)  # live once this resolves
        await self.ready.joined()

    def on_message(self, message: str | bytes) -> None:
        pass


class PlainSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, members: set[Any], ready: Ready) -> None:
        self.members = members
        self.ready = ready

    async def open(self) -> None:  # type: ignore[override]
        self.members.add(self)
        await self.ready.joined()

    def on_close(self) -> None:
        self.members.discard(self)

    def on_message(self, message: str | bytes) -> None:
        pass


async def plain_pump(client: Any, channel: str, members: set[Any], ready: asyncio.Event) -> None:
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    ready.set()
    async for item in pubsub.listen():
        if item["type"] != "message":
            continue
        data = item["data"]
        # The frame is built once (unmasked binary, < 64 KiB) and written as is.
        n = len(data)
        head = bytes([0x82, n]) if n < 126 else bytes([0x82, 126]) + n.to_bytes(2, "big")
        frame = head + data
        for member in list(members):
            conn = member.ws_connection
            if conn is None or conn.stream.closed():
                members.discard(member)
                continue
            conn.stream.write(frame)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variant", choices=["ours", "plain"])
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default="bench:")
    p.add_argument("--backend", default=None, help="backend URL for 'ours' (default: --redis)")
    p.add_argument("--expect", type=int, required=True, help="clients this process will get")
    args = p.parse_args()
    keep: list[Any] = []

    async def start() -> int:
        counter = aioredis.Redis.from_url(args.redis)
        ready = Ready(counter, args.prefix + "joined", args.expect)
        if args.variant == "ours":
            backend: Any = (
                backend_from_url(args.backend, prefix=args.prefix.replace(":", ""))
                if args.backend and args.backend.startswith("nats")
                else backend_from_url(args.backend, prefix=args.prefix)
                if args.backend
                else RedisBackend(args.redis, prefix=args.prefix)
            )
            await backend.start()
            hub = BroadcastHub(backend, history=1000)
            room = hub.group(TOPIC)
            keep.extend([backend, hub])
            handlers: list[Any] = [(r"/ws", OursSocket, {"room": room, "ready": ready})]
        else:
            members: set[Any] = set()
            subscribed = asyncio.Event()
            pump = plain_pump(counter, args.prefix + TOPIC, members, subscribed)
            keep.append(asyncio.create_task(pump))
            await subscribed.wait()
            handlers = [(r"/ws", PlainSocket, {"members": members, "ready": ready})]
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", backlog=8192)
        server = tornado.httpserver.HTTPServer(tornado.web.Application(handlers))
        server.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    serve_until_sigterm(start)


if __name__ == "__main__":
    main()
