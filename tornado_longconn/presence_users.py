"""The user registry: a user's connections on every process, messages and disconnects.

:class:`UserRegistry` answers :meth:`~UserRegistry.connections_of` (every
connection of a user, on every process), and reaches them all with
:meth:`~UserRegistry.send_to_user` and :meth:`~UserRegistry.disconnect_user`.

A user's connections are presence members of the reserved topic ``user#<user>``
of the registry's presence store (``#`` is not a topic character): on Redis they
share its TTL, rebuild and exactly-once expiry. Messages and disconnects travel
on the backend topic ``user#<user>`` (no history), to which a process is
subscribed while it holds a connection of that user; each process then acts on
its own connections. A connection is reported present only once its process is
subscribed, so every connection :meth:`~UserRegistry.connections_of` lists is
reached by a message sent after that answer.

:class:`~tornado_longconn.subscriptions.SubscriptionMixin` connections with a
user (``presence_user()``) register themselves when the handler's
``subscription_users`` (or the application setting ``longconn_users``) is a
registry: a message arrives as ``{"type":"direct","data":...}``; a disconnect
closes the WebSocket with the code and reason given. The multi-topic SSE streams
and long-poll sessions of a user register too (transport ``"sse"`` and
``"longpoll"``): a message is an ``event: direct`` in the stream or an entry of
the next poll answer's ``events``; a disconnect ends the stream with a final
``event: disconnect`` and answers the long-poll with an HTTP status (see
:mod:`tornado_longconn.presence_http`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Final, Protocol

import tornado.web

from .backends.base import Backend
from .log import Message
from .logfields import log_fields
from .presence import MAX_PAGE, Member, PresenceStore

__all__ = ["UserConnection", "UserRegistry", "users_of"]

log = logging.getLogger("tornado_longconn.presence")

#: The application setting that holds the :class:`UserRegistry`.
SETTING: Final = "longconn_users"

_PREFIX: Final = "user#"
# connections_of reads at most this many pages.
_MAX_PAGES: Final = 100


class UserConnection(Protocol):
    """What the registry needs of a connection (``SubscriptionMixin`` has it)."""

    client_id: str

    def user_message(self, data: Any) -> None:
        """Deliver ``data`` (a JSON value) sent to this connection's user."""

    def user_disconnect(self, code: int, reason: str) -> None:
        """Close the connection: its user was disconnected."""


class _Channel:
    """The backend subscriber of the user topics of this process."""

    __slots__ = ("registry",)

    def __init__(self, registry: UserRegistry) -> None:
        self.registry = registry

    def on_message(self, message: Message) -> None:
        self.registry._deliver(message.topic[len(_PREFIX) :], message.data)

    def on_gap(self, topic: str, reason: str) -> None:
        log.info("user channel %r: messages may have been lost (%s)", topic, reason)


