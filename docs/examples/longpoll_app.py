"""Long-poll and SSE fallbacks for a chat room (``python longpoll_app.py``).

* ``POST /send/<room>`` (body: the text) publishes to the room's ``BroadcastGroup``;
* ``GET /poll/<room>?cursor=&timeout=`` long-polls it (``LongPollHandler``);
* ``GET /events/<room>`` streams it as Server-Sent Events (``SSEHandler``).

Every message gets a cursor from the group's history, so a client may switch
between the transports and resume where it left off.
"""

import asyncio
import os

import tornado.web

from tornado_longconn.broadcast import BroadcastHub
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.server import start_server
from tornado_longconn.sse import SSEHandler

ROOM = r"(?P<topic>[a-z0-9-]{1,40})"  # which topics clients may read: restrict it


class Send(tornado.web.RequestHandler):
    def initialize(self, hub: BroadcastHub) -> None:
        self.hub = hub

    async def post(self, topic: str) -> None:
        text = self.request.body.decode("utf-8")
        result = await self.hub.group(topic).publish(text)
        self.finish({"cursor": str(result.cursor)})


def make_app(hub: BroadcastHub, waiter: LongPollWaiter) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (rf"/send/{ROOM}", Send, {"hub": hub}),
            (rf"/poll/{ROOM}", LongPollHandler, {"waiter": waiter}),
            (rf"/events/{ROOM}", SSEHandler, {"waiter": waiter, "keepalive": 15.0}),
        ]
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    hub = BroadcastHub(history=1000)  # every group keeps its last 1,000 messages
    waiter = LongPollWaiter(hub.backend)  # one per application: shared subscriptions
    start_server(make_app(hub, waiter), port, "127.0.0.1")
    print(f"long-poll on http://localhost:{port}/poll/lobby", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await waiter.close()


if __name__ == "__main__":
    asyncio.run(main())
