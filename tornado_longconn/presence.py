"""Presence: who is subscribed to a topic, on every process; join and leave events.

A *presence store* keeps, per topic, the members (one per connection: client
id, user id, the info the application attached, since when, which transport)
and two counts (connections, distinct users). Handlers report joins and leaves
to it synchronously (:meth:`PresenceStore.join_nowait`,
:meth:`PresenceStore.leave_nowait`); readers ask :meth:`PresenceStore.presence`
(a page of members) and :meth:`PresenceStore.presence_stats` (the counts), and
may :meth:`~PresenceStore.watch` a topic's join and leave events.

* :class:`MemoryPresence` -- one process (the in-memory backend).
* :class:`~tornado_longconn.presence_redis.RedisPresence` -- many processes on
  the Redis backend: each process refreshes its members on a TTL, so a process
  that dies has its members leave within the TTL (see that module).

Pick one for a backend with :func:`presence_for`. The subscriptions handlers
(:class:`~tornado_longconn.subscriptions.SubscriptionMixin`, the multi-topic SSE
and long-poll handlers) report their members when the handler's
``subscription_presence`` (or the application setting ``longconn_presence``)
is a store.

:class:`PresenceState` is the model both stores follow, without I/O: the Redis
scripts do the same steps, and the property tests hold the stores to it.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Final, Protocol

import tornado.web

from .logfields import log_fields

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "Member",
    "MemberPage",
    "MemoryPresence",
    "PresenceEvent",
    "PresenceListener",
    "PresenceState",
    "PresenceStats",
    "PresenceStore",
    "PresenceStoreStats",
    "events_topic",
    "presence_for",
    "presence_of",
]

log = logging.getLogger("tornado_longconn.presence")

#: Members in one page when the reader names no limit.
DEFAULT_PAGE: Final = 100
#: Most members in one page.
MAX_PAGE: Final = 1000
#: The application setting that holds the application's presence store.
SETTING: Final = "longconn_presence"

# Presence events of topic T travel on the backend topic "presence#T" ("#" is
# not a topic character, so no application topic has that name).
_EVENTS_PREFIX: Final = "presence#"
# The reserved topics of the user registry (presence_users): "user#<user>".
USERS_PREFIX: Final = "user#"


def events_topic(topic: str) -> str:
    """The backend topic that carries ``topic``'s join and leave events.

    >>> events_topic("room:1")
    'presence#room:1'
    """
    return _EVENTS_PREFIX + topic


@dataclass(frozen=True, slots=True)
class Member:
    """One connection present in a topic.

    ``client`` the connection's id (unique per process: the protocol's
    ``welcome.client``), ``user`` the user id (None: anonymous), ``info`` the
    JSON value the application attached (:meth:`SubscriptionHooks.presence_info
    <tornado_longconn.subscriptions.SubscriptionHooks.presence_info>`),
    ``since`` when it joined (seconds since the epoch), ``transport``
    ``"websocket"``, ``"sse"`` or ``"longpoll"``, ``process`` the id of the
    process that holds it.
    """

    client: str
    user: str | None = None
    info: Any = None
    since: float = 0.0
    transport: str = "websocket"
    process: str = ""

    def to_json(self) -> dict[str, Any]:
        """The member as the protocol sends it.

        >>> Member("c1", "ann", {"name": "Ann"}, 1.5, "sse", "p1").to_json()
        {'client': 'c1', 'user': 'ann', 'info': {'name': 'Ann'}, 'since': 1.5, 'transport': 'sse'}
        """
        return {
            "client": self.client,
            "user": self.user,
            "info": self.info,
            "since": self.since,
            "transport": self.transport,
        }

    def encode(self) -> str:
        """Compact JSON with the process (``"p"``), as the Redis store keeps it."""
        obj = self.to_json()
        obj["p"] = self.process
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def decode(cls, text: str | bytes) -> Member:
        """The inverse of :meth:`encode` (``ValueError`` when malformed)."""
        obj = json.loads(text)
        if not isinstance(obj, dict) or not isinstance(obj.get("client"), str):
            raise ValueError("not a member")
        user = obj.get("user")
        return cls(
            obj["client"],
            user if isinstance(user, str) else None,
            obj.get("info"),
            float(obj.get("since") or 0.0),
            str(obj.get("transport") or ""),
            str(obj.get("p") or ""),
        )


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """The counts of one topic: ``connections`` (members) and distinct ``users``.

    Connections without a user count in ``connections`` only.
    """

    connections: int = 0
    users: int = 0


@dataclass(frozen=True, slots=True)
class MemberPage:
    """One page of a topic's members; ``cursor`` asks for the next (None: no more)."""

    members: tuple[Member, ...]
    cursor: str | None


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A change of a topic's members, as watchers receive it.

    ``kind`` is ``"join"``, ``"leave"`` or ``"gap"`` (events may have been
    missed, e.g. the connection to Redis dropped: read the members again);
    ``member`` is None only for a gap; ``reason`` of a leave is ``"left"`` (the
    connection unsubscribed or closed) or ``"expired"`` (its process stopped
    refreshing: it died or lost Redis for longer than the TTL).
    """

    topic: str
    kind: str
    member: Member | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The protocol's event frame (``join``, ``leave`` or ``presence_gap``)."""
        if self.kind == "gap":
            return {"type": "presence_gap", "topic": self.topic, "reason": self.reason}
        assert self.member is not None
        out: dict[str, Any] = {
            "type": self.kind,
            "topic": self.topic,
            "member": self.member.to_json(),
        }
        if self.kind == "leave":
            out["reason"] = self.reason or "left"
        return out


