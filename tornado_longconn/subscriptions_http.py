"""Many topics over Server-Sent Events and long-poll, and publish over HTTP.

The HTTP side of the subscriptions protocol (``docs/reference/subscriptions-protocol.md``):
one request carries a set of topics and a **cursor map** (``topic=cursor``
entries joined by ``,``; an empty cursor means "from now"), so a browser needs
one SSE stream, not one per topic. The same hooks as the WebSocket side
(:class:`~tornado_longconn.subscriptions.SubscriptionHooks`) decide what a
request may read or publish, with Tornado's ``current_user``.

* SSE: ``GET <url>?topics=room:1,dm:ann&cursors=<cursor map>``; the
  ``Last-Event-ID`` header (what ``EventSource`` sends when it reconnects) wins
  over ``cursors``. Every message event's ``id`` is the cursor map after it.
* Long-poll: ``GET <url>?topics=...&cursors=...&timeout=...`` answers
  ``{"messages","cursors","resync","errors"}`` as soon as any topic has
  something, else empty after the timeout.
* Publish: ``POST <url>`` with ``{"topic": ..., "data": ...}``.

Mix :class:`SubscriptionHTTPMixin` into your own ``RequestHandler`` and call
:meth:`~SubscriptionHTTPMixin.stream_subscriptions`,
:meth:`~SubscriptionHTTPMixin.poll_subscriptions` or
:meth:`~SubscriptionHTTPMixin.publish_from_body`, or route the ready-made
:class:`SubscriptionSSEHandler`, :class:`SubscriptionPollHandler` and
:class:`SubscriptionPublishHandler` (subclass them to add the hooks)::

    waiter = LongPollWaiter(hub.backend)
    app = Application([
        (r"/events", MySSE, {"hub": hub, "waiter": waiter}),
        (r"/poll", MyPoll, {"hub": hub, "waiter": waiter}),
        (r"/publish", MyPublish, {"hub": hub}),
    ])

Reading goes through the shared :class:`~tornado_longconn.longpoll.LongPollWaiter`
(one backend subscription per topic for every stream and poll); topics are
published through :func:`~tornado_longconn.subscriptions.subscription_group`,
so they keep history and cursors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import tornado.web

from ._subproto import (
    ERROR_STATUS,
    SubscriptionError,
    format_cursor_map,
    is_topic,
    message_object,
    parse_cursor_map,
    parse_topics,
    resync_reason,
)
from .backpressure import DEFAULT_HIGH_WATER, BackpressureWriter
from .broadcast import BroadcastHub
from .codes import CloseCode
from .connections import ConnectionCounters
from .exceptions import BackendError, BackendUnavailableError, LongConnError
from .log import Cursor
from .logfields import log_fields
from .longpoll import DEFAULT_TIMEOUT, LongPollWaiter, PollResult, WaiterLimitError, check_timeout
from .origin import refuse_cross_origin
from .presence import Member, PresenceEvent, PresenceStore, presence_of
from .presence_http import (
    DEFAULT_BUFFER,
    PollSession,
    PollSessions,
    disconnect_body,
    disconnect_status,
)
from .presence_users import users_of
from .ratelimit import RateLimits, connection_caps_of, user_publish_buckets
from .sse import (
    DEFAULT_KEEPALIVE,
    DEFAULT_RETRY,
    DEFAULT_STALL_TIMEOUT,
    format_comment,
    format_event,
)
from .subscriptions import (
    DEFAULT_MAX_TOPICS,
    SubscriptionCounters,
    SubscriptionHooks,
    subscription_group,
)

__all__ = [
    "SubscriptionHTTPMixin",
    "SubscriptionPollHandler",
    "SubscriptionPublishHandler",
    "SubscriptionSSEHandler",
]

log = logging.getLogger("tornado_longconn.subscriptions")

_JSON: Final = "application/json; charset=UTF-8"
# Presence events an SSE stream holds for its client at most (then presence_gap).
_PRESENCE_QUEUE: Final = 256
# A client id a long-poll or SSE client chooses (``?client=``).
_CLIENT_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class _Refused(Exception):
    """The whole request is answered with an error status."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _after_gap(result: PollResult) -> Cursor:
    """Where a topic continues after a gap: the head, or the new epoch's start."""
    head = result.cursor
    if result.reason == "epoch" and head.offset > 0:
        return Cursor(head.epoch, 0)
    return head


