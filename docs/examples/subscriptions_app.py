"""Rooms, direct messages and notifications on one connection (``python subscriptions_app.py``).

* ``/ws`` -- the subscriptions protocol over WebSocket (``SubscriptionMixin``);
* ``/events?topics=...`` -- the same topics as one Server-Sent Events stream;
* ``/poll?topics=...&cursors=...`` -- the same topics as one long-poll;
* ``/publish`` -- ``POST {"topic": ..., "data": ...}``.

Who may read and write what is decided in one place (``Rules``), for every
transport. The user comes from a signed cookie ``user`` (a login page would set
it; set ``COOKIE_SECRET``), as with any Tornado application.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import tornado.web
import tornado.websocket

from tornado_longconn import (
    BroadcastHub,
    LongPollWaiter,
    SubscriptionError,
    SubscriptionMixin,
    SubscriptionPollHandler,
    SubscriptionPublishHandler,
    SubscriptionSSEHandler,
    start_server,
)

ROOMS = ("room:lobby", "room:dev")


class Rules:
    """The authorization hooks, shared by the WebSocket and the HTTP handlers."""

    current_user: Any

    def get_current_user(self) -> str | None:
        raw = self.get_signed_cookie("user", max_age_days=1)  # type: ignore[attr-defined]
        return raw.decode() if raw else None

    def authorize_subscribe(self, topic: str, params: Any) -> bool:
        user = self.current_user
        if user is None:
            raise SubscriptionError("unauthorized", "log in first")
        # rooms are public; dm:<user> and notify:<user> only for their user
        return topic in ROOMS or topic in (f"dm:{user}", f"notify:{user}")

    def authorize_publish(self, topic: str, data: Any) -> bool:
        # members write to rooms and to other users' direct messages, never as
        # the server's notifications, and only small JSON objects
        return (
            self.current_user is not None
            and (topic in ROOMS or topic.startswith("dm:"))
            and isinstance(data, dict)
            and len(str(data)) < 2000
        )


class Live(Rules, SubscriptionMixin, tornado.websocket.WebSocketHandler):
    require_user = True  # no user: closed with 4401 at once
    max_topics = 20

    def initialize(self, hub: BroadcastHub) -> None:
        self.subscription_hub = hub

    async def on_call(self, method: str, params: Any) -> Any:
        if method == "rooms.list":
            return list(ROOMS)
        if method == "whoami":
            return self.current_user
        raise SubscriptionError("not_found", f"no method {method!r}")


class Events(Rules, SubscriptionSSEHandler):
    pass


class Poll(Rules, SubscriptionPollHandler):
    pass


class Publish(Rules, SubscriptionPublishHandler):
    def check_xsrf_cookie(self) -> None:
        pass  # this example has no forms; a real application keeps XSRF checks


def make_app(hub: BroadcastHub, waiter: LongPollWaiter, secret: str) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/ws", Live, {"hub": hub}),
            (r"/events", Events, {"hub": hub, "waiter": waiter}),
            (r"/poll", Poll, {"hub": hub, "waiter": waiter}),
            (r"/publish", Publish, {"hub": hub}),
        ],
        cookie_secret=secret,
    )


async def main() -> None:
    port = int(os.environ.get("PORT", "8888"))
    hub = BroadcastHub(history=1000)  # every topic keeps its last 1,000 messages
    waiter = LongPollWaiter(hub.backend)  # one per application, shared by SSE and long-poll
    secret = os.environ.get("COOKIE_SECRET") or "change-me"
    start_server(make_app(hub, waiter, secret), port, "127.0.0.1")
    print(f"subscriptions on ws://localhost:{port}/ws", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await waiter.close()
        await hub.close()


if __name__ == "__main__":
    asyncio.run(main())
