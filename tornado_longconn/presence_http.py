"""Long-poll clients between their polls: presence, messages to their user, disconnects.

A long-poll client is one request after another. With a ``client`` query
argument (its id) the multi-topic long-poll handler
(:class:`~tornado_longconn.subscriptions_http.SubscriptionPollHandler`) keeps a
:class:`PollSession` for it from its first poll until ``presence_grace``
seconds pass with no poll in progress. The session is:

* a presence member of each topic the client polls (transport ``"longpoll"``):
  joined on the first poll that names the topic, left when a poll no longer
  names it (the client unsubscribed) or when the session expires;
* with ``?presence=1``, a watcher of those topics: their ``join``/``leave``/
  ``presence_gap`` events wait in the session and come in the next answer's
  ``events`` list, in each topic's order;
* a connection of its user in the :class:`~tornado_longconn.presence_users.UserRegistry`:
  ``send_to_user`` messages wait in the session (``{"type":"direct","data":...}``
  in ``events``) and ``disconnect_user`` answers the pending (or next) poll with
  :func:`disconnect_status` and refuses that client id for
  :attr:`PollSessions.revoked_ttl` seconds.

A session holds at most :attr:`PollSessions.buffer` undelivered events; past
that a presence event is dropped and its topic gets a ``presence_gap``
(``"reason":"overflow"``), a direct message is dropped and the answer gets
``{"type":"direct_gap","dropped":n}``; both are counted in :meth:`PollSessions.stats`.

Sessions live in one process: behind a load balancer, route a client's polls to
one process (sticky sessions) or a client that moves starts a new session there
(the old one expires after the grace time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import tornado.web

from .codes import CloseCode
from .logfields import log_fields
from .presence import Member, PresenceEvent, PresenceStore
from .presence_users import UserRegistry

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_REVOKED_TTL",
    "PollSession",
    "PollSessionStats",
    "PollSessions",
    "disconnect_body",
    "disconnect_status",
]

log = logging.getLogger("tornado_longconn.presence")

#: Undelivered events a long-poll session (or an SSE stream) holds at most.
DEFAULT_BUFFER: Final = 256
#: Seconds a disconnected client id stays refused.
DEFAULT_REVOKED_TTL: Final = 300.0
#: Disconnected client ids remembered at most (the oldest is forgotten first).
MAX_REVOKED: Final = 10_000
_SETTING: Final = "longconn_poll_sessions"


def disconnect_status(code: int) -> int:
    """The HTTP status that stands for the WebSocket close ``code`` of a disconnect.

    A long-poll (pending or next) or a new SSE stream of a disconnected client
    is answered with it: 4401 (log in again) is 401, 4429 (too many) is 429,
    1001 and 1013 (going away, try again later) are 503, every other code 403.

    >>> [disconnect_status(c) for c in (4401, 4429, 1001, 1000, 4403, 4000)]
    [401, 429, 503, 403, 403, 403]
    """
    if code == CloseCode.UNAUTHORIZED:
        return 401
    if code == CloseCode.RATE_LIMITED:
        return 429
    if code in (CloseCode.GOING_AWAY, 1013):
        return 503
    return 403


def disconnect_body(code: int, reason: str) -> dict[str, Any]:
    """The JSON body that comes with :func:`disconnect_status`.

    >>> disconnect_body(4403, "revoked")
    {'code': 'disconnected', 'close_code': 4403, 'reason': 'revoked'}
    """
    return {"code": "disconnected", "close_code": int(code), "reason": reason}


@dataclass(frozen=True, slots=True)
class PollSessionStats:
    """Counters of :class:`PollSessions`.

    ``sessions`` live now; ``opened``/``expired`` in total; ``disconnected``
    sessions and SSE streams ended by ``disconnect_user``; ``refused`` polls and
    streams of a disconnected client id; ``revoked`` client ids remembered now;
    ``direct_dropped`` and ``presence_dropped`` events dropped past the buffer.
    """

    sessions: int = 0
    opened: int = 0
    expired: int = 0
    disconnected: int = 0
    refused: int = 0
    revoked: int = 0
    direct_dropped: int = 0
    presence_dropped: int = 0


class PollSession:
    """One long-poll client (``client_id``) during and between its polls.

    Made by :meth:`PollSessions.begin`; the poll handler reads :meth:`take` and
    waits on ``wake``. It is a
    :class:`~tornado_longconn.presence_users.UserConnection`.
    """

    __slots__ = (
        "_owner",
        "client_id",
        "dropped",
        "frames",
        "lost",
        "polls",
        "revoked",
        "timer",
        "topics",
        "user",
        "wake",
    )

    def __init__(self, owner: PollSessions, client: str, user: str | None) -> None:
        self._owner = owner
        #: The client id (``?client=``).
        self.client_id = client
        #: The user the session was opened for (None: anonymous).
        self.user = user
        #: Topics held: topic -> watched (``?presence=1``).
        self.topics: dict[str, bool] = {}
        #: Undelivered event frames, oldest first.
        self.frames: deque[dict[str, Any]] = deque()
        #: Topics whose presence events overflowed since the last answer.
        self.lost: dict[str, None] = {}
        #: Direct messages dropped since the last answer.
        self.dropped = 0
        #: ``(code, reason)`` once the user was disconnected.
        self.revoked: tuple[int, str] | None = None
        #: Polls in progress.
        self.polls = 0
        self.timer: asyncio.TimerHandle | None = None
        #: Set when an event or a disconnect arrives.
        self.wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"<PollSession {self.client_id} topics={len(self.topics)}>"

    def pending(self) -> bool:
        """True when the next answer has events (or the session was disconnected)."""
        return bool(self.frames or self.lost or self.dropped) or self.revoked is not None

    def take(self) -> list[dict[str, Any]]:
        """The undelivered events, in arrival order, then the gaps; clears them."""
        out = list(self.frames)
        self.frames.clear()
        out.extend(PresenceEvent(t, "gap", reason="overflow").to_json() for t in self.lost)
        self.lost.clear()
        if self.dropped:
            out.append({"type": "direct_gap", "dropped": self.dropped})
            self.dropped = 0
        self.wake.clear()
        return out

    def _full(self) -> bool:
        return len(self.frames) >= self._owner.buffer

    def on_presence(self, event: PresenceEvent) -> None:
        """A watched topic's join, leave or gap: kept for the next answer."""
        if self.topics.get(event.topic) is not True:
            return
        if self._full():
            self.lost[event.topic] = None
            self._owner._presence_dropped += 1
        else:
            self.frames.append(event.to_json())
        self.wake.set()

    def user_message(self, data: Any) -> None:
        """A message to this client's user: kept for the next answer."""
        if self._full():
            self.dropped += 1
            self._owner._direct_dropped += 1
        else:
            self.frames.append({"type": "direct", "data": data})
        self.wake.set()

    def user_disconnect(self, code: int, reason: str) -> None:
        """The user was disconnected: end the session, refuse its client id."""
        self._owner.disconnect(self, code, reason)


