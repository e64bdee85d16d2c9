"""Peer of the subscriptions benchmark: python-socketio rooms on Tornado.

Usage: ``python -m benchmarks.servers.subs_socketio``. A
``socketio.AsyncServer(async_mode="tornado")`` (in-memory client manager) at
``/socket.io/``. A client subscribes to a topic with the event ``sub`` (an
acknowledged ``421["sub","<topic>"]``); the handler calls
``sio.enter_room(sid, topic)`` and acknowledges. ``POST
/publish?topics=T&count=N&size=S`` emits, in ``N`` rounds, one event
``m`` with :func:`text` to every room ``t0`` ... ``t<T-1>`` (``sio.emit("m",
text, to=room)``). ``POST /report?kind=RSS`` emits the RSS after a garbage
collection.
"""

from __future__ import annotations

import gc
import resource
from typing import Any

import socketio  # type: ignore[import-untyped,unused-ignore]
import tornado.web

from benchmarks.harness import query_int, report_route, serve_tornado

__all__ = ["main", "rss", "text"]


def text(topic: str, seq: int, size: int) -> str:
    """The message ``seq`` of ``topic``: ``"<topic> <seq:016x> "`` padded with ``x`` to ``size``."""
    head = f"{topic} {seq:016x} "
    return head + "x" * max(0, size - len(head))


def rss() -> int:
    """This process's resident set size in bytes (from ``/proc``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def main() -> None:
    sio = socketio.AsyncServer(async_mode="tornado", ping_interval=60, ping_timeout=60)

    async def sub(sid: str, topic: Any) -> bool:
        if not isinstance(topic, str):
            return False
        await sio.enter_room(sid, topic)
        return True

    sio.on("sub", sub)

    class Publish(tornado.web.RequestHandler):
        async def post(self) -> None:
            topics = query_int(self, "topics")
            count = query_int(self, "count")
            size = query_int(self, "size")
            start = query_int(self, "start", 0)
            rooms = [f"t{t}" for t in range(topics)]
            for seq in range(start, start + count):
                for room in rooms:
                    await sio.emit("m", text(room, seq, size), to=room)
            self.finish("ok")

    def measured_rss() -> int:
        gc.collect()
        return rss()

    app = tornado.web.Application(
        [
            (r"/socket.io/", socketio.get_tornado_handler(sio)),
            (r"/publish", Publish),
            report_route(RSS=measured_rss),
        ]
    )
    serve_tornado(app)


if __name__ == "__main__":
    main()
