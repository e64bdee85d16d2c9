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
from typing import Any

import tornado.ioloop
import tornado.web
import tornado.websocket

from tornado_longconn.broadcast import BroadcastHub
from tornado_longconn.codes import CloseCode
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

    def check_origin(self, origin: str) -> bool:
        # Only pages of our own sites may open a socket with the user's cookie.
        allowed: frozenset[str] = self.settings["allowed_origins"]
        return origin in allowed

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
    """Identity from the first message: ``call("auth", {"token": ...})``.

    Browsers cannot set headers on a WebSocket, and a token in the URL ends up in
    logs. Until the client authenticates it may do nothing; the session lapses
    ``session_ttl`` seconds after the last ``auth`` (close 4401): send ``auth``
    again before that to refresh it. The per-user cap does not apply here (the
    user is not known at open).
    """

    session_ttl = 300.0
    _lapse: object | None = None

    def open(self, *args: str, **kwargs: str) -> None:
        super().open(*args, **kwargs)
        self._schedule_lapse()  # the first auth must come within session_ttl too

    def _schedule_lapse(self) -> None:
        loop = tornado.ioloop.IOLoop.current()
        if self._lapse is not None:
            loop.remove_timeout(self._lapse)
        self._lapse = loop.call_later(self.session_ttl, self._lapsed)

    def _lapsed(self) -> None:
        self._lapse = None
        self.user_disconnect(int(CloseCode.UNAUTHORIZED), "session expired")

    def on_connection_close(self) -> None:
        if self._lapse is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(self._lapse)
            self._lapse = None
        super().on_connection_close()

    def on_call(self, method: str, params: Any) -> Any:
        if method == "auth":
            token = params.get("token") if isinstance(params, dict) else None
            user = TOKENS.get(token) if isinstance(token, str) else None
            if user is None or self.current_user not in (None, user):
                raise SubscriptionError("unauthorized", "invalid token", close=True)
            self.current_user = user
            self._schedule_lapse()
            return {"user": user, "expires_in": self.session_ttl}
        if self.current_user is None:
            raise SubscriptionError("unauthorized", "send auth first")
        return super().on_call(method, params)

    def authorize_subscribe(self, topic: str, params: Any) -> bool:
        if self.current_user is None:
            raise SubscriptionError("unauthorized", "send auth first")
        return True

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return self.current_user is not None and super().authorize_publish(topic, data)


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
        allowed_origins=allowed_origins,
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
