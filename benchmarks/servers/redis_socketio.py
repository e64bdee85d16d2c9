"""Peer of the Redis fan-out benchmark: python-socketio with ``AsyncRedisManager`` on Tornado.

Usage: ``python -m benchmarks.servers.redis_socketio --redis URL --prefix P --expect N``. A
``socketio.AsyncServer(async_mode="tornado")`` whose client manager is
``socketio.AsyncRedisManager(URL, channel=P + "sio")``, served by Tornado at
``/socket.io/`` (``socketio.get_tornado_handler``). Each client that connects to
the default namespace enters the room ``bench``; once ``N`` did, the process
counts itself in Redis (``INCR <P>joined``). The publisher process emits with
``AsyncRedisManager(URL, channel=P + "sio", write_only=True).emit("m", text,
room="bench")``, which every server process receives on its one pub/sub
subscription and sends to the room's members as ``42["m","<text>"]`` text frames.
"""

from __future__ import annotations

import argparse
from typing import Any

import redis.asyncio as aioredis
import socketio  # type: ignore[import-untyped,unused-ignore]
import tornado.httpserver
import tornado.netutil
import tornado.web

from benchmarks.harness import serve_until_sigterm

__all__ = ["ROOM", "channel", "main"]

#: The room every client enters, and the publisher emits to.
ROOM = "bench"


def channel(prefix: str) -> str:
    """The ``AsyncRedisManager`` pub/sub channel of the run with key prefix ``prefix``."""
    return prefix + "sio"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default="bench:")
    p.add_argument("--expect", type=int, required=True, help="clients this process will get")
    args = p.parse_args()
    keep: list[Any] = []

    async def start() -> int:
        counter = aioredis.Redis.from_url(args.redis)
        manager = socketio.AsyncRedisManager(args.redis, channel=channel(args.prefix))
        sio = socketio.AsyncServer(async_mode="tornado", client_manager=manager)
        live = [0]

        async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
            await sio.enter_room(sid, ROOM)
            live[0] += 1
            if live[0] == args.expect:
                await counter.incr(args.prefix + "joined")

        sio.on("connect", connect)
        app = tornado.web.Application([(r"/socket.io/", socketio.get_tornado_handler(sio))])
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", backlog=8192)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        keep.extend([counter, sio, server])
        return int(sockets[0].getsockname()[1])

    serve_until_sigterm(start)


if __name__ == "__main__":
    main()
