"""Chat rooms with BroadcastHub: join by URL, resume from a cursor, shut down gracefully.

Run ``python broadcast_rooms.py`` (``PORT`` sets the port, default 8888), then connect
WebSocket clients to ``ws://localhost:8888/rooms/<name>``; add ``?cursor=<cursor>`` to
resume after the last message you saw. Every message a client receives is
``{"cursor": "...", "data": {...}}``; ``POST /rooms/<name>/announce`` publishes from a
worker thread, as a blocking SDK or a sensor reader would.
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tornado.web
import tornado.websocket

from tornado_longconn.backpressure import OverflowPolicy
from tornado_longconn.broadcast import BroadcastGroup, BroadcastHub, cursor_envelope
from tornado_longconn.server import start_server


class Room(tornado.websocket.WebSocketHandler):
    """One chat member: joins the room named in the URL."""

    def initialize(self, hub: BroadcastHub) -> None:
        self.hub = hub

    async def open(self, name: str) -> None:
        self.room: BroadcastGroup = self.hub.group(f"room:{name}")
        # Resume: the history after the client's cursor, then live messages.
        # A malformed cursor raises CursorError (a ValueError): refuse the client.
        try:
            membership = self.room.join(self, cursor=self.get_query_argument("cursor", None))
        except ValueError:
            self.close(1008, "bad cursor")
            return
        await membership  # live from here on
        # Tell the others; the newcomer is excluded.
        await self.room.publish({"event": "joined", "members": len(self.room)}, exclude=self)

    async def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self.room.publish({"event": "message", "text": message})

    def on_close(self) -> None:
        # The member has already left the room (automatic); tell the others.
        if hasattr(self, "room") and not self.room.closed:
            self.room.publish_nowait({"event": "left", "members": len(self.room)})


class Announce(tornado.web.RequestHandler):
    """Publishes the request body from a worker thread (``publish_threadsafe``)."""

    def initialize(self, hub: BroadcastHub, pool: ThreadPoolExecutor) -> None:
        self.hub = hub
        self.pool = pool

    async def post(self, name: str) -> None:
        room = self.hub.group(f"room:{name}")
        text = self.request.body.decode()

        def blocking_producer() -> Any:
            # Runs in another thread: publish_threadsafe is the only safe entry point.
            return room.publish_threadsafe({"event": "announcement", "text": text}).result()

        result = await asyncio.get_running_loop().run_in_executor(self.pool, blocking_producer)
        self.write({"cursor": str(result.cursor), "delivered": result.delivered})


def make_app(hub: BroadcastHub, pool: ThreadPoolExecutor) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/rooms/([a-z0-9-]{1,32})", Room, {"hub": hub}),
            (r"/rooms/([a-z0-9-]{1,32})/announce", Announce, {"hub": hub, "pool": pool}),
        ]
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    # One hub per application: every room keeps 100 messages for resume, wraps each
    # message with its cursor, and closes members that fall 256 KiB behind (code 4000).
    hub = BroadcastHub(history=100, envelope=cursor_envelope, policy=OverflowPolicy.CLOSE)
    with ThreadPoolExecutor(2) as pool:
        server = start_server(make_app(hub, pool), port, "127.0.0.1")
        print(f"rooms on ws://localhost:{port}/rooms/<name>", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.stop()
        # Graceful shutdown: 1001 "going away" to every member, in jittered batches.
        await hub.close()
        print("closed", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
