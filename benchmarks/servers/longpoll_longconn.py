"""Long-poll server on tornado-longconn: ``LongPollHandler`` + a ``BroadcastGroup`` with history.

Usage: ``python longpoll_longconn.py`` (prints ``PORT <n>``; stops on SIGTERM).

* ``GET /poll?cursor=&timeout=`` -- :class:`tornado_longconn.longpoll.LongPollHandler`
  (JSON ``{"messages": [{"cursor", "data"}], "cursor", "gap", "reason"}``);
* ``POST /publish?n=N&size=S&seq=K`` -- publishes ``make_payload(K..K+N-1, S)`` as text
  through ``BroadcastHub(...).group("bench", history=1000)``;
* ``GET /stats`` -- ``{"waiting": <waits in progress>}``.
"""

from __future__ import annotations

import json

import tornado.web
from harness import PayloadMaker, query_int, serve_tornado

from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.broadcast import BroadcastHub
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter

__all__ = ["main"]


def main() -> None:
    """Build the app and serve it until SIGTERM."""
    backend = MemoryBackend()
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

    class Stats(tornado.web.RequestHandler):
        def get(self) -> None:
            self.finish(json.dumps({"waiting": waiter.waiting}))

    app = tornado.web.Application(
        [
            (r"/poll", LongPollHandler, {"waiter": waiter}),
            (r"/publish", Publish),
            (r"/stats", Stats),
        ]
    )
    serve_tornado(app)


if __name__ == "__main__":
    main()