class UserRegistry:
    """A user's connections on every process (see the module docs).

    ``backend`` carries messages and disconnects; ``presence`` keeps the
    connections (use the same store as the topics, e.g. ``presence_for(backend)``).
    """

    def __init__(self, backend: Backend, presence: PresenceStore) -> None:
        self.backend = backend
        self.presence = presence
        self._local: dict[str, dict[UserConnection, None]] = {}
        self._channel = _Channel(self)
        self._tasks: set[asyncio.Future[Any]] = set()
        # The subscription to each local user's channel (joins wait for it).
        self._subscribing: dict[str, asyncio.Future[Any]] = {}

    def __repr__(self) -> str:
        return f"<UserRegistry users={len(self._local)}>"

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("user channel subscription failed: %r", task.exception())

    def register(self, conn: UserConnection, user: str, transport: str = "websocket") -> None:
        """Record ``conn`` as a connection of ``user`` (here and in the presence store).

        The presence report waits for this process's subscription to the user's
        channel: once :meth:`connections_of` lists ``conn``, :meth:`send_to_user`
        and :meth:`disconnect_user` reach it.
        """
        conns = self._local.get(user)
        if conns is None:
            conns = self._local[user] = {}
            task = asyncio.ensure_future(self.backend.subscribe(_PREFIX + user, self._channel))
            self._tasks.add(task)
            task.add_done_callback(self._done)
            self._subscribing[user] = task
        conns[conn] = None
        member = Member(conn.client_id, user, None, time.time(), transport)
        subscribing = self._subscribing.get(user)
        if subscribing is None or subscribing.done():
            self.presence.join_nowait(_PREFIX + user, member)
            return

        def join(_: asyncio.Future[Any]) -> None:
            if conn in self._local.get(user, ()):
                self.presence.join_nowait(_PREFIX + user, member)

        subscribing.add_done_callback(join)

    def unregister(self, conn: UserConnection, user: str) -> None:
        """Forget ``conn`` (no error when it was not registered)."""
        conns = self._local.get(user)
        if conns is None or conn not in conns:
            return
        del conns[conn]
        self.presence.leave_nowait(_PREFIX + user, conn.client_id)
        if not conns:
            del self._local[user]
            self._subscribing.pop(user, None)
            self._spawn(self._unsubscribe(user))

    async def _unsubscribe(self, user: str) -> None:
        if user not in self._local:  # not registered again meanwhile
            await self.backend.unsubscribe(_PREFIX + user, self._channel)

    def local_connections(self, user: str) -> list[UserConnection]:
        """``user``'s connections in this process."""
        return list(self._local.get(user, ()))

    async def connections_of(self, user: str) -> list[Member]:
        """Every connection of ``user`` on every process (client id, process, transport, since).

        Reads the presence store page by page (at most 100,000 connections).
        """
        found: list[Member] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await self.presence.presence(_PREFIX + user, cursor=cursor, limit=MAX_PAGE)
            found.extend(page.members)
            cursor = page.cursor
            if cursor is None:
                break
        unique: dict[str, Member] = {}  # HSCAN may return one member twice
        for member in found:
            unique.setdefault(member.client, member)
        return list(unique.values())

    async def send_to_user(self, user: str, data: Any) -> None:
        """Deliver ``data`` (a JSON value) to every connection of ``user`` on every process.

        Raises ``TypeError``/``ValueError`` when ``data`` is not JSON, and the
        backend's :class:`~tornado_longconn.exceptions.BackendUnavailableError`.
        """
        await self._publish(user, {"op": "send", "data": data})

    async def disconnect_user(self, user: str, code: int = 1000, reason: str = "") -> None:
        """Close every connection of ``user`` on every process with ``code`` and ``reason``."""
        await self._publish(user, {"op": "disconnect", "code": int(code), "reason": reason[:120]})

    async def _publish(self, user: str, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        await self.backend.publish(_PREFIX + user, text)

    def _deliver(self, user: str, data: str | bytes) -> None:
        conns = self._local.get(user)
        if not conns:
            return
        try:
            obj = json.loads(data)
            op = obj["op"]
        except (ValueError, KeyError, TypeError):
            log.warning("undecodable user message dropped", extra=log_fields())
            return
        for conn in list(conns):
            try:
                if op == "send":
                    conn.user_message(obj.get("data"))
                elif op == "disconnect":
                    conn.user_disconnect(int(obj.get("code", 1000)), str(obj.get("reason", "")))
            except Exception:
                log.exception("delivering to a connection of a user failed")

    async def close(self) -> None:
        """Stop the subscriptions of this process (the presence store is closed by its owner)."""
        for user in list(self._local):
            await self.backend.unsubscribe(_PREFIX + user, self._channel)
        self._local.clear()
        self._subscribing.clear()
        for task in list(self._tasks):
            task.cancel()


def users_of(handler: tornado.web.RequestHandler) -> UserRegistry | None:
    """The handler's registry: ``subscription_users``, else the application setting, else None."""
    registry: UserRegistry | None = getattr(handler, "subscription_users", None)
    if registry is None:
        registry = handler.application.settings.get(SETTING)
    return registry
