"""One server process of the cross-process connection cap tests.

``python tests/caps_server.py --redis redis://127.0.0.1:6379/0 --prefix p: --cap 50``
serves on a free port of 127.0.0.1 (printed as ``READY <port>``), behind a
trusted proxy (``xheaders=True``: ``X-Real-Ip`` is the client address):

* ``/ws`` -- the subscriptions protocol, at most ``--cap`` connections per
  client address and ``--user-cap`` per ``?user=``, summed over every process
  on the same Redis and prefix (:class:`~tornado_longconn.caps_redis.RedisConnectionCaps`
  with ``--ttl``).
* ``/stats`` -- ``{"refused": {...}, "caps": {...}}`` of this process.

SIGTERM stops it cleanly; SIGKILL leaves its counts in Redis until the TTL.
"""

from __future__ import annotations

import argparse
import asyncio

import tornado.web
import tornado.websocket

from tests.server_process import serve_until_signal
from tornado_longconn import BroadcastHub, MemoryBackend
from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.caps_redis import RedisConnectionCaps
from tornado_longconn.subscriptions import SubscriptionMixin, subscription_stats

__all__ = ["main"]


class Capped(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    """Subscriptions with per-IP and per-user caps (set on the class by ``main``)."""

    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub

    def get_current_user(self) -> str | None:
        return self.get_query_argument("user", None)


class Stats(tornado.web.RequestHandler):
    """This process's refusals and cap store counters."""

    def initialize(self, caps: RedisConnectionCaps) -> None:
        self.caps = caps

    def get(self) -> None:
        refused = dict(subscription_stats(self.application).refused)
        self.write({"refused": refused, "caps": self.caps.counts})


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT."""
    backend = RedisBackend(args.redis, prefix=args.prefix)
    await backend.start()
    caps = RedisConnectionCaps(backend, ttl=args.ttl)
    await caps.start()
    hub = BroadcastHub(MemoryBackend())
    Capped.max_connections_per_ip = args.cap
    Capped.max_connections_per_user = args.user_cap
    app = tornado.web.Application(
        [(r"/ws", Capped, {"hub": hub}), (r"/stats", Stats, {"caps": caps})],
        longconn_connection_caps=caps,
    )
    server = await serve_until_signal(app, xheaders=True)
    await hub.close(spread=0)
    await server.close_all_connections()
    await caps.close()
    await backend.close()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="longconn:")
    parser.add_argument("--cap", type=int, default=50)
    parser.add_argument("--user-cap", type=int, default=None)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
