"""Heartbeats for a WebSocket handler, with latency in a metrics endpoint.

``python heartbeat_chat.py`` serves ``ws://localhost:8888/chat`` (an echo chat) and
``http://localhost:8888/metrics`` (heartbeat counters and round-trip percentiles).
A client that goes silent -- a phone that lost its network, a killed process -- is
dropped within ``heartbeat_interval + heartbeat_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import os

import tornado.web
import tornado.websocket

from tornado_longconn.heartbeat import HeartbeatMixin, heartbeat_stats
from tornado_longconn.server import start_server
from tornado_longconn.stats import stats_dict


class Chat(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    # A ping every 25 s keeps NAT entries and proxies with a 60 s idle timeout open;
    # a peer silent for 25 + 10 s is dropped.
    heartbeat_interval = 25.0
    heartbeat_timeout = 10.0

    def open(self) -> None:
        self.write_message({"hello": "connected"})

    def on_message(self, message: str | bytes) -> None:
        # Your own code: nothing to call for the heartbeats.
        self.write_message({"echo": message, "latency_ms": self.rtt_ms()})

    def rtt_ms(self) -> float | None:
        return None if self.latency is None else round(self.latency * 1000, 2)

    def on_close(self) -> None:
        if self.heartbeat_timed_out:
            print("dropped a silent client")


class Metrics(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(stats_dict(heartbeat_stats(self.application)))


def make_app(**settings: object) -> tornado.web.Application:
    """``settings`` may override the class attributes, e.g. ``heartbeat_interval=5.0``."""
    return tornado.web.Application([("/chat", Chat), ("/metrics", Metrics)], **settings)


async def main() -> None:
    start_server(make_app(), int(os.environ.get("PORT", "8888")))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
