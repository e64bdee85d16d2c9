"""Production controls: identity, rate limits, connection caps, readiness and drain.

The companion of docs/howto/controls.md. Three ways to say who a WebSocket
client is (a signed cookie, an ``Authorization`` header, a token in the first
message, refreshed before it lapses), per-connection rate limits and
connection caps on every transport, a readiness probe, and a drain on SIGTERM.
Run it with ``COOKIE_SECRET=... PORT=8888 python controls_app.py``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from typing import Any

import tornado.web
import tornado.websocket

from tornado_longconn.auth import Credentials
from tornado_longconn.broadcast import BroadcastHub
from tornado_longconn.drain import ReadinessHandler, drain
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.ratelimit import RateLimits
from tornado_longconn.server import start_server
from tornado_longconn.subscriptions import SubscriptionError, SubscriptionMixin
from tornado_longconn.subscriptions_http import SubscriptionPollHandler, SubscriptionSSEHandler

#: API tokens and their users (in a real app: verify a signed token, e.g. a JWT).
TOKENS = {"t-alice": "alice", "t-bob": "bob"}

#: What one connection may send: 20 frames/s (bursts of 40), 64 KiB/s, and
#: 5 publishes/s per topic; 10 breaches are answered ``limit``, the 11th closes with 4429.
LIMITS = RateLimits(
    messages_per_second=20,
    message_burst=40,
    bytes_per_second=64 * 1024,
    byte_burst=128 * 1024,
    publishes_per_second=5,
    publish_burst=10,
)


class Controlled(SubscriptionMixin, tornado.websocket.WebSocketHandler):
    """The limits every WebSocket of this application shares."""

    rate_limits = LIMITS
    max_connections_per_ip = 100  # behind a proxy: start_server(..., xheaders=True)
    max_connections_per_user = 10

    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return topic.startswith("room:")


class CookieLive(Controlled):
    """Identity from the signed cookie your login page set (browsers send it)."""

    require_user = True  # no valid cookie: closed with 4401 at open

    def get_current_user(self) -> str | None:
        value = self.get_signed_cookie("user", max_age_days=1)
        return value.decode() if value else None


class HeaderLive(Controlled):
    """Identity from ``Authorization: Bearer <token>`` (servers and mobile apps)."""

    require_user = True

    def get_current_user(self) -> str | None:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        return TOKENS.get(token) if scheme.lower() == "bearer" else None


class TokenLive(Controlled):
    """Identity from the first message: ``{"type": "auth", "token": ...}``.

    Browsers cannot set headers on a WebSocket, and a token in the URL ends up in
    logs. The connection opens without a user and must authenticate within
    ``auth_timeout`` seconds; until then every other request is answered
    ``unauthorized``. A token lives ``session_ttl`` seconds: the client sends
    ``{"type": "refresh", "token": ...}`` with a new one before that (longconn.js
    does it with its ``getToken`` option), or the connection is closed with 4401.
    A forged or expired token closes it with 4401 at once. The per-user cap
    applies once the token names the user.
    """

    auth_timeout = 10.0
    session_ttl = 300.0

    def authenticate(self, token: str) -> Credentials:
        user = TOKENS.get(token)
        if user is None:
            raise SubscriptionError("unauthorized", "invalid token")
        return Credentials(user, expires_at=time.time() + self.session_ttl)


class Events(SubscriptionSSEHandler):
    max_connections_per_ip = 100  # shares the count with the WebSockets above


class Poll(SubscriptionPollHandler):
    max_connections_per_ip = 100


def make_app(
    hub: BroadcastHub,
    waiter: LongPollWaiter,
    *,
    cookie_secret: str,
    allowed_origins: frozenset[str],
) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/ws/cookie", CookieLive, {"hub": hub}),
            (r"/ws/header", HeaderLive, {"hub": hub}),
            (r"/ws/token", TokenLive, {"hub": hub}),
            (r"/events", Events, {"hub": hub, "waiter": waiter}),
            (r"/poll", Poll, {"hub": hub, "waiter": waiter}),
            (r"/ready", ReadinessHandler),  # the load balancer's health check
        ],
        cookie_secret=cookie_secret,
        # Pages of these sites may connect too (same-origin pages always may).
        longconn_allowed_origins=allowed_origins,
        websocket_max_message_size=256 * 1024,
    )


async def main() -> None:
    from tornado_longconn.backends.memory import MemoryBackend

    hub = BroadcastHub(MemoryBackend(), history=1000)
    waiter = LongPollWaiter(hub.backend)
    port = int(os.environ.get("PORT", "8888"))
    app = make_app(
        hub,
        waiter,
        cookie_secret=os.environ.get("COOKIE_SECRET") or secrets.token_hex(32),
        allowed_origins=frozenset({f"http://localhost:{port}"}),
    )
    server = start_server(app, port, "127.0.0.1")
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # /ready answers 503, no new connections, polls answered, streams ended,
    # WebSockets closed with 1001 in jittered batches; then return.
    await drain(app, servers=[server], waiters=[waiter], hubs=[hub])


if __name__ == "__main__":
    asyncio.run(main())
