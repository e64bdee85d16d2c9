"""Application-level heartbeats for browser clients (JavaScript cannot see ping frames).

``python heartbeat_browser.py`` serves ``ws://localhost:8888/live``. Every 10 s the
server sends the text ``{"type":"ping"}``; the page answers ``{"type":"pong"}``
(``longconn.js`` does it for you, or see the snippet in the how-to). Replies are
swallowed by the mixin, so ``on_message`` only sees the page's own messages, and the
page itself sees the pings: it can reconnect when they stop arriving.
"""

from __future__ import annotations

import asyncio
import json
import os

import tornado.web
import tornado.websocket

from tornado_longconn.heartbeat import HeartbeatMixin
from tornado_longconn.server import start_server


class Live(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    heartbeat_mode = "application"
    heartbeat_interval = 10.0
    heartbeat_timeout = 10.0
    heartbeat_message = {"type": "ping"}  # sent as compact JSON text
    heartbeat_reply = {"type": "pong"}

    def is_heartbeat_reply(self, message: str) -> bool:
        # Accept any JSON spelling of the reply, not only the exact text.
        if not message.startswith("{"):
            return False
        try:
            return bool(json.loads(message).get("type") == "pong")
        except ValueError:
            return False

    def on_message(self, message: str | bytes) -> None:
        self.write_message({"got": message})


def make_app(**settings: object) -> tornado.web.Application:
    return tornado.web.Application([("/live", Live)], **settings)


async def main() -> None:
    start_server(make_app(), int(os.environ.get("PORT", "8888")))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
