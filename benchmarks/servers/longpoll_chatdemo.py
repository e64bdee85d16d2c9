"""Long-poll peer in the style of Tornado's chat demo (``demos/chat/chatdemo.py``).

A global ``MessageBuffer`` with a ``tornado.locks.Condition`` and a 200-message cache;
message ids (uuid4) are the cursors; ``get_messages_since`` scans the cache backwards
and, when the cursor is not found, returns the whole cache (the demo's behaviour).
The update handler waits on ``cond.wait()`` and cancels it in ``on_connection_close``.

Usage: ``python -m benchmarks.servers.longpoll_chatdemo`` (reports ``PORT <n>``; stops on SIGTERM).

* ``GET /poll?cursor=<id>`` -- ``{"messages": [{"id", "body"}]}``;
* ``POST /publish?n=N&size=S&seq=K`` -- adds ``make_payload(K..K+N-1, S)`` messages;
* ``POST /report?kind=STATS`` -- reports ``STATS {"waiting": <waiting requests>}``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import tornado.locks
import tornado.web

from benchmarks.harness import PayloadMaker, query_int, report_route, serve_tornado

__all__ = ["MessageBuffer", "main"]


class MessageBuffer:
    """The chat demo's message buffer (cache of 200, Condition notified on add)."""

    def __init__(self) -> None:
        self.cond = tornado.locks.Condition()
        self.cache: list[dict[str, Any]] = []
        self.cache_size = 200
        self.waiting = 0

    def get_messages_since(self, cursor: str | None) -> list[dict[str, Any]]:
        """Messages newer than ``cursor`` (the whole cache if it is not found)."""
        results = []
        for msg in reversed(self.cache):
            if msg["id"] == cursor:
                break
            results.append(msg)
        results.reverse()
        return results

    def add_message(self, message: dict[str, Any]) -> None:
        """Append, trim to ``cache_size``, wake every waiter."""
        self.cache.append(message)
        if len(self.cache) > self.cache_size:
            self.cache = self.cache[-self.cache_size :]
        self.cond.notify_all()


def main() -> None:
    """Build the app and serve it until SIGTERM."""
    buffer = MessageBuffer()

    class MessageUpdatesHandler(tornado.web.RequestHandler):
        wait_future: Any = None

        async def get(self) -> None:
            cursor = self.get_argument("cursor", None)
            messages = buffer.get_messages_since(cursor)
            while not messages:
                self.wait_future = buffer.cond.wait()
                buffer.waiting += 1
                try:
                    await self.wait_future
                except asyncio.CancelledError:
                    return
                finally:
                    buffer.waiting -= 1
                messages = buffer.get_messages_since(cursor)
            if self.request.connection.stream.closed():  # type: ignore[attr-defined]
                return
            self.write({"messages": messages})

        def on_connection_close(self) -> None:
            if self.wait_future is not None:
                self.wait_future.cancel()

    class Publish(tornado.web.RequestHandler):
        def post(self) -> None:
            make = PayloadMaker(query_int(self, "size", 64))
            first = query_int(self, "seq", 0)
            for seq in range(first, first + query_int(self, "n", 1)):
                buffer.add_message({"id": str(uuid.uuid4()), "body": make(seq).decode("ascii")})
            self.finish("ok")

    app = tornado.web.Application(
        [
            (r"/poll", MessageUpdatesHandler),
            (r"/publish", Publish),
            report_route(STATS=lambda: {"waiting": buffer.waiting}),
        ]
    )
    serve_tornado(app)


if __name__ == "__main__":
    main()
