"""One Tornado server process of the multi-process tests (and a scaling-out example).

Run ``python tests/multiprocess_server.py --redis redis://127.0.0.1:6379/0
--prefix p:`` and it serves, on a free port of 127.0.0.1 (printed as
``READY <port>`` on stdout once it listens):

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
import signal
import sys

import tornado.web
import tornado.websocket

from tornado_longconn.backends.redis import RedisBackend
from tornado_longconn.broadcast import BroadcastGroup, BroadcastHub, GapPolicy, cursor_envelope
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.sse import SSEHandler
from tornado_longconn.testing import AppServer

__all__ = ["main", "make_app"]

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


async def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="longconn:")
    args = parser.parse_args(argv)
    backend = RedisBackend(args.redis, prefix=args.prefix, reconnect_base=0.02, reconnect_cap=0.5)
    await backend.start()
    app, hub, waiter = make_app(backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AppServer(app) as server:
        print(f"READY {server.port}", flush=True)
        await stop.wait()
    await waiter.close()
    await hub.close()
    await backend.close()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        sys.argv.remove("--uvloop")
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