def _resync_object(topic: str, cursor: Cursor, reason: str | None) -> dict[str, Any]:
    return {
        "type": "resync",
        "topic": topic,
        "cursor": str(cursor),
        "reason": resync_reason(reason or "gap"),
    }


# What an SSE stream's queue carries: a topic's messages or gap, an error that
# ends the stream, a presence event, a direct message frame (or the disconnect).
_StreamItem = PollResult | BaseException | PresenceEvent | dict[str, Any]


class _StreamUser:
    """An SSE stream as a connection of its user (:class:`UserRegistry`)."""

    __slots__ = ("client_id", "disconnected", "dropped", "expired", "queue")

    def __init__(self, client: str, queue: asyncio.Queue[tuple[str, _StreamItem]]) -> None:
        self.client_id = client
        self.queue = queue
        self.dropped = 0
        self.disconnected: tuple[int, str] | None = None
        self.expired = False

    def user_message(self, data: Any) -> None:
        try:
            self.queue.put_nowait(("", {"type": "direct", "data": data}))
        except asyncio.QueueFull:
            self.dropped += 1

    def user_disconnect(self, code: int, reason: str) -> None:
        if self.disconnected is None:
            self.disconnected = (int(code), reason)
            # Past a full queue the stream sees the disconnect at its next item.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(("", {"type": "disconnect"}))

    def expire(self) -> None:
        """The identity lapsed: the stream ends with a final 4401 ``expired`` event."""
        if not self.expired:
            self.expired = True
            # Past a full queue the stream sees it at its next item or keep-alive.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(("", {"type": "expired"}))


