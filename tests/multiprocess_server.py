"""One Tornado server process of the multi-process tests (and a scaling-out example).

Run ``python tests/multiprocess_server.py --redis redis://127.0.0.1:6379/0
--prefix p:`` and it serves, on a free port of 127.0.0.1 (or ``--port``; printed
as ``READY <port>`` on stdout by every process once it listens; ``--processes N``
forks N processes sharing the port with ``tornado.process.fork_processes``):

* ``/ws`` -- a WebSocket that joins the ``room`` group (history kept, each text
  message wrapped with its cursor by ``cursor_envelope``; a gap is announced with
  a ``{"type": "resync", ...}`` notice). ``?cursor=`` resumes.
* ``POST /publish`` -- publishes the request body to ``room`` from this process;
  answers ``{"cursor": ...}``.
* ``/poll`` -- long-poll on ``room``; ``/events`` -- Server-Sent Events on ``room``.

Every process started with the same ``--redis`` and ``--prefix`` serves the same
room. SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import tornado.netutil
import tornado.process
import tornado.web
import tornado.websocket

from tests.server_process import serve_until_signal
from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.broadcast import BroadcastGroup, BroadcastHub, GapPolicy, cursor_envelope
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.sse import SSEHandler

__all__ = ["main", "make_app", "serve"]

TOPIC = "room"


class RoomSocket(tornado.websocket.WebSocketHandler):
    """Joins the room on open (resuming from ``?cursor=``); ignores what clients send."""

    def initialize(self, room: BroadcastGroup) -> None:
        self.room = room

    def open(self) -> None:  # type: ignore[override]
        self.room.join(self, cursor=self.get_argument("cursor", None))

    def on_message(self, message: str | bytes) -> None:
        pass


class Publish(tornado.web.RequestHandler):
    """``POST`` body → ``room``; answers the message's cursor."""

    def initialize(self, room: BroadcastGroup) -> None:
        self.room = room

    async def post(self) -> None:
        result = await self.room.publish(self.request.body.decode("utf-8"))
        self.write({"cursor": str(result.cursor)})


def make_app(backend: RedisBackend) -> tuple[tornado.web.Application, BroadcastHub, LongPollWaiter]:
    """The application of one server process, on ``backend``."""
    hub = BroadcastHub(backend, history=1000, envelope=cursor_envelope, gap_policy=GapPolicy.NOTICE)
    room = hub.group(TOPIC)
    waiter = LongPollWaiter(backend, TOPIC)
    app = tornado.web.Application(
        [
            (r"/ws", RoomSocket, {"room": room}),
            (r"/publish", Publish, {"room": room}),
            (r"/poll", LongPollHandler, {"waiter": waiter}),
            (r"/events", SSEHandler, {"waiter": waiter}),
        ]
    )
    return app, hub, waiter


async def serve(sockets: list[socket.socket], redis_url: str, prefix: str) -> None:
    """Serve the room on ``sockets`` until SIGTERM/SIGINT (one process)."""
    # Everything that holds a connection is made here, after any fork.
    backend = RedisBackend(redis_url, prefix=prefix, reconnect_base=0.02, reconnect_cap=0.5)
    await backend.start()
    app, hub, waiter = make_app(backend)
    server = await serve_until_signal(app, sockets)
    await waiter.close()
    await hub.close()
    await server.close_all_connections()
    await backend.close()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line; bind; fork ``--processes`` children; serve in each."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="longconn:")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--processes", type=int, default=1, help="0: one per CPU")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    sockets = tornado.netutil.bind_sockets(args.port, "127.0.0.1", family=socket.AF_INET)
    if args.processes != 1:
        # The parent waits here and restarts children that crash; each child
        # returns from fork_processes and runs its own event loop.
        tornado.process.fork_processes(args.processes)
    runner = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    runner(serve(sockets, args.redis, args.prefix))


if __name__ == "__main__":
    main()
