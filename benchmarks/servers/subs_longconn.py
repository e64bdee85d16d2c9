"""Subscriptions benchmark server: ``SubscriptionMixin`` on the in-memory or Redis backend.

Usage: ``python -m benchmarks.servers.subs_longconn [--redis URL --prefix P]``.
Clients speak the subscriptions protocol at ``/ws`` (subscribe to their topics).
The benchmark triggers the publishing with ``POST /publish?topics=T&count=N&size=S``:
``N`` rounds, each publishing one message to every topic ``t0`` ... ``t<T-1>``
(a JSON string ``"<topic> <seq:016x> <pad>"`` of ``S`` characters, built by
:func:`benchmarks.servers.subs_socketio.text`), one event-loop iteration per
round; the answer comes when the last round was published. On Redis the command
pool's connections are opened before the port is announced. The report route
``POST /report?kind=RSS`` emits ``RSS`` (after a garbage collection) and
``STATS`` the hub's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from benchmarks.harness import query_int, report_route, serve_until_sigterm
from benchmarks.servers.subs_socketio import rss, text
from tornado_longconn import BroadcastHub, SubscriptionMixin, stats_dict, subscription_group
from tornado_longconn.backends import backend_from_url

__all__ = ["main"]


class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    """The protocol handler: every topic may be read; clients publish nothing."""

    max_topics = 100

    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub

    def check_origin(self, origin: str) -> bool:
        return True


class Publish(tornado.web.RequestHandler):
    """``POST /publish?topics=&count=&size=``: publish rounds server-side."""

    def initialize(self, hub: BroadcastHub) -> None:
        self.hub = hub

    async def post(self) -> None:
        topics = query_int(self, "topics")
        count = query_int(self, "count")
        size = query_int(self, "size")
        start = query_int(self, "start", 0)
        groups = [subscription_group(self.hub, f"t{t}") for t in range(topics)]
        nowait = hasattr(self.hub.backend, "publish_nowait")
        for seq in range(start, start + count):
            for group in groups:
                data = json.dumps(text(group.name, seq, size))
                if nowait:
                    group.publish_nowait(data)
                else:
                    await group.publish(data)
            await asyncio.sleep(0)  # one round per loop iteration: the writers flush
        self.finish("ok")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis", default=None, help="Redis URL (default: in-memory backend)")
    p.add_argument("--prefix", default="subs:")
    args = p.parse_args()
    backend: Any = None
    if args.redis:
        backend = backend_from_url(args.redis, prefix=args.prefix)
    hub = BroadcastHub(backend, history=1000, high_water=1 << 20)

    def measured_rss() -> int:
        gc.collect()
        return rss()

    app = tornado.web.Application(
        [
            (r"/ws", Live, {"hub": hub}),
            (r"/publish", Publish, {"hub": hub}),
            report_route(RSS=measured_rss, STATS=lambda: stats_dict(hub.stats())),
        ]
    )

    async def start() -> int:
        if args.redis:
            # Open the command pool's connections before clients come, as a service
            # does at start: under a storm of handshakes a cold pool's connects time out.
            await hub.start()
            await asyncio.gather(*(hub.backend.head(f"warm-up-{i}") for i in range(64)))
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", socket.AF_INET, backlog=4096)
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    serve_until_sigterm(start)


if __name__ == "__main__":
    main()
