"""Peer of the Redis fan-out benchmark: Django Channels with channels_redis.

Usage: ``python -m benchmarks.servers.redis_channels LAYER --redis URL --prefix P --expect N`` with
LAYER ``core`` (``channels_redis.core.RedisChannelLayer``) or ``pubsub``
(``channels_redis.pubsub.RedisPubSubChannelLayer``). An ASGI app on uvicorn: each
WebSocket consumer joins the group ``bench`` (``group_add``) on connect; a
message sent with ``group_send("bench", {"type": "bench.msg", "data": bytes})``
is forwarded to the client as a binary frame. Once ``N`` consumers joined, the
process counts itself in Redis (``INCR <P>joined``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any

import django
import redis.asyncio as aioredis
from django.conf import settings

from benchmarks.harness import serve_until_sigterm

__all__ = ["channel_layers", "main"]


def channel_layers(layer: str, url: str, prefix: str) -> dict[str, Any]:
    """The ``CHANNEL_LAYERS`` setting for ``layer`` (``core`` or ``pubsub``)."""
    backend = {
        "core": "channels_redis.core.RedisChannelLayer",
        "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    }[layer]
    return {
        "default": {
            "BACKEND": backend,
            "CONFIG": {
                # redis-py 8 defaults to a 5 s socket timeout, which the core layer's
                # 5 s blocking pops exceed: give reads room.
                "hosts": [{"address": url, "socket_timeout": 30}],
                "prefix": prefix + "ch",
                "capacity": 10_000,
            },
        }
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("layer", choices=["core", "pubsub"])
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default="bench:")
    p.add_argument("--expect", type=int, required=True)
    args = p.parse_args()
    settings.configure(CHANNEL_LAYERS=channel_layers(args.layer, args.redis, args.prefix))
    django.setup()

    import uvicorn
    from channels.consumer import get_handler_name
    from channels.generic.websocket import AsyncWebsocketConsumer
    from channels.routing import URLRouter
    from django.urls import path

    counter = aioredis.Redis.from_url(args.redis)
    live = [0]

    class Bench(AsyncWebsocketConsumer):
        async def dispatch(self, message: dict[str, Any]) -> None:
            # Skips Channels' per-message close_old_connections() thread hop: there
            # is no database here, and it only makes the peer slower.
            handler = getattr(self, get_handler_name(message), None)
            if handler is None:
                raise ValueError(f"no handler for message type {message['type']}")
            await handler(message)

        async def connect(self) -> None:
            await self.channel_layer.group_add("bench", self.channel_name)
            await self.accept()
            live[0] += 1
            if live[0] == args.expect:
                await counter.incr(args.prefix + "joined")

        async def bench_msg(self, event: dict[str, Any]) -> None:
            await self.send(bytes_data=event["data"])

    app = URLRouter([path("ws", Bench.as_asgi())])

    async def start() -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8192)
        config = uvicorn.Config(app, log_level="error", lifespan="off", ws="websockets")
        server = uvicorn.Server(config)
        asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        return int(sock.getsockname()[1])

    serve_until_sigterm(start)


if __name__ == "__main__":
    main()