class SubscriptionHTTPMixin(SubscriptionHooks, tornado.web.RequestHandler):
    """Multi-topic SSE, long-poll and publish for your own ``RequestHandler``.

    Set ``subscription_waiter`` (a shared
    :class:`~tornado_longconn.longpoll.LongPollWaiter`, for SSE and long-poll)
    and ``subscription_hub`` (for publish; None: the application setting
    ``longconn_hub``), usually in ``initialize``. Override the hooks of
    :class:`~tornado_longconn.subscriptions.SubscriptionHooks`; over HTTP
    ``authorize_subscribe`` gets ``params`` None. If you override
    ``on_connection_close``, call ``super()``.

    Settings (class attributes): ``max_topics``
    (:data:`~tornado_longconn.subscriptions.DEFAULT_MAX_TOPICS`: more topics in
    one request is answered 429), ``sse_keepalive``, ``sse_retry``,
    ``sse_high_water``, ``sse_stall_timeout`` (as
    :class:`~tornado_longconn.sse.SSEMixin`), ``longpoll_default_timeout``,
    ``max_connections_per_ip`` / ``max_connections_per_user`` (None: no cap;
    as on :class:`~tornado_longconn.subscriptions.SubscriptionMixin`, sharing
    its counts: a stream or a poll beyond the cap is answered 429 ``limit``
    with ``Retry-After`` and counted in ``subscription_stats(app).refused``),
    ``rate_limits`` (a :class:`~tornado_longconn.ratelimit.RateLimits`; over HTTP
    only its per-user publish limit applies, shared with the user's WebSockets:
    a publish beyond it is answered 429 ``limit``).
    """

    subscription_hub: BroadcastHub | None = None
    subscription_waiter: LongPollWaiter | None = None
    max_topics: int = DEFAULT_MAX_TOPICS
    sse_keepalive: float = DEFAULT_KEEPALIVE
    sse_retry: int | None = DEFAULT_RETRY
    sse_high_water: int = DEFAULT_HIGH_WATER
    sse_stall_timeout: float = DEFAULT_STALL_TIMEOUT
    longpoll_default_timeout: float = DEFAULT_TIMEOUT
    max_connections_per_ip: int | None = None
    max_connections_per_user: int | None = None
    rate_limits: RateLimits | None = None
    subscription_presence: PresenceStore | None = None
    #: Seconds a long-poll client stays present after a poll ends.
    presence_grace: float = 10.0

    _subs_task: asyncio.Future[Any] | None = None
    _subs_gone = False
    _subs_expired = False
    _subs_stream: _StreamUser | None = None

    # ------------------------------------------------------------------ helpers

    def get_subscription_hub(self) -> BroadcastHub:
        """``subscription_hub``, else the application's hub (:meth:`BroadcastHub.of`)."""
        hub = self.subscription_hub
        return hub if hub is not None else BroadcastHub.of(self)

    def _waiter(self) -> LongPollWaiter:
        waiter = self.subscription_waiter
        if waiter is None:
            raise RuntimeError("set subscription_waiter (a LongPollWaiter) on the handler")
        return waiter

    def _answer_error(self, status: int, code: str, reason: str) -> None:
        SubscriptionCounters.for_application(self.application).error(code)
        self.set_status(status)
        self.set_header("Content-Type", _JSON)
        self.set_header("Cache-Control", "no-store")
        if status == 503:
            self.set_header("Retry-After", "1")
        self.finish(_dumps({"code": code, "reason": reason}))

    def _requested(self, *, sse: bool) -> tuple[list[str], dict[str, Cursor | None]]:
        """The topics and start cursors of this request, or :class:`_Refused`."""
        raw_topics = self.get_query_argument("topics", "") or ""
        raw_map = ""
        if sse:
            raw_map = self.request.headers.get("Last-Event-ID", "")
        if not raw_map:
            raw_map = self.get_query_argument("cursors", "") or ""
        limit = self.max_topics
        if raw_topics.count(",") >= limit or raw_map.count(",") >= limit:
            raise _Refused(429, "limit", f"more than {limit} topics")
        try:
            cursors = parse_cursor_map(raw_map, max_topics=limit)
            topics = parse_topics(raw_topics, max_topics=limit) or list(cursors)
        except ValueError as exc:
            raise _Refused(400, "bad_request", str(exc)) from None
        if not topics:
            raise _Refused(400, "bad_request", "no topics: pass ?topics=a,b")
        return topics, {t: cursors.get(t) for t in topics}

    async def _authorized(self, topics: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
        """The topics the hook allows, and an error object for each refused one."""
        allowed: list[str] = []
        errors: list[dict[str, Any]] = []
        counters = SubscriptionCounters.for_application(self.application)
        for topic in topics:
            try:
                value = self.authorize_subscribe(topic, None)
                if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                    value = await value
                if value:
                    allowed.append(topic)
                    continue
                error = SubscriptionError("forbidden", "subscribe refused")
            except SubscriptionError as exc:
                if exc.close:
                    raise _Refused(exc.status, exc.code, exc.reason) from None
                error = exc
            except Exception:
                log.exception(
                    "authorize_subscribe(%r) failed", topic, extra=log_fields(self, topic=topic)
                )
                error = SubscriptionError("internal", "internal error")
            counters.error(error.code)
            errors.append(
                {
                    "topic": topic,
                    "code": error.code,
                    "status": ERROR_STATUS[error.code],
                    "reason": error.reason,
                }
            )
        return allowed, errors

    async def _guarded(self, work: Any) -> Any:
        """Run ``work`` as the request's task, cancelled when the client goes away."""
        self._subs_task = asyncio.ensure_future(work)
        try:
            return await self._subs_task
        except asyncio.CancelledError:
            if self._subs_gone or self._subs_expired:
                return None
            raise
        finally:
            self._subs_task = None

    def _check_user_publish(self, topic: str) -> None:
        """The per-user publish limit of ``rate_limits``: ``SubscriptionError`` limit past it."""
        limits = self.rate_limits
        buckets = (
            None if limits is None else user_publish_buckets(self.application.settings, limits)
        )
        user = None if buckets is None else self.presence_user()
        if buckets is None or user is None:
            return
        if not buckets.try_take((user, topic), time.monotonic()):
            SubscriptionCounters.for_application(self.application).rate_limit("user_publishes")
            self.set_header("Retry-After", "1")
            raise SubscriptionError("limit", "rate limit: too many user_publishes")

    async def _capped(self, work: Callable[[], Awaitable[None]], *, stream: bool = False) -> None:
        """Run ``work`` counted under the connection caps, or answer 429 when one is full.

        A request from another origin is answered 403 first (:mod:`tornado_longconn.origin`);
        one whose identity expired (``connection_expiry()``) 401 ``unauthorized``.
        A stream (``stream``) ends when the identity expires.
        """
        if refuse_cross_origin(self):
            return
        expires_at = None if self.current_user is None else self.connection_expiry()
        if expires_at is not None:
            left = expires_at - time.time()
            if left <= 0:
                self._answer_error(401, "unauthorized", "expired")
                return
            if stream:
                timer = asyncio.get_running_loop().call_later(left, self._expired)
                try:
                    await self._capped_work(work)
                finally:
                    timer.cancel()
                return
        await self._capped_work(work)

    def _expired(self) -> None:
        """The identity of a stream expired: end it with a final ``event: disconnect``
        (4401, ``expired``) once it runs, else cancel it; the reconnect gets 401."""
        task = self._subs_task
        if task is not None and not self._subs_gone:
            SubscriptionCounters.for_application(self.application).error("unauthorized")
            self._subs_expired = True
            stream = self._subs_stream
            if stream is not None:
                stream.expire()
            else:
                task.cancel()

    async def _capped_work(self, work: Callable[[], Awaitable[None]]) -> None:
        if self.max_connections_per_ip is None and self.max_connections_per_user is None:
            await work()
            return
        caps = connection_caps_of(self.application.settings)
        held, refused = await caps.acquire_connection(
            (
                ("ip", self.request.remote_ip, self.max_connections_per_ip),
                ("user", self.presence_user(), self.max_connections_per_user),
            )
        )
        if refused is not None:
            SubscriptionCounters.for_application(self.application).refuse(refused)
            self.set_header("Retry-After", "1")
            self._answer_error(429, "limit", f"too many connections per {refused}")
            return
        try:
            await work()
        finally:
            caps.release_connection(held)

    def subscription_client_gone(self) -> bool:
        """True once the client closed the connection."""
        return self._subs_gone

    def on_connection_close(self) -> None:
        """Stop the stream or the poll: the client is gone."""
        self._subs_gone = True
        task = self._subs_task
        if task is not None:
            task.cancel()
        super().on_connection_close()

    # ------------------------------------------------------------------ presence

    def _presence_member(self, transport: str, client: str, topic: str) -> Member:
        try:
            return Member(
                client, self.presence_user(), self.presence_info(topic), time.time(), transport
            )
        except Exception:
            log.exception("presence hooks failed", extra=log_fields(self, topic=topic))
            return Member(client, None, None, time.time(), transport)

    def presence_client(self) -> str | None:
        """This request's presence client id: ``?client=`` when valid, else None.

        A long-poll without one is not a member; an SSE stream without one gets
        a random id. Override it to derive the id otherwise (e.g. per user).
        """
        raw = self.get_query_argument("client", None)
        return raw if raw is not None and _CLIENT_RE.fullmatch(raw) else None

    # ------------------------------------------------------------------ long-poll

    async def poll_subscriptions(self) -> None:
        """Answer ``GET ?topics=&cursors=&timeout=`` with the messages of many topics.

        ``200 {"messages": [{"topic","cursor","data"}, ...], "cursors": {topic:
        cursor}, "resync": [{"type","topic","cursor","reason"}], "errors":
        [{"topic","code","status","reason"}]}`` as soon as any allowed topic has
        messages or a resync; with an empty ``messages`` list after the timeout.
        Poll again with ``cursors`` built from the answer's ``cursors``. A
        malformed request gets 400, too many topics 429, a full waiter or a
        failing backend 503 (429 also beyond a connection cap); every status
        comes with ``{"code","reason"}``.

        With ``?client=<id>`` the client has a session
        (:class:`~tornado_longconn.presence_http.PollSessions`): it is a presence
        member of its topics and a connection of its user, and the answer's
        ``events`` list carries its topics' presence events (``?presence=1``)
        and messages to its user. A disconnect of its user answers the pending
        or next poll with :func:`~tornado_longconn.presence_http.disconnect_status`
        and ``{"code":"disconnected","close_code","reason"}``.
        """
        await self._capped(self._poll_subscriptions)

    async def _poll_subscriptions(self) -> None:
        """poll_subscriptions without the connection caps."""
        try:
            topics, cursors = self._requested(sse=False)
            raw_timeout = self.get_query_argument("timeout", None)
            timeout = self.longpoll_default_timeout
            if raw_timeout is not None:
                try:
                    timeout = check_timeout(float(raw_timeout), self._waiter().max_timeout)
                except ValueError:
                    raise _Refused(400, "bad_request", "timeout must be a number >= 0") from None
            allowed, errors = await self._authorized(topics)
        except _Refused as exc:
            self._answer_error(exc.status, exc.code, exc.reason)
            return
        if self._subs_gone:
            return
        store = presence_of(self)
        registry = users_of(self)
        client = self.presence_client() if store is not None or registry is not None else None
        sessions = PollSessions.for_application(self.application)
        if client is not None:
            revoked = sessions.revoked(client)
            if revoked is not None:
                self._answer_disconnected(*revoked)
                return
        counters = ConnectionCounters.for_application(self.application)
        counters.opened(self, "longpoll")
        session: PollSession | None = None
        try:
            if client is not None:
                session = await sessions.begin(
                    client,
                    self.presence_user(),
                    {}
                    if store is None
                    else {t: self._presence_member("longpoll", client, t) for t in allowed},
                    watch=self.get_query_argument("presence", "") in ("1", "true"),
                    store=store,
                    registry=registry,
                )
            body = await self._guarded(self._poll(allowed, cursors, errors, timeout, session))
        except (WaiterLimitError, BackendError) as exc:
            log.warning("multi-topic long-poll failed: %s", exc, extra=log_fields(self))
            self._answer_error(503, "unavailable", "backend unavailable")
            return
        finally:
            counters.closed(self)
            if session is not None:
                sessions.end(session, self.presence_grace)
        if body is None:
            return
        if session is not None and session.revoked is not None:
            self._answer_disconnected(*session.revoked)
            return
        self.set_header("Content-Type", _JSON)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)

    def _answer_disconnected(self, code: int, reason: str) -> None:
        """Answer a request of a disconnected client (see :func:`disconnect_status`)."""
        SubscriptionCounters.for_application(self.application).error("disconnected")
        self.set_status(disconnect_status(code))
        self.set_header("Content-Type", _JSON)
        self.set_header("Cache-Control", "no-store")
        self.finish(_dumps(disconnect_body(code, reason)))

    async def _poll(
        self,
        topics: list[str],
        cursors: dict[str, Cursor | None],
        errors: list[dict[str, Any]],
        timeout: float,
        session: PollSession | None = None,
    ) -> str:
        waiter = self._waiter()
        messages: list[dict[str, Any]] = []
        resync: list[dict[str, Any]] = []
        positions: dict[str, Cursor | None] = {t: cursors[t] for t in topics}

        def absorb(topic: str, result: PollResult) -> bool:
            if result.gap:
                after = _after_gap(result)
                positions[topic] = after
                resync.append(_resync_object(topic, after, result.reason))
                return True
            positions[topic] = result.cursor
            messages.extend(message_object(m) for m in result.messages)
            return bool(result.messages)

        # What is there now, for every topic at once (and the heads of "from now").
        # A waiter closed meanwhile (a drain) answers with what was found: no
        # messages and the cursors as they are, and the client polls again.
        try:
            if topics:
                now = await asyncio.gather(*(waiter.wait(positions[t], 0, topic=t) for t in topics))
                found = session is not None and session.pending()
                for topic, result in zip(topics, now, strict=True):
                    found |= absorb(topic, result)
                if not found and timeout > 0:
                    tasks: dict[asyncio.Future[Any], str | None] = {
                        asyncio.ensure_future(waiter.wait(positions[t], timeout, topic=t)): t
                        for t in topics
                    }
                    if session is not None:
                        tasks[asyncio.ensure_future(session.wake.wait())] = None
                    try:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                    for task, name in tasks.items():
                        if name is not None and task in done and not task.cancelled():
                            error = task.exception()
                            if error is not None:
                                raise error
                            absorb(name, task.result())
        except LongConnError:
            if not waiter.closed:
                raise
        return _dumps(
            {
                "messages": messages,
                "cursors": {t: None if c is None else str(c) for t, c in positions.items()},
                "resync": resync,
                "errors": errors,
                "events": [] if session is None else session.take(),
            }
        )

    # ------------------------------------------------------------------ SSE

    async def stream_subscriptions(self) -> None:
        """Stream the messages of many topics as Server-Sent Events until the client leaves.

        The stream starts with ``event: ready`` (``id`` = the start cursor map,
        ``data`` = ``{"cursors": {...}}``), then an ``event: error`` per refused
        topic, then one ``message`` event per message (``id`` = the cursor map
        after it, ``data`` = ``{"topic","cursor","data"}``) and ``event: resync``
        where a topic cannot resume exactly. With ``?presence=1`` (and a presence
        store) also ``event: join`` / ``event: leave`` / ``event: presence_gap``
        with the protocol's event objects as data, for changes after ``ready``
        (the stream's own join first). Answers 400/429/503 with
        ``{"code","reason"}`` before the stream starts (429 also beyond a
        connection cap). A stream with a user is a connection of that user
        (:class:`~tornado_longconn.presence_users.UserRegistry`): ``event:
        direct`` for each message, and a final ``event: disconnect``
        (``{"type":"disconnect","code","reason"}``) before the stream ends when
        the user is disconnected; a new stream with that ``client`` is then
        refused as a long-poll would be.
        """
        await self._capped(self._stream_subscriptions, stream=True)

    async def _stream_subscriptions(self) -> None:
        """stream_subscriptions without the connection caps."""
        try:
            topics, cursors = self._requested(sse=True)
            allowed, errors = await self._authorized(topics)
            waiter = self._waiter()
            chosen = self.presence_client()
            if chosen is not None:
                revoked = PollSessions.for_application(self.application).revoked(chosen)
                if revoked is not None:
                    self._answer_disconnected(*revoked)
                    return
            with waiter.stream():
                if self._subs_gone:
                    return
                counters = ConnectionCounters.for_application(self.application)
                counters.opened(self, "sse")
                store = presence_of(self)
                client = chosen or secrets.token_hex(8)
                fields = log_fields(self, topic=",".join(allowed))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("SSE stream on %d topics", len(allowed), extra=fields)
                try:
                    await self._guarded(self._stream(allowed, cursors, errors, client))
                finally:
                    counters.closed(self)
                    if store is not None:
                        for topic in allowed:
                            store.leave_nowait(topic, client)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("SSE stream on %d topics ended", len(allowed), extra=fields)
        except _Refused as exc:
            self._answer_error(exc.status, exc.code, exc.reason)
        except WaiterLimitError as exc:
            self._answer_error(503, "unavailable", str(exc))

    async def _stream(
        self,
        topics: list[str],
        cursors: dict[str, Cursor | None],
        errors: list[dict[str, Any]],
        client: str = "",
    ) -> None:
        waiter = self._waiter()
        positions: dict[str, Cursor | None] = {t: cursors[t] for t in topics}
        try:
            heads = await asyncio.gather(
                *(waiter.wait(None, 0, topic=t) for t in topics if positions[t] is None)
            )
        except BackendError as exc:
            log.warning("multi-topic SSE could not start: %s", exc, extra=log_fields(self))
            self._answer_error(503, "unavailable", "backend unavailable")
            return
        except LongConnError:
            if not waiter.closed:
                raise
            self._answer_error(503, "unavailable", "the server is shutting down")
            return
        fresh = iter(heads)
        for topic in topics:
            if positions[topic] is None:
                positions[topic] = next(fresh).cursor
        # One task per topic pulls from the waiter; a queue of one item per topic
        # keeps them from running ahead of the client (the backlog stays in history).
        # Presence events (?presence=1) have room of their own; past it they are
        # dropped and the topic gets a presence_gap event.
        store = presence_of(self)
        if store is None or self.get_query_argument("presence", "") not in ("1", "true"):
            store = None
        registry = users_of(self)
        user = None if registry is None else self.presence_user()
        room = max(1, len(topics)) + (_PRESENCE_QUEUE if store else 0)
        queue: asyncio.Queue[tuple[str, _StreamItem]] = asyncio.Queue(
            maxsize=room + (DEFAULT_BUFFER if user is not None else 0)
        )
        lost: dict[str, None] = {}
        conn = _StreamUser(client, queue)
        self._subs_stream = conn

        def on_presence(event: PresenceEvent) -> None:
            try:
                queue.put_nowait((event.topic, event))
            except asyncio.QueueFull:
                lost[event.topic] = None

        if store is not None:
            try:
                for topic in topics:
                    await store.watch(topic, on_presence)
            except BackendError as exc:
                for topic in topics:
                    store.unwatch(topic, on_presence)
                log.warning("multi-topic SSE could not start: %s", exc, extra=log_fields(self))
                self._answer_error(503, "unavailable", "backend unavailable")
                return
        # Join after watching, so that the stream's own join reaches it (as on a
        # WebSocket); the caller leaves when the stream ends.
        members = presence_of(self)
        if members is not None:
            for topic in topics:
                members.join_nowait(topic, self._presence_member("sse", client, topic))
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")
        writer = BackpressureWriter.of(self, high_water=self.sse_high_water)

        def cursor_id() -> str:
            return format_cursor_map(positions)

        start = {t: str(c) for t, c in positions.items()}
        chunks = [
            format_event(
                _dumps({"cursors": start}), id=cursor_id(), event="ready", retry=self.sse_retry
            )
        ]
        chunks.extend(format_event(_dumps(e), event="error") for e in errors)
        tasks = [asyncio.ensure_future(self._pull(waiter, t, positions[t], queue)) for t in topics]
        if registry is not None and user is not None:
            registry.register(conn, user, "sse")
        try:
            await writer.send(b"".join(chunks))
            while True:
                try:
                    topic, item = await asyncio.wait_for(queue.get(), self.sse_keepalive)
                except asyncio.TimeoutError:
                    chunk = format_comment("keep-alive")
                    item = None
                if conn.expired:
                    final = {
                        "type": "disconnect",
                        "code": int(CloseCode.UNAUTHORIZED),
                        "reason": "expired",
                    }
                    await writer.send(format_event(_dumps(final), event="disconnect"))
                    break
                if item is not None:
                    if isinstance(item, BaseException):
                        log.warning(
                            "multi-topic SSE: ending stream: %s", item, extra=log_fields(self)
                        )
                        break
                    parts: list[bytes] = []
                    if conn.disconnected is not None:
                        code, reason = conn.disconnected
                        final = {"type": "disconnect", "code": code, "reason": reason}
                        await writer.send(format_event(_dumps(final), event="disconnect"))
                        PollSessions.for_application(self.application).stream_disconnected(
                            client, code, reason
                        )
                        break
                    if isinstance(item, dict):
                        parts.append(format_event(_dumps(item), event="direct"))
                    elif isinstance(item, PresenceEvent):
                        frame = item.to_json()
                        parts.append(format_event(_dumps(frame), event=frame["type"]))
                    elif item.gap:
                        after = _after_gap(item)
                        positions[topic] = after
                        parts.append(
                            format_event(
                                _dumps(_resync_object(topic, after, item.reason)),
                                id=cursor_id(),
                                event="resync",
                            )
                        )
                    if isinstance(item, PollResult):
                        for message in item.messages:
                            positions[topic] = message.cursor
                            parts.append(
                                format_event(_dumps(message_object(message)), id=cursor_id())
                            )
                    for name in lost:
                        gap = PresenceEvent(name, "gap", reason="overflow").to_json()
                        parts.append(format_event(_dumps(gap), event="presence_gap"))
                    lost.clear()
                    if conn.dropped:
                        gap = {"type": "direct_gap", "dropped": conn.dropped}
                        parts.append(format_event(_dumps(gap), event="direct_gap"))
                        PollSessions.for_application(self.application).count_dropped(conn.dropped)
                        conn.dropped = 0
                    chunk = b"".join(parts)
                if writer.buffered <= writer.high_water:
                    await writer.send(chunk)
                else:
                    try:
                        await asyncio.wait_for(writer.send(chunk), self.sse_stall_timeout)
                    except asyncio.TimeoutError:
                        log.info(
                            "multi-topic SSE: client stalled, disconnecting", extra=log_fields(self)
                        )
                        break
        except LongConnError:  # the client is gone
            return
        finally:
            if registry is not None and user is not None:
                registry.unregister(conn, user)
            if store is not None:
                for topic in topics:
                    store.unwatch(topic, on_presence)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()

    async def _pull(
        self,
        waiter: LongPollWaiter,
        topic: str,
        cursor: Cursor | None,
        queue: asyncio.Queue[tuple[str, _StreamItem]],
    ) -> None:
        try:
            while True:
                result = await waiter.wait(cursor, self.sse_keepalive, topic=topic)
                if result.gap:
                    cursor = _after_gap(result)
                elif result.messages:
                    cursor = result.cursor
                else:
                    continue
                await queue.put((topic, result))
        except asyncio.CancelledError:
            raise
        except (BackendError, LongConnError) as exc:
            await queue.put((topic, exc))

    # ------------------------------------------------------------------ publish

    async def publish_from_body(self) -> None:
        """Publish ``{"topic": ..., "data": <json>}`` from the request body.

        ``200 {"topic","cursor"}``; ``400`` malformed, ``403`` refused by
        ``authorize_publish``, ``500`` the hook raised, ``503`` backend
        unavailable; errors carry ``{"code","reason"}``.
        """
        if refuse_cross_origin(self):
            return
        counters = SubscriptionCounters.for_application(self.application)
        try:
            try:
                body = json.loads(self.request.body or b"null")
            except (ValueError, RecursionError):
                raise SubscriptionError("bad_request", "the body is not JSON") from None
            if not isinstance(body, dict) or "data" not in body:
                raise SubscriptionError("bad_request", 'the body is {"topic": ..., "data": ...}')
            topic = body.get("topic")
            if not is_topic(topic):
                raise SubscriptionError("bad_request", "invalid topic")
            assert isinstance(topic, str)
            data = body["data"]
            try:
                allowed = self.authorize_publish(topic, data)
                if asyncio.iscoroutine(allowed) or isinstance(allowed, asyncio.Future):
                    allowed = await allowed
            except SubscriptionError:
                raise
            except Exception:
                log.exception(
                    "authorize_publish(%r) failed", topic, extra=log_fields(self, topic=topic)
                )
                raise SubscriptionError("internal", "internal error") from None
            if not allowed:
                raise SubscriptionError("forbidden", "publish refused")
            self._check_user_publish(topic)
            group = subscription_group(self.get_subscription_hub(), topic)
            try:
                result = await group.publish(_dumps(data))
            except BackendUnavailableError:
                raise SubscriptionError("unavailable", "backend unavailable") from None
        except SubscriptionError as exc:
            self._answer_error(exc.status, exc.code, exc.reason)
            return
        counters.published += 1
        cursor = result.cursor
        self.set_header("Content-Type", _JSON)
        self.set_header("Cache-Control", "no-store")
        self.finish(_dumps({"topic": topic, "cursor": None if cursor is None else str(cursor)}))