@dataclass(frozen=True, slots=True)
class PresenceStoreStats:
    """Counters of one process's presence store (``store.stats()``).

    ``held`` memberships this process holds now (with the user registry's); ``joins`` and ``leaves`` it
    reported; ``reaped`` members of dead processes it removed (Redis);
    ``dropped`` reports it dropped (Redis: not started, or too many waiting; the
    next refresh rebuilds them).
    """

    held: int = 0
    joins: int = 0
    leaves: int = 0
    reaped: int = 0
    dropped: int = 0


def top_topics(counts: dict[str, int], limit: int) -> list[tuple[str, int]]:
    """The ``limit`` topics with the most members (ties by name).

    >>> top_topics({"a": 1, "b": 3, "c": 3}, 2)
    [('b', 3), ('c', 3)]
    """
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


class PresenceListener(Protocol):
    """What :meth:`PresenceStore.watch` calls with each event; must not raise or block."""

    def __call__(self, event: PresenceEvent, /) -> None:
        """Handle one event of a watched topic."""


def check_limit(limit: int | None) -> int:
    """``limit`` clamped to 1..:data:`MAX_PAGE` (None: :data:`DEFAULT_PAGE`).

    >>> check_limit(None), check_limit(0), check_limit(5000)
    (100, 1, 1000)
    """
    if limit is None:
        return DEFAULT_PAGE
    return max(1, min(MAX_PAGE, int(limit)))


class PresenceState:
    """The presence of many topics and processes, without I/O: the model.

    Every store does these steps (the Redis store in Lua scripts, atomically).
    A join of a client already present in the topic changes nothing; a leave
    removes the member only when the leaving process holds it (a client id
    reused on another process cannot remove someone else). :meth:`expire`
    removes every member a process held, each with one ``leave`` event.

    >>> state = PresenceState()
    >>> state.join("t", Member("c1", "ann", process="p1")).kind
    'join'
    >>> state.join("t", Member("c2", "ann", process="p2")) is None
    False
    >>> state.stats("t")
    PresenceStats(connections=2, users=1)
    >>> [e.member.client for e in state.expire("p2")]
    ['c2']
    >>> state.stats("t")
    PresenceStats(connections=1, users=1)
    """

    def __init__(self) -> None:
        self._topics: dict[str, dict[str, Member]] = {}
        self._users: dict[str, dict[str, int]] = {}
        self._processes: dict[str, dict[tuple[str, str], None]] = {}

    def join(self, topic: str, member: Member) -> PresenceEvent | None:
        """Add ``member`` to ``topic``; the ``join`` event, or None when already present."""
        members = self._topics.setdefault(topic, {})
        if member.client in members:
            return None
        members[member.client] = member
        if member.user is not None:
            users = self._users.setdefault(topic, {})
            users[member.user] = users.get(member.user, 0) + 1
        self._processes.setdefault(member.process, {})[(topic, member.client)] = None
        return PresenceEvent(topic, "join", member)

    def leave(
        self, topic: str, client: str, process: str, reason: str = "left"
    ) -> PresenceEvent | None:
        """Remove ``client`` from ``topic`` if ``process`` holds it; the ``leave`` event or None."""
        members = self._topics.get(topic)
        member = None if members is None else members.get(client)
        if member is None or member.process != process:
            return None
        return self._remove(topic, member, reason)

    def _remove(self, topic: str, member: Member, reason: str) -> PresenceEvent:
        members = self._topics[topic]
        del members[member.client]
        if not members:
            del self._topics[topic]
        if member.user is not None:
            users = self._users[topic]
            count = users[member.user] - 1
            if count:
                users[member.user] = count
            else:
                del users[member.user]
                if not users:
                    del self._users[topic]
        held = self._processes.get(member.process)
        if held is not None:
            held.pop((topic, member.client), None)
            if not held:
                del self._processes[member.process]
        return PresenceEvent(topic, "leave", member, reason)

    def expire(self, process: str) -> list[PresenceEvent]:
        """Remove every member ``process`` holds (it died): one ``leave`` each, ``"expired"``."""
        held = self._processes.pop(process, {})
        events = []
        for topic, client in list(held):
            member = self._topics.get(topic, {}).get(client)
            if member is not None:
                events.append(self._remove(topic, member, "expired"))
        return events

    def held(self, process: str) -> int:
        """How many memberships ``process`` holds."""
        return len(self._processes.get(process, ()))

    def stats(self, topic: str) -> PresenceStats:
        """The counts of ``topic`` (O(1))."""
        return PresenceStats(len(self._topics.get(topic, ())), len(self._users.get(topic, ())))

    def members(
        self, topic: str, cursor: str | None = None, limit: int | None = None
    ) -> MemberPage:
        """A page of ``topic``'s members in client-id order, after ``cursor`` (a client id).

        O(n log n) in the topic's members (the in-memory store sorts); the Redis
        store pages with ``HSCAN``.
        """
        size = check_limit(limit)
        members = self._topics.get(topic, {})
        keys = sorted(k for k in members if cursor is None or k > cursor)
        page = keys[:size]
        more = len(keys) > size
        return MemberPage(tuple(members[k] for k in page), page[-1] if more else None)

    def topics(self) -> list[str]:
        """The topics with members."""
        return list(self._topics)

    def all_members(self, topic: str) -> list[Member]:
        """Every member of ``topic``, in join order (for tests)."""
        return list(self._topics.get(topic, {}).values())


