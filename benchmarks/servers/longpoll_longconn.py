"""Long-poll server on tornado-longconn: ``LongPollHandler`` + a ``BroadcastGroup`` with history.

Usage: ``python -m benchmarks.servers.longpoll_longconn [BACKEND_URL]`` (default ``memory://``; e.g.
``redis://127.0.0.1:6379/0`` runs on the Redis backend with a fresh key prefix).
Reports ``PORT <n>`` and stops on SIGTERM.

* ``GET /poll?cursor=&timeout=`` -- :class:`tornado_longconn.longpoll.LongPollHandler`
  (JSON ``{"messages": [{"cursor", "data"}], "cursor", "gap", "reason"}``);
* ``POST /publish?n=N&size=S&seq=K`` -- publishes ``make_payload(K..K+N-1, S)`` as text
  through ``BroadcastHub(...).group("bench", history=1000)``;
* ``POST /report?kind=STATS`` -- reports ``STATS`` with ``LongPollWaiter.stats()``
  (``waiting``: waits in progress; ``parked``: registered for the next message).
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import sys

import tornado.httpserver
import tornado.netutil
import tornado.web

from benchmarks.harness import PayloadMaker, query_int, report_route, serve_until_sigterm
from tornado_longconn.backends import backend_from_url
from tornado_longconn.broadcast import BroadcastHub
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter

__all__ = ["main", "make_app"]


def make_app(url: str) -> tornado.web.Application:
    """The benchmark app on the backend ``url`` names."""
    if url.startswith("memory:"):
        backend = backend_from_url(url)
    else:
        backend = backend_from_url(url, prefix=f"bench-lp-{secrets.token_hex(4)}:")
    hub = BroadcastHub(backend, history=1000)
    group = hub.group("bench")
    waiter = LongPollWaiter(backend, "bench", max_waiters=50_000)

    class Publish(tornado.web.RequestHandler):
        async def post(self) -> None:
            make = PayloadMaker(query_int(self, "size", 64))
            first = query_int(self, "seq", 0)
            for seq in range(first, first + query_int(self, "n", 1)):
                await group.publish(make(seq).decode("ascii"))
            self.finish("ok")

    return tornado.web.Application(
        [
            (r"/poll", LongPollHandler, {"waiter": waiter}),
            (r"/publish", Publish),
            report_route(STATS=lambda: dataclasses.asdict(waiter.stats())),
        ],
        longpoll_backend=backend,
    )


def main() -> None:
    """Serve the app until SIGTERM."""
    url = sys.argv[1] if len(sys.argv) > 1 else "memory://"

    async def start() -> int:
        app = make_app(url)
        await app.settings["longpoll_backend"].start()
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", socket.AF_INET, backlog=4096)
        tornado.httpserver.HTTPServer(app).add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    serve_until_sigterm(start)


if __name__ == "__main__":
    main()