class _Configured(SubscriptionHTTPMixin):
    def initialize(
        self, hub: BroadcastHub | None = None, waiter: LongPollWaiter | None = None
    ) -> None:
        """Store the shared ``hub`` (publish) and ``waiter`` (SSE, long-poll)."""
        self.subscription_hub = hub
        self.subscription_waiter = waiter


class SubscriptionSSEHandler(_Configured):
    """``GET``: one SSE stream for a set of topics (see :meth:`~SubscriptionHTTPMixin.stream_subscriptions`).

    ``initialize`` kwargs: ``waiter`` (a shared
    :class:`~tornado_longconn.longpoll.LongPollWaiter`) and ``hub``. Subclass it
    to add the authorization hooks.
    """

    async def get(self, *args: str, **kwargs: str) -> None:
        """Stream the requested topics."""
        await self.stream_subscriptions()


class SubscriptionPollHandler(_Configured):
    """``GET``: one long-poll for a set of topics (see :meth:`~SubscriptionHTTPMixin.poll_subscriptions`).

    ``initialize`` kwargs: ``waiter`` and ``hub``. Subclass it to add the hooks.
    """

    async def get(self, *args: str, **kwargs: str) -> None:
        """Answer the poll."""
        await self.poll_subscriptions()


class SubscriptionPublishHandler(_Configured):
    """``POST``: publish to a topic (see :meth:`~SubscriptionHTTPMixin.publish_from_body`).

    ``initialize`` kwargs: ``hub``. Its ``authorize_publish`` refuses by
    default: subclass it and say who may publish where.
    """

    async def post(self, *args: str, **kwargs: str) -> None:
        """Publish the body's message."""
        await self.publish_from_body()

    def options(self, *args: str, **kwargs: str) -> None:
        """The CORS preflight: 204 for an allowed origin, 403 for another (:mod:`~tornado_longconn.origin`)."""
        if refuse_cross_origin(self):
            return
        self.set_header("Access-Control-Allow-Methods", "POST, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Content-Type")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()
