"""Graceful drain: take a process out of service without an error answer.

One call, on SIGTERM, before the process exits::

    await drain(app, servers=[server], waiters=[waiter], hubs=[hub])

in this order: :class:`ReadinessHandler` answers 503 (the load balancer stops
sending new clients), every server stops listening (``server.stop()``),
pending long-polls are answered (200 with their cursor and no messages) and
SSE streams end cleanly (the waiters are closed), the WebSockets of the hubs'
groups are closed with 1001 (going away) in jittered batches
(:meth:`BroadcastHub.close <tornado_longconn.broadcast.BroadcastHub.close>`),
and so is every other WebSocket of the library's handlers that is still open
(:class:`~tornado_longconn.heartbeat.HeartbeatMixin`,
:class:`~tornado_longconn.strict.StrictWebSocketMixin`,
:class:`~tornado_longconn.subscriptions.SubscriptionMixin`, the WebSocket upload
handler; in or out of any group), then it waits, at most ``timeout`` seconds,
until no WebSocket, SSE stream or long-poll of ``app`` is open and no upload request of ``upload_stores`` is still writing
(an upload in flight finishes its body, so its offset is durable), and finally closes the servers' remaining (idle keep-alive)
HTTP connections. Return from ``main()`` only after it: ``asyncio.run``
cancels the tasks still running, and Tornado answers a cancelled request
with 500.

Clients act on each answer: a 1001 close or an ended SSE stream reconnects
with backoff (to another process), a long-poll answered empty polls again with
the same cursor. Requests that arrive on a kept-alive connection during the
drain are served as usual, except that a long-poll or stream on a closed
waiter is answered at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import tornado.httpserver
import tornado.web

from .broadcast import DEFAULT_CLOSE_BATCH, DEFAULT_CLOSE_SPREAD, BroadcastHub
from .codes import CloseCode
from .connections import ConnectionCounters, ConnectionStats
from .longpoll import LongPollWaiter
from .upload import UploadStore

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "DrainState", "ReadinessHandler", "drain", "is_draining"]

#: Seconds :func:`drain` waits for open streams and polls to end before closing them.
DEFAULT_DRAIN_TIMEOUT: Final = 30.0
#: The application setting that holds the :class:`DrainState`.
_SETTING: Final = "longconn_drain"

log = logging.getLogger("tornado_longconn.drain")


@dataclass(slots=True)
class DrainState:
    """Whether an application is draining (``application.settings["longconn_drain"]``)."""

    draining: bool = False

    @classmethod
    def for_application(cls, application: tornado.web.Application) -> DrainState:
        """The application's state, created if missing (``TypeError`` if the setting is taken)."""
        state = application.settings.get(_SETTING)
        if state is None:
            state = application.settings[_SETTING] = cls()
        if not isinstance(state, DrainState):
            raise TypeError(f"settings[{_SETTING!r}] must be a DrainState")
        return state


def is_draining(application: tornado.web.Application) -> bool:
    """True once :func:`drain` started on ``application``."""
    return DrainState.for_application(application).draining


class ReadinessHandler(tornado.web.RequestHandler):
    """A readiness probe: ``200 {"ready": true}``, or ``503 {"ready": false}`` while draining.

    Route it (``(r"/ready", ReadinessHandler)``) and point the load balancer's
    health check at it; the 503 comes with ``Retry-After: 1`` and
    ``Cache-Control: no-store``. ``HEAD`` answers the same status without a body.
    """

    def _answer(self, body: bool) -> None:
        ready = not is_draining(self.application)
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "application/json")
        if not ready:
            self.set_status(503)
            self.set_header("Retry-After", "1")
        self.finish(json.dumps({"ready": ready}) if body else None)

    def get(self, *args: str, **kwargs: str) -> None:
        """Answer the probe."""
        self._answer(True)

    def head(self, *args: str, **kwargs: str) -> None:
        """Answer the probe without a body."""
        self._answer(False)


async def drain(
    app: tornado.web.Application,
    *,
    servers: Iterable[tornado.httpserver.HTTPServer] = (),
    waiters: Iterable[LongPollWaiter] = (),
    hubs: Iterable[BroadcastHub] = (),
    upload_stores: Iterable[UploadStore] = (),
    batch: int | None = None,
    spread: float | None = None,
    timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> ConnectionStats:
    """Drain ``app`` (see the module docs); idempotent enough to call twice.

    ``batch`` and ``spread`` go to :meth:`BroadcastHub.close` (None: the hub's
    ``close_batch`` / ``close_spread``). ``timeout`` bounds the wait for SSE
    streams and long-polls to end, and for the upload requests (tus ``PATCH``,
    chunked ``PUT``) of ``upload_stores`` to finish writing their body. Returns the application's connection
    counters at the end (:class:`~tornado_longconn.connections.ConnectionStats`):
    ``websocket``, ``sse`` and ``longpoll`` are 0 unless the timeout passed.
    WebSockets outside the hubs' groups are closed with 1001 too, in batches of
    ``batch`` (default 500) spread over about ``spread`` seconds (default 1) --
    those of the library's handlers only: close a plain ``WebSocketHandler``
    that is in no group yourself.
    """
    DrainState.for_application(app).draining = True
    servers = list(servers)
    for server in servers:
        server.stop()
    for waiter in waiters:
        await waiter.close()
    await asyncio.gather(
        *(
            hub.close(CloseCode.GOING_AWAY, "going away", batch_size=batch, spread=spread)
            for hub in hubs
        )
    )
    counters = ConnectionCounters.for_application(app)
    await _close_websockets(
        counters.websockets(),
        DEFAULT_CLOSE_BATCH if batch is None else batch,
        DEFAULT_CLOSE_SPREAD if spread is None else spread,
    )
    waits = [counters.wait_closed()]
    waits += [store.wait_writers() for store in upload_stores]
    try:
        await asyncio.wait_for(asyncio.gather(*waits), timeout)
    except asyncio.TimeoutError:
        left: Any = counters.stats()
        log.warning(
            "drain: %d WebSockets, %d SSE streams, %d long-polls or uploads still open after %g s",
            left.websocket,
            left.sse,
            left.longpoll,
            timeout,
        )
    for server in servers:
        await server.close_all_connections()
    return counters.stats()


async def _close_websockets(handlers: list[Any], batch: int, spread: float) -> None:
    """Close ``handlers`` with 1001, ``batch`` at a time, pausing a random share of ``spread``."""
    batch = max(1, batch)
    batches = [handlers[i : i + batch] for i in range(0, len(handlers), batch)]
    mean_pause = spread / len(batches) if spread > 0 and batches else 0.0
    rng = random.Random()
    for index, group in enumerate(batches):
        if index and mean_pause > 0:
            await asyncio.sleep(rng.uniform(0.0, 2.0 * mean_pause))
        for handler in group:
            _going_away(handler)


def _going_away(handler: Any) -> None:
    conn = getattr(handler, "ws_connection", None)
    if conn is None or conn.is_closing():
        return
    try:  # a BackpressureWriter's queue is flushed before the close frame (its close hook)
        handler.close(int(CloseCode.GOING_AWAY), "going away")
    except Exception:
        log.exception("closing %r failed", handler)