class PollSessions:
    """The long-poll sessions of one application (see the module docs).

    ``buffer`` undelivered events per session (:data:`DEFAULT_BUFFER`);
    ``revoked_ttl`` seconds a disconnected client id is refused
    (:data:`DEFAULT_REVOKED_TTL`). One per application: :meth:`for_application`.
    """

    def __init__(
        self, *, buffer: int = DEFAULT_BUFFER, revoked_ttl: float = DEFAULT_REVOKED_TTL
    ) -> None:
        if buffer < 1:
            raise ValueError("buffer must be >= 1")
        self.buffer = buffer
        self.revoked_ttl = revoked_ttl
        self._sessions: dict[str, PollSession] = {}
        self._stores: dict[PollSession, tuple[PresenceStore | None, UserRegistry | None]] = {}
        # client id -> (refused until (monotonic), code, reason); insertion order = age.
        self._revoked: dict[str, tuple[float, int, str]] = {}
        self._opened = 0
        self._expired = 0
        self._disconnected = 0
        self._refused = 0
        self._direct_dropped = 0
        self._presence_dropped = 0

    def __repr__(self) -> str:
        return f"<PollSessions sessions={len(self._sessions)} revoked={len(self._revoked)}>"

    @classmethod
    def for_application(cls, application: tornado.web.Application) -> PollSessions:
        """The application's sessions (``settings["longconn_poll_sessions"]``), made on first use."""
        sessions = application.settings.get(_SETTING)
        if sessions is None:
            sessions = application.settings[_SETTING] = cls()
        if not isinstance(sessions, PollSessions):
            raise TypeError(f"settings[{_SETTING!r}] must be a PollSessions")
        return sessions

    def get(self, client: str) -> PollSession | None:
        """The live session of ``client``, or None."""
        return self._sessions.get(client)

    # ------------------------------------------------------------------ revocation

    def revoke(self, client: str, code: int, reason: str, *, now: float | None = None) -> None:
        """Refuse ``client`` for :attr:`revoked_ttl` seconds (a disconnect)."""
        now = time.monotonic() if now is None else now
        self._revoked.pop(client, None)
        self._revoked[client] = (now + self.revoked_ttl, int(code), reason)
        while len(self._revoked) > MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]

    def revoked(self, client: str, *, now: float | None = None) -> tuple[int, str] | None:
        """``(code, reason)`` when ``client`` is refused now (counted), else None."""
        entry = self._revoked.get(client)
        if entry is None:
            return None
        now = time.monotonic() if now is None else now
        until, code, reason = entry
        if now >= until:
            del self._revoked[client]
            return None
        self._refused += 1
        return code, reason

    def stream_disconnected(self, client: str, code: int, reason: str) -> None:
        """An SSE stream of ``client`` was ended by a disconnect: refuse its id too."""
        self._disconnected += 1
        self.revoke(client, code, reason)

    def count_dropped(self, direct: int) -> None:
        """Count ``direct`` messages an SSE stream dropped past its buffer."""
        self._direct_dropped += direct

    # ------------------------------------------------------------------ sessions

    async def begin(
        self,
        client: str,
        user: str | None,
        members: dict[str, Member],
        *,
        watch: bool = False,
        store: PresenceStore | None = None,
        registry: UserRegistry | None = None,
    ) -> PollSession:
        """A poll of ``client`` starts with the topics of ``members``; never raises.

        Opens the session on the first poll (or when another user polls with
        this id), leaves the topics the poll no longer names, joins the new ones
        (watching them first when ``watch``, so the client sees its own join).
        Call :meth:`end` when the poll ends.
        """
        session = self._sessions.get(client)
        if session is not None and session.user != user:
            self._close(session)
            session = None
        if session is None:
            session = PollSession(self, client, user)
            self._sessions[client] = session
            self._stores[session] = (store, registry)
            self._opened += 1
            if registry is not None and user is not None:
                registry.register(session, user, "longpoll")
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.polls += 1
        for topic in [t for t in session.topics if t not in members]:
            self._leave(session, store, topic)
        if store is None:
            return session
        for topic, member in members.items():
            held = session.topics.get(topic)
            if held is not None and (held or not watch):
                if held and not watch:
                    session.topics[topic] = False
                    store.unwatch(topic, session.on_presence)
                continue
            session.topics[topic] = watch
            if watch:
                try:
                    await store.watch(topic, session.on_presence)
                except Exception:
                    log.exception("watching presence failed", extra=log_fields(topic=topic))
                    session.frames.append(
                        PresenceEvent(topic, "gap", reason="unavailable").to_json()
                    )
                if session.topics.get(topic) is None or self._sessions.get(client) is not session:
                    store.unwatch(topic, session.on_presence)  # gone meanwhile
                    continue
            if held is None:
                store.join_nowait(topic, member)
        return session

    def end(self, session: PollSession, grace: float) -> None:
        """A poll of ``session`` ended: it expires ``grace`` seconds after its last poll."""
        session.polls = max(0, session.polls - 1)
        if session.polls or self._sessions.get(session.client_id) is not session:
            return
        if session.timer is not None:
            session.timer.cancel()
        session.timer = asyncio.get_running_loop().call_later(grace, self._expire, session)

    def _expire(self, session: PollSession) -> None:
        session.timer = None
        if session.polls == 0 and self._sessions.get(session.client_id) is session:
            self._expired += 1
            self._close(session)

    def disconnect(self, session: PollSession, code: int, reason: str) -> None:
        """End ``session`` for a disconnect: its pending poll answers, its id is refused."""
        if self._sessions.get(session.client_id) is not session:
            return
        session.revoked = (int(code), reason)
        session.wake.set()
        self._disconnected += 1
        self.revoke(session.client_id, code, reason)
        self._close(session)

    def _leave(self, session: PollSession, store: PresenceStore | None, topic: str) -> None:
        watched = session.topics.pop(topic, None)
        if store is None or watched is None:
            return
        store.leave_nowait(topic, session.client_id)
        if watched:
            store.unwatch(topic, session.on_presence)

    def _close(self, session: PollSession) -> None:
        """Leave every topic, unregister, forget ``session``."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        store, registry = self._stores.pop(session, (None, None))
        for topic in list(session.topics):
            self._leave(session, store, topic)
        if registry is not None and session.user is not None:
            registry.unregister(session, session.user)

    def close(self) -> None:
        """End every session (each leaves its topics)."""
        for session in list(self._sessions.values()):
            self._close(session)

    def stats(self) -> PollSessionStats:
        """The counters (see :class:`PollSessionStats`)."""
        return PollSessionStats(
            len(self._sessions),
            self._opened,
            self._expired,
            self._disconnected,
            self._refused,
            len(self._revoked),
            self._direct_dropped,
            self._presence_dropped,
        )
