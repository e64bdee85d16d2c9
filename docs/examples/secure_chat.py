"""Authentication, origin checks and size limits on WebSocket, SSE and long-poll.

The companion of docs/topics/security.md. Users are identified by a signed
cookie that your login page sets with ``self.set_signed_cookie("user", name)``;
every transport checks it, and the room's access list, in ``prepare()``, which
runs before a WebSocket upgrade and before an event stream or a long-poll wait
starts. Run it with ``COOKIE_SECRET=... PORT=8888 python secure_chat.py``.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import tornado.web
import tornado.websocket

from tornado_longconn.broadcast import BroadcastHub, cursor_envelope
from tornado_longconn.heartbeat import HeartbeatMixin
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.server import start_server
from tornado_longconn.sse import SSEHandler

#: Who may read and write which room (in a real app: your database).
ACCESS = {"alice": {"lobby", "staff"}, "bob": {"lobby"}}


class Authenticated(tornado.web.RequestHandler):
    """The user from the signed session cookie, and a per-room access check."""

    def get_current_user(self) -> str | None:
        value = self.get_signed_cookie("user", max_age_days=1)
        return value.decode() if value else None

    def prepare(self) -> None:
        room = self.path_args[0]
        if self.current_user is None:
            raise tornado.web.HTTPError(401)  # no valid session: log in first
        if room not in ACCESS.get(self.current_user, set()):
            raise tornado.web.HTTPError(403)  # logged in, but not a member of this room


class Chat(Authenticated, HeartbeatMixin, tornado.websocket.WebSocketHandler):
    def initialize(self, hub: BroadcastHub) -> None:
        self.hub = hub

    def check_origin(self, origin: str) -> bool:
        # Browsers send the page's origin; refuse pages of other sites (403), so a
        # malicious page cannot open a socket with the user's cookie.
        return origin in self.settings["allowed_origins"]

    def open(self, room: str) -> None:
        self.room = self.hub.group(room)
        self.room.join(self, cursor=self.get_query_argument("cursor", None))

    async def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):  # larger than websocket_max_message_size: closed, 1009
            await self.room.publish({"user": self.current_user, "text": message})


class Events(Authenticated, SSEHandler):
    """SSE: same cookie check; EventSource sends cookies of its own origin."""


class Poll(Authenticated, LongPollHandler):
    """Long-poll: same cookie check."""


def make_app(cookie_secret: str, allowed_origins: set[str]) -> tornado.web.Application:
    hub = BroadcastHub(history=100, envelope=cursor_envelope)
    waiter = LongPollWaiter(hub.backend)
    return tornado.web.Application(
        [
            (r"/ws/([a-z]+)", Chat, {"hub": hub}),
            (r"/events/([a-z]+)", Events, {"waiter": waiter}),
            (r"/poll/([a-z]+)", Poll, {"waiter": waiter}),
        ],
        cookie_secret=cookie_secret,
        allowed_origins=allowed_origins,
        websocket_max_message_size=16 * 1024,  # bytes per WebSocket message
        max_body_size=64 * 1024,  # bytes per HTTP request body
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    secret = os.environ.get("COOKIE_SECRET") or secrets.token_hex(32)
    origins = {f"http://localhost:{port}", f"http://127.0.0.1:{port}"}
    start_server(make_app(secret, origins), port, "127.0.0.1")
    print(f"secure chat on http://localhost:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