class PresenceStore(Protocol):
    """What the handlers and readers use; :class:`MemoryPresence` and ``RedisPresence``."""

    #: This process's id (members carry it in ``Member.process``).
    process: str

    async def start(self) -> None:
        """Start background work (the Redis store's refresh). Idempotent."""

    async def close(self) -> None:
        """Remove this process's members (leave events) and stop. Idempotent."""

    def join_nowait(self, topic: str, member: Member) -> bool:
        """Report ``member`` present in ``topic`` (False: that client is already there)."""

    def leave_nowait(self, topic: str, client: str) -> bool:
        """Report ``client`` gone from ``topic`` (False: this process did not hold it)."""

    async def presence(
        self, topic: str, *, cursor: str | None = None, limit: int | None = None
    ) -> MemberPage:
        """A page of ``topic``'s members on every process (``limit`` at most :data:`MAX_PAGE`)."""

    async def presence_stats(self, topic: str) -> PresenceStats:
        """``topic``'s counts on every process, in O(1)."""

    async def watch(self, topic: str, listener: PresenceListener) -> None:
        """Call ``listener`` with ``topic``'s events from when this returns."""

    def unwatch(self, topic: str, listener: PresenceListener) -> None:
        """Stop calling ``listener`` for ``topic`` (no error when it was not watching)."""

    async def settled(self) -> None:
        """Wait until what this process reported has reached the store."""

    def stats(self) -> PresenceStoreStats:
        """This process's counters (O(1))."""

    def topic_members(self, limit: int) -> list[tuple[str, int]]:
        """This process's members per topic, the ``limit`` topics with the most.

        O(memberships held by this process): for scrapes and inspection. The
        user registry's reserved topics (``user#...``) are left out.
        """


class Watchers:
    """Listeners per topic; calls them with each event and swallows their errors."""

    def __init__(self) -> None:
        self.by_topic: dict[str, dict[PresenceListener, None]] = {}

    def add(self, topic: str, listener: PresenceListener) -> bool:
        """Add; True when it is the topic's first listener."""
        listeners = self.by_topic.get(topic)
        first = listeners is None
        if listeners is None:
            listeners = self.by_topic[topic] = {}
        listeners[listener] = None
        return first

    def remove(self, topic: str, listener: PresenceListener) -> bool:
        """Remove; True when the topic has no listener left (and had one)."""
        listeners = self.by_topic.get(topic)
        if listeners is None or listener not in listeners:
            return False
        del listeners[listener]
        if listeners:
            return False
        del self.by_topic[topic]
        return True

    def dispatch(self, event: PresenceEvent) -> None:
        """Call every listener of ``event.topic``."""
        listeners = self.by_topic.get(event.topic)
        if not listeners:
            return
        for listener in list(listeners):
            try:
                listener(event)
            except Exception:
                log.exception(
                    "presence listener %r failed", listener, extra=log_fields(topic=event.topic)
                )


