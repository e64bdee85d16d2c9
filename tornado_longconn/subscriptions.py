"""Client-driven subscriptions: many topics on one WebSocket, each with its own cursor.

Mix :class:`SubscriptionMixin` into a ``WebSocketHandler`` and the client
chooses its topics with the versioned JSON protocol of
``docs/reference/subscriptions-protocol.md`` (the one ``longconn.js`` speaks):
``subscribe`` (optionally from a cursor: history after it, then live, no gap or
duplicate at the seam, or an explicit ``resync``), ``unsubscribe``, ``publish``
and ``call``. Every message arrives as ``{"topic","cursor","data"}`` (bytes in a
binary frame with a JSON header). You decide who may do what with three hooks,
sync or async, that see Tornado's ``current_user``::

    class Live(SubscriptionMixin, tornado.websocket.WebSocketHandler):
        def initialize(self, hub: BroadcastHub) -> None:
            self.subscription_hub = hub

        def get_current_user(self) -> str | None:
            return self.get_signed_cookie("user", max_age_days=1)

        async def authorize_subscribe(self, topic: str, params: Any) -> bool:
            return topic.startswith("room:") or topic == f"dm:{self.current_user}"

        def authorize_publish(self, topic: str, data: Any) -> bool:
            return topic.startswith("room:")

        async def on_call(self, method: str, params: Any) -> Any:
            if method == "rooms.list":
                return ["room:1", "room:2"]
            raise SubscriptionError("not_found", f"no method {method!r}")

Each topic is a :class:`~tornado_longconn.broadcast.BroadcastGroup` of the hub
(made by :func:`subscription_group`), so the fan-out is the groups' (one
envelope encode per message per topic, one shared
:class:`~tornado_longconn.backpressure.BackpressureWriter` per connection) and
the server-side API (``group.join(self)`` in ``open()``) keeps working next to
it. A subscription costs one :class:`~tornado_longconn.broadcast.Membership`.

Requests for one topic are handled in the order they arrived; requests for
different topics and calls run concurrently (at most ``max_inflight`` at once:
beyond it the handler stops reading the socket until one finishes). Nothing a
client sends raises into the handler: every failed request is answered with an
``error`` frame (code, status, reason); a malformed frame is also counted, and
the connection is closed with 1008 once the count passes
``max_protocol_errors``. Counters: :func:`subscription_stats`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import tornado.web
import tornado.websocket

from ._frames import OP_TEXT, Encoded
from ._subproto import (
    PROTOCOL_VERSION,
    ProtocolError,
    Request,
    SubscriptionError,
    error_frame,
    frame,
    parse_frame,
    resync_frame,
    topic_envelope,
)
from .auth import Credentials, ExpiredError, SessionExpiry
from .backoff import ReconnectBackoff, retry_unavailable
from .backpressure import BackpressureWriter
from .broadcast import (
    BroadcastGroup,
    BroadcastHub,
    GapPolicy,
    Membership,
    PublishResult,
    _members_of,
)
from .codes import CloseCode
from .connections import ConnectionCounters
from .exceptions import BackendError, BackendUnavailableError
from .log import Cursor, HistoryLimit
from .logfields import log_fields
from .origin import count_refused, request_origin_allowed
from .presence import Member, PresenceEvent, PresenceStore, presence_of
from .presence_users import UserRegistry, users_of
from .ratelimit import (
    ConnectionRateLimiter,
    RateLimits,
    connection_caps_of,
    user_publish_buckets,
)
from .stats import COUNTER, GAUGE, TALLY

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_PENDING_CALLS",
    "DEFAULT_MAX_PROTOCOL_ERRORS",
    "DEFAULT_MAX_TOPICS",
    "PROTOCOL_VERSION",
    "SubscriptionCounters",
    "SubscriptionError",
    "SubscriptionHooks",
    "SubscriptionMixin",
    "SubscriptionStats",
    "subscription_group",
    "subscription_stats",
]

log = logging.getLogger("tornado_longconn.subscriptions")

#: Topics one connection may hold at once.
DEFAULT_MAX_TOPICS: Final = 100
#: ``call`` requests of one connection that may be pending at once.
DEFAULT_MAX_PENDING_CALLS: Final = 16
#: Seconds a ``call`` may take before it is answered with ``timeout``.
DEFAULT_CALL_TIMEOUT: Final = 10.0
#: Malformed frames tolerated per connection; the next one closes it with 1008.
DEFAULT_MAX_PROTOCOL_ERRORS: Final = 10
#: Largest client frame (bytes) the protocol accepts; larger ones get ``too_large``.
DEFAULT_MAX_FRAME_SIZE: Final = 64 * 1024
#: Requests of one connection handled at once before the socket is read no more.
DEFAULT_MAX_INFLIGHT: Final = 64

# History of protocol topics when the hub keeps none (cursors need it).
_DEFAULT_HISTORY: Final = HistoryLimit()
# A subscribe's head read that fails as unavailable is tried again this many times
# (jittered, at most min(cap, base * 2**attempt) s apart) before the answer
# ``unavailable``; the same schedule as a resuming member's reads.
_HEAD_RETRIES: Final = 6
_HEAD_RETRY_BASE: Final = 0.1
_HEAD_RETRY_CAP: Final = 2.0

#: The application setting that holds the :class:`SubscriptionCounters`.
_SETTING: Final = "longconn_subscriptions"


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """A snapshot of an application's subscription counters (:func:`subscription_stats`).

    ``connections`` and ``subscriptions`` are gauges (WebSocket connections
    speaking the protocol, and the topics they hold now); the rest are counters:
    ``subscribed`` / ``unsubscribed`` / ``published`` / ``calls`` requests that
    succeeded, ``errors`` error replies by code (a tally, e.g. ``forbidden``,
    ``limit``), ``protocol_errors`` malformed frames, ``closed`` connections
    closed by the protocol by close code (a tally: 1008, 4401, 4403, 4429),
    ``rate_limited`` requests refused by a rate limit, by limit (a tally:
    ``messages``, ``bytes``, ``publishes``, ``user_publishes``; each also counted in ``errors`` as
    ``limit``), ``refused`` connections refused by a connection cap, by cap
    (a tally: ``ip``, ``user``; WebSocket and HTTP).
    """

    connections: int = field(default=0, metadata=GAUGE)
    subscriptions: int = field(default=0, metadata=GAUGE)
    subscribed: int = field(default=0, metadata=COUNTER)
    unsubscribed: int = field(default=0, metadata=COUNTER)
    published: int = field(default=0, metadata=COUNTER)
    calls: int = field(default=0, metadata=COUNTER)
    protocol_errors: int = field(default=0, metadata=COUNTER)
    errors: tuple[tuple[str, int], ...] = field(default=(), metadata=TALLY)
    closed: tuple[tuple[int, int], ...] = field(default=(), metadata=TALLY)
    rate_limited: tuple[tuple[str, int], ...] = field(default=(), metadata=TALLY)
    refused: tuple[tuple[str, int], ...] = field(default=(), metadata=TALLY)


class SubscriptionCounters:
    """The live counters behind :class:`SubscriptionStats` (one per application).

    Stored at ``application.settings["longconn_subscriptions"]`` (created on
    first use). Updated per request, never per delivered message.

    >>> counters = SubscriptionCounters()
    >>> counters.error("forbidden"); counters.error("limit"); counters.error("forbidden")
    >>> dict(counters.stats().errors)
    {'forbidden': 2, 'limit': 1}
    """

    __slots__ = (
        "_closed",
        "_errors",
        "_rate_limited",
        "_refused",
        "calls",
        "connections",
        "protocol_errors",
        "published",
        "subscribed",
        "subscriptions",
        "unsubscribed",
    )

    def __init__(self) -> None:
        self.connections = 0
        self.subscriptions = 0
        self.subscribed = 0
        self.unsubscribed = 0
        self.published = 0
        self.calls = 0
        self.protocol_errors = 0
        self._errors: dict[str, int] = {}
        self._closed: dict[int, int] = {}
        self._rate_limited: dict[str, int] = {}
        self._refused: dict[str, int] = {}

    @classmethod
    def for_application(cls, application: tornado.web.Application) -> SubscriptionCounters:
        """The application's counters, created if missing (``TypeError`` if the setting is taken)."""
        counters = application.settings.get(_SETTING)
        if counters is None:
            counters = application.settings[_SETTING] = cls()
        if not isinstance(counters, SubscriptionCounters):
            raise TypeError(f"settings[{_SETTING!r}] must be a SubscriptionCounters")
        return counters

    def error(self, code: str) -> None:
        """Count one error reply with ``code``."""
        self._errors[code] = self._errors.get(code, 0) + 1

    def close(self, code: int) -> None:
        """Count one connection closed by the protocol with ``code``."""
        self._closed[code] = self._closed.get(code, 0) + 1

    def rate_limit(self, kind: str) -> None:
        """Count one request refused by the rate limit ``kind``."""
        self._rate_limited[kind] = self._rate_limited.get(kind, 0) + 1

    def refuse(self, cap: str) -> None:
        """Count one connection refused by the connection cap ``cap`` (``ip``, ``user``)."""
        self._refused[cap] = self._refused.get(cap, 0) + 1

    def stats(self) -> SubscriptionStats:
        """A snapshot (:class:`SubscriptionStats`)."""
        return SubscriptionStats(
            connections=self.connections,
            subscriptions=self.subscriptions,
            subscribed=self.subscribed,
            unsubscribed=self.unsubscribed,
            published=self.published,
            calls=self.calls,
            protocol_errors=self.protocol_errors,
            errors=tuple(sorted(self._errors.items())),
            closed=tuple(sorted(self._closed.items())),
            rate_limited=tuple(sorted(self._rate_limited.items())),
            refused=tuple(sorted(self._refused.items())),
        )


