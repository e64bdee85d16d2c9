"""The README quickstart: a chat room with heartbeats and broadcast (``python quickstart.py``)."""

import asyncio
import os

import tornado.web
import tornado.websocket

from tornado_longconn import BroadcastHub, HeartbeatMixin, start_server


class Chat(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    heartbeat_interval = 20.0  # seconds; None turns it off

    def initialize(self, hub: BroadcastHub) -> None:
        self.room = hub.group("lobby")

    def open(self) -> None:
        self.room.join(self)  # left automatically on close

    async def on_message(self, message: str | bytes) -> None:
        await self.room.publish(message)  # encoded once, written to every member


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    hub = BroadcastHub()
    app = tornado.web.Application([(r"/chat", Chat, {"hub": hub})])
    start_server(app, port, "127.0.0.1")  # production timeouts and limits
    print(f"chat on ws://localhost:{port}/chat", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