class MemoryPresence:
    """Presence in one process (a :class:`PresenceState` and its watchers).

    Events are delivered synchronously, inside the join or leave that made them,
    in that order.
    """

    def __init__(self, *, process: str | None = None) -> None:
        self.process = process or secrets.token_hex(8)
        self.state = PresenceState()
        self._watchers = Watchers()
        self._joins = 0
        self._leaves = 0

    def __repr__(self) -> str:
        return f"<MemoryPresence {self.process}>"

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Remove every member (each with a leave event)."""
        for event in self.state.expire(self.process):
            self._watchers.dispatch(PresenceEvent(event.topic, "leave", event.member, "left"))

    def join_nowait(self, topic: str, member: Member) -> bool:
        """Add ``member`` (its ``process`` is set to this store's) and tell the watchers."""
        if member.process != self.process:
            member = _with_process(member, self.process)
        event = self.state.join(topic, checked(member))
        if event is None:
            return False
        self._joins += 1
        self._watchers.dispatch(event)
        return True

    def leave_nowait(self, topic: str, client: str) -> bool:
        """Remove ``client`` and tell the watchers."""
        event = self.state.leave(topic, client, self.process)
        if event is None:
            return False
        self._leaves += 1
        self._watchers.dispatch(event)
        return True

    async def presence(
        self, topic: str, *, cursor: str | None = None, limit: int | None = None
    ) -> MemberPage:
        """A page of members in client-id order (see :meth:`PresenceState.members`)."""
        return self.state.members(topic, cursor, limit)

    async def presence_stats(self, topic: str) -> PresenceStats:
        """The counts (O(1))."""
        return self.state.stats(topic)

    async def watch(self, topic: str, listener: PresenceListener) -> None:
        """Call ``listener`` with ``topic``'s events from now on."""
        self._watchers.add(topic, listener)

    def unwatch(self, topic: str, listener: PresenceListener) -> None:
        """Stop calling ``listener``."""
        self._watchers.remove(topic, listener)

    async def settled(self) -> None:
        """Nothing is ever pending in memory."""

    def stats(self) -> PresenceStoreStats:
        """The counters (nothing is reaped or dropped in memory)."""
        return PresenceStoreStats(self.state.held(self.process), self._joins, self._leaves)

    def topic_members(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` topics with the most members."""
        counts = {
            t: self.state.stats(t).connections
            for t in self.state.topics()
            if not t.startswith(USERS_PREFIX)
        }
        return top_topics(counts, limit)


def _with_process(member: Member, process: str) -> Member:
    return Member(member.client, member.user, member.info, member.since, member.transport, process)


def presence_for(backend: Any, **options: Any) -> PresenceStore:
    """A presence store for ``backend``: :class:`MemoryPresence` on the in-memory
    backend, ``RedisPresence`` on a Redis backend (one server or Sentinel).

    ``options`` go to the store (``ttl``, ``refresh_interval`` for Redis;
    ``process`` for both). Raises ``TypeError`` naming the supported backends
    for any other backend (Redis Cluster, NATS): a per-process
    ``MemoryPresence()`` would silently show each process its own members only.
    Call it at setup, so a wrong backend stops the application before it serves.
    """
    from .backends.memory import MemoryBackend

    if isinstance(backend, MemoryBackend):
        return MemoryPresence(**{k: v for k, v in options.items() if k == "process"})
    try:
        from .backends.redis import RedisBackend
        from .backends.redis_cluster import ClusterRedisBackend
    except ImportError:  # the redis extra is not installed: not a Redis backend
        pass
    else:
        if isinstance(backend, RedisBackend) and not isinstance(backend, ClusterRedisBackend):
            from .presence_redis import RedisPresence

            return RedisPresence(backend, **options)
    raise TypeError(
        f"no presence store for {type(backend).__name__}: presence_for supports "
        "MemoryBackend (one process) and RedisBackend on one Redis server or Sentinel "
        "(many processes); not Redis Cluster or NATS"
    )


def checked(member: Member) -> Member:
    """``member``, or a copy without ``info`` when its info is not JSON (logged)."""
    try:
        member.encode()
    except (TypeError, ValueError):
        log.error("presence info of %r is not JSON; sent without it", member.client)
        return Member(
            member.client, member.user, None, member.since, member.transport, member.process
        )
    return member


def presence_of(handler: tornado.web.RequestHandler) -> PresenceStore | None:
    """The handler's store: ``subscription_presence``, else the application setting, else None."""
    store: PresenceStore | None = getattr(handler, "subscription_presence", None)
    if store is None:
        store = handler.application.settings.get(SETTING)
    return store