def subscription_stats(application: tornado.web.Application) -> SubscriptionStats:
    """A snapshot of ``application``'s subscription counters (WebSocket and HTTP)."""
    return SubscriptionCounters.for_application(application).stats()


def subscription_group(hub: BroadcastHub, topic: str) -> BroadcastGroup:
    """The hub's group for a protocol topic, created with the protocol's options.

    The group keeps history (the hub's, else 1,000 messages: cursors need it),
    sends each message as ``{"topic","cursor","data"}`` (bytes in the binary
    form), and tells a member that cannot resume exactly with a ``resync`` frame
    and keeps it (``GapPolicy.NOTICE``). Raises ``ValueError`` when the hub
    already has a group of that name made with other options (a topic served by
    the protocol must be made here, or with the same options).
    """
    group = hub.get(topic)
    if group is not None:
        options = group.options
        if options.envelope is topic_envelope and options.notice is resync_frame:
            return group  # made here before: skip resolving the options again
    return hub.group(
        topic,
        history=hub.history or _DEFAULT_HISTORY,
        envelope=topic_envelope,
        gap_policy=GapPolicy.NOTICE,
        notice=resync_frame,
    )


async def _resolve(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _close_code(error: SubscriptionError) -> int:
    if error.code == "unauthorized":
        return int(CloseCode.UNAUTHORIZED)
    if error.code == "forbidden":
        return int(CloseCode.FORBIDDEN)
    return int(CloseCode.POLICY_VIOLATION)


class SubscriptionHooks:
    """The authorization and call hooks shared by the WebSocket and HTTP handlers.

    Override them in your handler; each may be a plain method or ``async``.
    Identity comes from Tornado: ``self.current_user`` (your
    ``get_current_user``, or set in ``prepare``).

    * :meth:`authorize_subscribe` -- default: allow.
    * :meth:`authorize_publish` -- default: refuse (clients publish nothing
      unless you say so).
    * :meth:`on_call` -- default: ``not_found``.

    A hook returning a false value refuses with ``forbidden`` (403); raising
    :class:`SubscriptionError` refuses with its code (``close=True``: the whole
    connection); raising anything else answers ``internal`` (500) and logs the
    exception. The request is then not carried out: no half-made subscription.
    """

    def authorize_subscribe(self, topic: str, params: Any) -> bool | Awaitable[bool]:
        """May this connection read ``topic``? ``params`` is the subscribe's ``params`` or None."""
        return True

    def authorize_publish(self, topic: str, data: Any) -> bool | Awaitable[bool]:
        """May this connection publish ``data`` (a JSON value, or ``bytes``) to ``topic``?"""
        return False

    def on_call(self, method: str, params: Any) -> Any:
        """Answer a ``call``: return a JSON value (or an awaitable of one).

        The default raises :class:`SubscriptionError` ``not_found``.
        """
        raise SubscriptionError("not_found", f"unknown method {method[:64]!r}")

    def connection_expiry(self) -> float | None:
        """When the identity of ``current_user`` expires (seconds since the epoch; None: never).

        Called once at ``open`` when there is a user (e.g. return the ``exp``
        of the token your ``get_current_user`` read). A WebSocket still open at
        that time is closed with 4401 (``"expired"``) unless the client sent a
        ``refresh`` with a new token before.
        """
        return None

    def authenticate(self, token: str) -> Credentials | Awaitable[Credentials]:
        """Check the token of an ``auth`` or ``refresh`` request; return its :class:`Credentials`.

        Raise :class:`SubscriptionError` ``unauthorized`` for a forged or
        expired token (the connection is then closed with 4401) or
        ``forbidden`` (closed with 4403). The default accepts no token
        (``unauthorized``).
        """
        raise SubscriptionError("unauthorized", "token authentication is not enabled")

    def presence_user(self) -> str | None:
        """The user id of this connection's presence (default: ``str(current_user)``, or None)."""
        user = getattr(self, "current_user", None)
        return None if user is None else str(user)

    def presence_info(self, topic: str) -> Any:
        """The JSON value other members see with this connection in ``topic`` (default None).

        Called once per topic joined, when presence is on; keep it small and public.
        """
        return None


class SubscriptionMixin(SubscriptionHooks, tornado.websocket.WebSocketHandler):
    """The subscriptions protocol (v1) on a ``WebSocketHandler``.

    Put it before ``WebSocketHandler`` in the bases (after
    :class:`~tornado_longconn.heartbeat.HeartbeatMixin` when you use both, whose
    application-level ping is the protocol's ``{"type":"ping"}``). If you
    override ``open``, ``on_message`` or ``on_connection_close``, call
    ``super()`` (``open`` sends ``welcome``; it is not a coroutine).

    Settings (class attributes, or set on ``self`` in ``initialize``):

    * ``subscription_hub`` -- the :class:`~tornado_longconn.broadcast.BroadcastHub`
      whose groups are the topics (None: the application setting
      ``longconn_hub``, see :meth:`BroadcastHub.of`).
    * ``max_topics`` (:data:`DEFAULT_MAX_TOPICS`) -- topics held at once (groups
      joined by the server count too); beyond it ``subscribe`` is answered ``limit``.
    * ``max_pending_calls`` (:data:`DEFAULT_MAX_PENDING_CALLS`) -- pending calls;
      beyond it ``limit``.
    * ``call_timeout`` (:data:`DEFAULT_CALL_TIMEOUT` seconds) -- then ``timeout``
      (the hook is cancelled).
    * ``max_protocol_errors`` (:data:`DEFAULT_MAX_PROTOCOL_ERRORS`) -- malformed
      frames answered before the next one closes the connection with 1008.
    * ``max_frame_size`` (:data:`DEFAULT_MAX_FRAME_SIZE` bytes) -- larger frames
      are answered ``too_large`` (Tornado's ``websocket_max_message_size`` still
      applies first and closes with 1009).
    * ``max_inflight`` (64) -- requests handled at once; beyond it the socket is
      not read until one finishes (inbound flow control, nothing is refused).
    * ``require_user`` (False) -- close with 4401 at ``open`` when
      ``current_user`` is None (unless ``auth_timeout`` is set).
    * ``auth_timeout`` (None) -- seconds an anonymous connection has to send
      ``{"type":"auth","token":...}`` (checked by :meth:`authenticate`); until
      then every other request is answered ``unauthorized``; past it the
      connection is closed with 4401 (``"authentication timeout"``). The
      per-user cap applies once the token names the user.
    * ``rate_limits`` (None: none) -- a :class:`~tornado_longconn.ratelimit.RateLimits`:
      inbound frames/s, bytes/s and publishes/s per topic of this connection. A
      frame beyond a limit is not handled: it is answered with the error
      ``limit`` (429) and counted (``subscription_stats(app).rate_limited``);
      past ``max_breaches`` such answers the connection is closed with 4429
      (``CloseCode.RATE_LIMITED``). Other connections are not affected.
    * ``max_connections_per_ip`` / ``max_connections_per_user`` (None: no cap)
      -- open connections of one ``request.remote_ip`` (behind a proxy, run
      the server with ``xheaders=True``) or one :meth:`presence_user`, counted
      in this process for every handler of the application with the same cap
      (:class:`~tornado_longconn.ratelimit.ConnectionCaps`). A connection
      beyond it is closed at ``open`` with 4429 and counted
      (``subscription_stats(app).refused``).
    """

    subscription_hub: BroadcastHub | None = None
    subscription_presence: PresenceStore | None = None
    subscription_users: UserRegistry | None = None
    max_topics: int = DEFAULT_MAX_TOPICS
    max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS
    call_timeout: float = DEFAULT_CALL_TIMEOUT
    max_protocol_errors: int = DEFAULT_MAX_PROTOCOL_ERRORS
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    require_user: bool = False
    auth_timeout: float | None = None
    rate_limits: RateLimits | None = None
    max_connections_per_ip: int | None = None
    max_connections_per_user: int | None = None

    def __init__(
        self,
        application: tornado.web.Application,
        request: Any,
        **kwargs: Any,
    ) -> None:
        # Subscriptions made through the protocol and still counted in the gauge.
        self._sub_count = 0
        # Requests in flight by id (emptied tables are replaced: a burst of
        # requests must not leave a large table on every idle connection).
        self._pending: dict[int | str, asyncio.Task[None]] = {}
        # The awaitables a pending request's task will await once it starts; closed
        # when the task is cancelled before it started (else "never awaited").
        self._unstarted: dict[int | str, tuple[Any, ...]] = {}
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._calls = 0
        self._protocol_errors = 0
        self._slot: asyncio.Future[None] | None = None
        self._sub_counted = False
        self._sub_done = False
        # Topics this connection is present in (value: it watches their events);
        # None until the first one, so a connection without presence pays nothing.
        self._presence: dict[str, bool] | None = None
        self._registered_user: str | None = None
        self._limiter: ConnectionRateLimiter | None = None
        self._held: Any = None
        self._cap_refused: str | None = None
        self._expiry: SessionExpiry | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        #: This connection's id, sent in ``welcome`` as ``client``.
        self.client_id = secrets.token_hex(8)
        super().__init__(application, request, **kwargs)

    # ------------------------------------------------------------------ plumbing

    @property
    def subscription_counters(self) -> SubscriptionCounters:
        """The application's :class:`SubscriptionCounters`."""
        return SubscriptionCounters.for_application(self.application)

    def get_subscription_hub(self) -> BroadcastHub:
        """The hub whose groups are the topics: ``subscription_hub``, else the application's."""
        hub = self.subscription_hub
        return hub if hub is not None else BroadcastHub.of(self)

    def subscription_group(self, topic: str) -> BroadcastGroup:
        """The group serving ``topic`` (default: :func:`subscription_group` of the hub)."""
        return subscription_group(self.get_subscription_hub(), topic)

    @property
    def subscriptions(self) -> list[str]:
        """The topics this connection holds now (every group it belongs to, in join order)."""
        return [group.name for group in _members_of(self)]

    def _gone(self) -> bool:
        conn = self.ws_connection
        return self._sub_done or conn is None or conn.is_closing()

    def _send(self, obj: dict[str, Any]) -> None:
        if self._gone():
            return
        writer = BackpressureWriter.of(self)
        writer.send_nowait(Encoded(OP_TEXT, frame(obj).encode("utf-8")))

    def _refuse(self, code: int, reason: str) -> None:
        self.subscription_counters.close(code)
        if not self._gone():
            # Through the writer: what is corked leaves before the close frame.
            BackpressureWriter.of(self).close(code, reason)

    def _error(
        self, id: int | str | None, code: str, reason: str, topic: str | None = None
    ) -> None:
        self.subscription_counters.error(code)
        self._send(error_frame(id, code, reason, topic=topic))

    def _fail(self, request: Request, error: SubscriptionError) -> None:
        self._error(request.id, error.code, error.reason, request.topic)
        if error.close:
            self._refuse(_close_code(error), error.reason[:120])

    # ------------------------------------------------------------------ Tornado

    def open(self, *args: str, **kwargs: str) -> None:
        """Check identity (``require_user``: 4401), then send ``welcome``."""
        counters = self.subscription_counters
        counters.connections += 1
        self._sub_counted = True
        # Counted among the application's open WebSockets (what a drain closes).
        ConnectionCounters.for_application(self.application).opened(self, "websocket")
        anonymous = self.current_user is None
        if self.require_user and anonymous and self.auth_timeout is None:
            self._refuse(int(CloseCode.UNAUTHORIZED), "unauthorized")
            return
        refused = self._cap_refused
        if refused is not None:
            counters.refuse(refused)
            self._refuse(int(CloseCode.RATE_LIMITED), f"too many connections per {refused}")
            return
        hub = self.get_subscription_hub()
        defaults = hub.defaults
        options: dict[str, Any] = {"policy": defaults.policy, "high_water": defaults.high_water}
        if defaults.low_water is not None:
            options["low_water"] = defaults.low_water
        if defaults.max_queue is not None:
            options["max_queue"] = defaults.max_queue
        # The connection's one writer: every group it joins writes through it; and
        # its close hooks, made once here rather than on the first subscribe.
        BackpressureWriter.of(self, **options)
        _members_of(self)
        if self.rate_limits is not None:
            self._limiter = ConnectionRateLimiter(self.rate_limits)
        now = time.time()
        if anonymous:
            if self.auth_timeout is not None:
                self._expiry = SessionExpiry(auth_deadline=now + self.auth_timeout)
        else:
            expires_at = self.connection_expiry()
            if expires_at is not None:
                self._expiry = SessionExpiry(expires_at)
                if self._expiry.expired(now):
                    self._refuse(int(CloseCode.UNAUTHORIZED), "expired")
                    return
        welcome: dict[str, Any] = {
            "type": "welcome",
            "v": PROTOCOL_VERSION,
            "client": self.client_id,
        }
        expiry = self._expiry
        if expiry is not None:
            welcome["expires_in"] = expiry.remaining(now)
            self._schedule_expiry()
        self._send(welcome)
        if anonymous:
            return
        self._register_user()

    def _register_user(self) -> None:
        registry = users_of(self)
        if registry is not None:
            user = self.presence_user()
            if user is not None:
                registry.register(self, user)
                self._registered_user = user

    def check_origin(self, origin: str) -> bool:
        """The origin policy (:mod:`tornado_longconn.origin`): same-origin, or ``allowed_origins``.

        A refused handshake is answered 403 by Tornado and counted in
        ``subscription_stats(app).refused["origin"]``.
        """
        if request_origin_allowed(self, origin):
            return True
        count_refused(self.application)
        return False

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Count the connection under the connection caps (one backend round trip), then upgrade.

        A connection over a cap is still upgraded, then closed with 4429 at
        ``open`` (a browser cannot read an HTTP status of a refused upgrade;
        ``longconn.js`` backs off on 4429).
        """
        refused_at_open = (
            self.require_user and self.auth_timeout is None and self.current_user is None
        )
        if (
            self.max_connections_per_ip is not None or self.max_connections_per_user is not None
        ) and not refused_at_open:
            store = connection_caps_of(self.application.settings)
            self._held, self._cap_refused = await store.acquire_connection(
                (
                    ("ip", self.request.remote_ip, self.max_connections_per_ip),
                    ("user", self.presence_user(), self.max_connections_per_user),
                )
            )
        try:
            await super().get(*args, **kwargs)
        finally:
            if not self._sub_counted:  # not upgraded (bad handshake, origin refused)
                self._release_caps()

    def _release_caps(self) -> None:
        held, self._held = self._held, None
        if held:
            connection_caps_of(self.application.settings).release_connection(held)

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Parse one request and start it; never raises.

        Returns an awaitable (Tornado then reads no more) while ``max_inflight``
        requests are being handled.
        """
        limiter = self._limiter
        breach = None
        if limiter is not None:
            size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8"))
            breach = limiter.check_message(time.monotonic(), size)
        try:
            request = parse_frame(message, max_size=self.max_frame_size)
        except ProtocolError as exc:
            if breach is not None:
                self._rate_limited(breach, exc.id, exc.topic)
                return None
            self._protocol_error(exc)
            return None
        except Exception:  # a parser bug must not kill the connection's loop
            log.exception("parsing a subscriptions frame failed", extra=log_fields(self))
            self._error(None, "internal", "internal error")
            return None
        kind = request.type
        if limiter is not None and breach is None and kind == "publish":
            assert request.topic is not None
            breach = limiter.check_publish(time.monotonic(), request.topic)
            if breach is None:
                breach = self._check_user_publish(limiter, request.topic)
        if breach is not None:
            if kind != "pong":  # a late pong is not answered; the heartbeat judges it
                self._rate_limited(breach, request.id, request.topic)
            return None
        if kind == "pong":
            return None
        rid = request.id
        auth = kind == "auth" or kind == "refresh"
        if not auth and self._awaiting_auth():
            self._error(rid, "unauthorized", "authenticate first", request.topic)
            return None
        assert rid is not None
        if rid in self._pending:
            self._error(rid, "conflict", "a request with this id is pending", request.topic)
            return None
        if kind == "call" or kind == "presence" or auth:
            if self._calls >= self.max_pending_calls:
                self._error(rid, "limit", f"more than {self.max_pending_calls} pending calls")
                return None
            self._calls += 1
            if auth:
                work = self._auth(request)
            elif kind == "call":
                work = self._call(request)
            else:
                work = self._presence_request(request)
            task = asyncio.ensure_future(work)
        else:
            topic = request.topic
            assert topic is not None
            previous = self._tails.get(topic)
            if previous is None:
                # Nothing pending for this topic: handle it now; only what must wait
                # (an async hook, a backend round trip) becomes a task.
                rest = self._start(request)
                if rest is None:
                    return None
                task = asyncio.ensure_future(rest)
            else:
                task = asyncio.ensure_future(self._after(previous, request))
            self._tails[topic] = task
        self._pending[rid] = task
        task.add_done_callback(lambda t: self._request_done(t, request))
        if len(self._pending) >= self.max_inflight:
            if self._slot is None:
                self._slot = asyncio.get_running_loop().create_future()
            return self._slot
        return None

    def on_connection_close(self) -> None:
        """Stop pending requests and count the connection out; then Tornado's handling."""
        self._finish_subscriptions()
        super().on_connection_close()

    def _finish_subscriptions(self) -> None:
        if self._sub_done:
            return
        self._sub_done = True
        ConnectionCounters.for_application(self.application).closed(self)
        counters = self.subscription_counters
        if self._sub_counted:
            counters.connections -= 1
        counters.subscriptions -= self._sub_count
        self._sub_count = 0
        self._release_caps()
        timer, self._expiry_timer = self._expiry_timer, None
        if timer is not None:
            timer.cancel()
        if self._presence:
            for topic in list(self._presence):
                self._presence_leave(topic)
        user = self._registered_user
        if user is not None:
            self._registered_user = None
            registry = users_of(self)
            if registry is not None:
                registry.unregister(self, user)
        for task in list(self._pending.values()):
            task.cancel()
        slot = self._slot
        if slot is not None and not slot.done():
            slot.set_result(None)

    def _request_done(self, task: asyncio.Task[None], request: Request) -> None:
        assert request.id is not None
        unstarted = self._unstarted.pop(request.id, None)
        if unstarted is not None:  # cancelled before it ran (the connection closed)
            for awaitable in unstarted:
                if inspect.iscoroutine(awaitable):
                    awaitable.close()
        pending = self._pending
        if pending.get(request.id) is task:
            del pending[request.id]
            if not pending:
                self._pending = {}
        if request.type in ("call", "presence", "auth", "refresh"):
            self._calls -= 1
        elif request.topic is not None and self._tails.get(request.topic) is task:
            del self._tails[request.topic]
            if not self._tails:
                self._tails = {}
        if not task.cancelled() and task.exception() is not None:  # not expected
            log.error(
                "subscriptions request failed", exc_info=task.exception(), extra=log_fields(self)
            )
        slot = self._slot
        if slot is not None and len(self._pending) < self.max_inflight:
            self._slot = None
            if not slot.done():
                slot.set_result(None)

    def _check_user_publish(self, limiter: ConnectionRateLimiter, topic: str) -> str | None:
        """The per-user publish limit (shared by the user's connections); a breach or None."""
        buckets = user_publish_buckets(self.application.settings, limiter.limits)
        user = None if buckets is None else self.presence_user()
        if buckets is None or user is None:
            return None
        if buckets.try_take((user, topic), time.monotonic()):
            return None
        limiter.breaches += 1
        return "user_publishes"

    def _rate_limited(self, kind: str, id: int | str | None, topic: str | None) -> None:
        """Answer a frame refused by the rate limit ``kind``; close with 4429 past the breaches.

        Frames read after the close began are dropped uncounted.
        """
        if self._gone():
            return
        self.subscription_counters.rate_limit(kind)
        self._error(id, "limit", f"rate limit: too many {kind}", topic)
        limiter = self._limiter
        if limiter is not None and limiter.exhausted:
            self._refuse(int(CloseCode.RATE_LIMITED), "rate limited")

    def _protocol_error(self, exc: ProtocolError) -> None:
        counters = self.subscription_counters
        if exc.code == "bad_request":
            counters.protocol_errors += 1
            self._protocol_errors += 1
        self._error(exc.id, exc.code, exc.reason, exc.topic)
        if self._protocol_errors > self.max_protocol_errors:
            self._refuse(int(CloseCode.POLICY_VIOLATION), "too many protocol errors")

    # ------------------------------------------------------------------ requests

    def _start(self, request: Request) -> Coroutine[Any, Any, None] | None:
        """Handle a topic request as far as it goes without waiting.

        Returns None when it was answered, else a coroutine that finishes it
        (the caller runs it as the topic's pending task). Never raises.
        """
        try:
            topic = request.topic
            assert topic is not None
            kind = request.type
            if kind == "unsubscribe":
                self._unsubscribe(request)
                return None
            if kind == "subscribe":
                if self._membership(topic) is not None:
                    raise SubscriptionError("conflict", "already subscribed")
                self._check_room()
                allowed = self.authorize_subscribe(topic, request.params)
            else:
                data = request.data
                assert data is not None
                value: Any = data if isinstance(data, bytes) else json.loads(data)
                allowed = self.authorize_publish(topic, value)
            if inspect.isawaitable(allowed):
                return self._guarded(request, self._authorized(request, allowed), allowed)
            if not allowed:
                raise SubscriptionError("forbidden", f"{kind} refused")
            rest = self._allowed(request)
            return None if rest is None else self._guarded(request, rest)
        except SubscriptionError as exc:
            self._fail(request, exc)
        except Exception:
            log.exception(
                "%s of %r failed",
                request.type,
                request.topic,
                extra=log_fields(self, topic=request.topic),
            )
            self._error(request.id, "internal", "internal error", request.topic)
        return None

    async def _after(self, previous: asyncio.Task[None], request: Request) -> None:
        """Handle ``request`` once the topic's previous request is done (per-topic order)."""
        if not previous.done():
            await asyncio.wait((previous,))
        if self._gone():
            return
        rest = self._start(request)
        if rest is not None:
            await rest

    def _guarded(
        self, request: Request, work: Awaitable[None], *inner: Any
    ) -> Coroutine[Any, Any, None]:
        """:meth:`_guard` of ``work``, remembering what it will await until it starts."""
        assert request.id is not None
        self._unstarted[request.id] = (work, *inner)
        return self._guard(request, work)

    async def _guard(self, request: Request, work: Awaitable[None]) -> None:
        """Await the rest of a request; answer its failure. Never raises (but cancels)."""
        if request.id is not None:
            self._unstarted.pop(request.id, None)  # started: ``work`` is awaited below
        try:
            await work
        except SubscriptionError as exc:
            self._fail(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "%s of %r failed",
                request.type,
                request.topic,
                extra=log_fields(self, topic=request.topic),
            )
            self._error(request.id, "internal", "internal error", request.topic)

    async def _authorized(self, request: Request, allowed: Awaitable[Any]) -> None:
        if not await allowed:
            raise SubscriptionError("forbidden", f"{request.type} refused")
        if self._gone():
            return
        if request.type == "subscribe":
            self._check_room()  # others may have been subscribed meanwhile
        rest = self._allowed(request)
        if rest is not None:
            await rest

    def _allowed(self, request: Request) -> Coroutine[Any, Any, None] | None:
        """Carry out an authorized subscribe or publish; a coroutine when it must wait."""
        topic = request.topic
        assert topic is not None
        group = self.subscription_group(topic)
        if request.type == "publish":
            data = request.data
            assert data is not None
            if hasattr(group.backend, "publish_nowait"):
                self._published(request, group.publish_nowait(data))
                return None
            return self._publish(request, group, data)
        cursor = request.cursor
        if group.history is None:
            if cursor is not None:
                raise SubscriptionError("bad_request", "this topic keeps no history")
            self._join(request, group, None, None)
            return None
        head = _head_nowait(group, topic)
        if head is None:
            return self._join_remote(request, group)
        self._join(request, group, cursor, head)
        return None

    async def _join_remote(self, request: Request, group: BroadcastGroup) -> None:
        topic = request.topic
        assert topic is not None
        try:
            head = await self._head_retrying(group)
        except BackendError as exc:
            log.warning(
                "subscribe to %r: backend unavailable: %r",
                topic,
                exc,
                extra=log_fields(self, topic=topic),
            )
            raise SubscriptionError("unavailable", "backend unavailable") from exc
        if self._gone():
            return
        self._check_room()
        # The head needed a round trip: join from it, so that what was published
        # meanwhile is replayed (the group's seam), not missed.
        cursor = request.cursor
        self._join(request, group, head if cursor is None else cursor, head)

    async def _head_retrying(self, group: BroadcastGroup) -> Cursor | None:
        """The group's head (one read per topic for concurrent subscribes).

        A read that fails as unavailable (a busy backend, its command pool taken
        by a reconnect storm) is tried again with jittered backoff, as a resuming
        member's reads are, before the subscribe is answered ``unavailable``: one
        retry here spares every subscriber of the topic a round trip of its own.
        """
        return await retry_unavailable(
            group.head,
            retries=_HEAD_RETRIES,
            backoff=ReconnectBackoff(_HEAD_RETRY_BASE, _HEAD_RETRY_CAP),
            give_up=self._gone,
        )

    def _join(
        self,
        request: Request,
        group: BroadcastGroup,
        start: Cursor | None,
        head: Cursor | None,
    ) -> None:
        member = group.join(self, cursor=start)
        if not member.active:
            return  # the connection or the group closed meanwhile
        self._sub_count += 1
        counters = self.subscription_counters
        counters.subscriptions += 1
        counters.subscribed += 1
        # Sent before the resume (a task that starts later) writes any history.
        self._send(
            {
                "type": "subscribed",
                "id": request.id,
                "topic": request.topic,
                "cursor": None if head is None else str(head),
            }
        )
        self._presence_join(group.name, request.params)

    def _check_room(self) -> None:
        if len(_members_of(self)) >= self.max_topics:
            raise SubscriptionError("limit", f"more than {self.max_topics} topics")

    def _membership(self, topic: str) -> Membership | None:
        """This connection's live membership of the group named ``topic``, or None."""
        for group in _members_of(self):
            if group.name == topic:
                member = group.membership(self)
                if member is not None and member.active:
                    return member
        return None

    def _drop(self, topic: str) -> Membership | None:
        member = self._membership(topic)
        if member is not None:
            member.leave()
            self._sub_count = max(0, self._sub_count - 1)
            self.subscription_counters.subscriptions -= 1
            self._presence_leave(topic)
        return member

    # ------------------------------------------------------------------ presence

    def _presence_join(self, topic: str, params: Any) -> None:
        """Report this connection present in ``topic`` (and watch it when asked)."""
        store = presence_of(self)
        if store is None:
            return
        watch = isinstance(params, dict) and params.get("presence") is True
        if self._presence is None:
            self._presence = {}
        self._presence[topic] = watch
        try:
            member = Member(
                self.client_id,
                self.presence_user(),
                self.presence_info(topic),
                time.time(),
                "websocket",
            )
        except Exception:
            log.exception("presence hooks failed", extra=log_fields(self, topic=topic))
            member = Member(self.client_id, None, None, time.time(), "websocket")
        if not watch:
            store.join_nowait(topic, member)
            return
        # Watch first, so that this connection's own join event reaches it.
        task = asyncio.ensure_future(self._presence_watch(store, topic, member))
        task.add_done_callback(_retrieve)

    async def _presence_watch(self, store: PresenceStore, topic: str, member: Member) -> None:
        try:
            await store.watch(topic, self._presence_event)
        except Exception:
            log.exception("watching presence failed", extra=log_fields(self, topic=topic))
        held = self._presence is not None and self._presence.get(topic) is True
        if held and not self._gone():
            store.join_nowait(topic, member)
        else:  # left meanwhile
            store.unwatch(topic, self._presence_event)

    def _presence_leave(self, topic: str) -> None:
        topics = self._presence
        if topics is None or topic not in topics:
            return
        watch = topics.pop(topic)
        store = presence_of(self)
        if store is None:
            return
        store.leave_nowait(topic, self.client_id)
        if watch:
            store.unwatch(topic, self._presence_event)

    def _presence_event(self, event: PresenceEvent) -> None:
        """Send a watched topic's join, leave or gap to the client."""
        topics = self._presence
        if topics is not None and topics.get(event.topic) is True:
            self._send(event.to_json())

    def user_message(self, data: Any) -> None:
        """Send ``{"type":"direct","data":data}``: a message to this connection's user."""
        self._send({"type": "direct", "data": data})

    def user_disconnect(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` and ``reason`` (its user was disconnected)."""
        self._refuse(code, reason)

    def authorize_presence(self, topic: str) -> bool | Awaitable[bool]:
        """May this connection read ``topic``'s members? Default: when it holds the topic."""
        return self._membership(topic) is not None

    async def _presence_request(self, request: Request) -> None:
        topic = request.topic
        assert topic is not None
        try:
            store = presence_of(self)
            if store is None:
                raise SubscriptionError("not_found", "presence is not enabled")
            if not await _resolve(self.authorize_presence(topic)):
                raise SubscriptionError("forbidden", "presence refused")
            params = request.params or {}
            try:
                page = await store.presence(
                    topic, cursor=params.get("cursor"), limit=params.get("limit")
                )
                counts = await store.presence_stats(topic)
            except ValueError as exc:
                raise SubscriptionError("bad_request", str(exc)) from None
            except BackendError as exc:
                raise SubscriptionError("unavailable", "backend unavailable") from exc
            self._send(
                {
                    "type": "presence",
                    "id": request.id,
                    "topic": topic,
                    "members": [m.to_json() for m in page.members],
                    "cursor": page.cursor,
                    "connections": counts.connections,
                    "users": counts.users,
                }
            )
        except SubscriptionError as exc:
            self._fail(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("presence of %r failed", topic, extra=log_fields(self, topic=topic))
            self._error(request.id, "internal", "internal error", topic)

    def _unsubscribe(self, request: Request) -> None:
        topic = request.topic
        assert topic is not None
        if self._drop(topic) is None:
            raise SubscriptionError("not_found", "not subscribed")
        self.subscription_counters.unsubscribed += 1
        self._send({"type": "unsubscribed", "id": request.id, "topic": topic})

    def end_subscription(self, topic: str, reason: str = "ended by the server") -> bool:
        """End this connection's subscription to ``topic`` (e.g. a revoked permission).

        The client is sent ``{"type":"unsubscribed","id":null,"topic":...,"reason":...}``.
        Returns False when the connection did not hold ``topic``.
        """
        if self._drop(topic) is None:
            return False
        self._send({"type": "unsubscribed", "id": None, "topic": topic, "reason": reason})
        return True

    async def _publish(self, request: Request, group: BroadcastGroup, data: str | bytes) -> None:
        try:
            result = await group.publish(data)
        except BackendUnavailableError as exc:
            raise SubscriptionError("unavailable", "backend unavailable") from exc
        self._published(request, result)

    def _published(self, request: Request, result: PublishResult) -> None:
        self.subscription_counters.published += 1
        cursor = result.cursor
        self._send(
            {
                "type": "published",
                "id": request.id,
                "topic": request.topic,
                "cursor": None if cursor is None else str(cursor),
            }
        )

    # ------------------------------------------------------------------ identity

    def _awaiting_auth(self) -> bool:
        """True while an anonymous connection has yet to authenticate (``auth_timeout``)."""
        return self.current_user is None and self.auth_timeout is not None

    def _schedule_expiry(self) -> None:
        """Arm the one timer of this connection for its expiry deadline (or disarm it)."""
        timer, self._expiry_timer = self._expiry_timer, None
        if timer is not None:
            timer.cancel()
        expiry = self._expiry
        deadline = None if expiry is None else expiry.next_deadline()
        if deadline is None or self._gone():
            return
        delay = max(0.0, deadline - time.time())
        self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._check_expiry)

    def _check_expiry(self) -> None:
        self._expiry_timer = None
        expiry = self._expiry
        if expiry is None or self._gone():
            return
        if expiry.expired(time.time()):
            self._refuse(int(CloseCode.UNAUTHORIZED), expiry.reason)
        else:  # the wall clock moved back: wait again
            self._schedule_expiry()

    async def _auth(self, request: Request) -> None:
        """An ``auth`` or ``refresh`` request: check the token, renew the expiry, cap the user."""
        token = request.params
        assert isinstance(token, str)
        try:
            try:
                creds = await asyncio.wait_for(
                    _resolve(self.authenticate(token)), self.call_timeout
                )
            except asyncio.TimeoutError:
                raise SubscriptionError(
                    "timeout", f"no answer within {self.call_timeout:g} s"
                ) from None
            if not isinstance(creds, Credentials):
                log.error(
                    "authenticate returned %r, not Credentials", creds, extra=log_fields(self)
                )
                raise SubscriptionError("internal", "internal error")
            previous = self.current_user
            if previous is not None and str(previous) != creds.user:
                raise SubscriptionError("forbidden", "the token is another user's", close=True)
            expiry = self._expiry
            if expiry is None:
                expiry = self._expiry = SessionExpiry()
            try:
                expiry.renew(creds.expires_at, now=time.time())
            except ExpiredError:
                raise SubscriptionError(
                    "unauthorized", "the token has expired", close=True
                ) from None
            if previous is None:
                self.current_user = creds.user
                if not await self._cap_user():
                    return
                self._register_user()
            self._schedule_expiry()
            self._send(
                {
                    "type": "authenticated",
                    "id": request.id,
                    "user": creds.user,
                    "expires_in": expiry.remaining(time.time()),
                }
            )
        except SubscriptionError as exc:
            if exc.code in ("unauthorized", "forbidden"):
                exc.close = True  # a bad token ends the connection: no guessing on it
            self._fail(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("authenticate failed", extra=log_fields(self))
            self._error(request.id, "internal", "internal error")

    async def _cap_user(self) -> bool:
        """Count the user that a token just named under ``max_connections_per_user``.

        False (and the connection closed with 4429) when the user is at the cap.
        """
        limit = self.max_connections_per_user
        user = self.presence_user()
        if limit is None or user is None:
            return True
        store = connection_caps_of(self.application.settings)
        held, refused = await store.acquire_connection((("user", user, limit),))
        if refused is not None:
            self.subscription_counters.refuse(refused)
            self._refuse(int(CloseCode.RATE_LIMITED), f"too many connections per {refused}")
            return False
        if self._sub_done:  # closed meanwhile: nothing to hold
            store.release_connection(held)
            return False
        self._held = [*(self._held or ()), *held]
        return True

    async def _call(self, request: Request) -> None:
        method = request.method
        assert method is not None
        try:
            try:
                result = await asyncio.wait_for(
                    _resolve(self.on_call(method, request.params)), self.call_timeout
                )
            except asyncio.TimeoutError:
                raise SubscriptionError(
                    "timeout", f"no answer within {self.call_timeout:g} s"
                ) from None
            try:
                text = frame({"type": "result", "id": request.id, "result": result})
            except (TypeError, ValueError):
                log.error(
                    "call %r returned a value that is not JSON: %r",
                    method,
                    result,
                    extra=log_fields(self),
                )
                raise SubscriptionError("internal", "internal error") from None
            self.subscription_counters.calls += 1
            if not self._gone():
                BackpressureWriter.of(self).send_nowait(Encoded(OP_TEXT, text.encode("utf-8")))
        except SubscriptionError as exc:
            self._fail(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("call %r failed", method, extra=log_fields(self))
            self._error(request.id, "internal", "internal error")


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _head_nowait(group: BroadcastGroup, topic: str) -> Cursor | None:
    """The topic's head without waiting, when the backend can (in memory); else None."""
    since_nowait = getattr(group.backend, "since_nowait", None)
    if since_nowait is None:
        return None
    cursor: Cursor = since_nowait(topic, None).cursor
    return cursor
