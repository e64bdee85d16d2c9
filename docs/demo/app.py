"""tornado-longconn demo: chat rooms, direct messages and notifications on one connection.

Run it from a checkout (in-memory backend, one process)::

    python -m pip install -e . && python docs/demo/app.py

then open the address it prints (http://localhost:8888/). Options: ``--port``,
``--host``, ``--redis redis://127.0.0.1:6379/0`` (Redis backend: run several
processes on several ports and they behave as one app), ``--storage DIR`` (uploads),
``--heartbeat SECONDS``, ``--allowed-hosts NAMES``, ``--upload-expiry SECONDS``,
``--sweep-interval SECONDS``, ``--presence-ttl SECONDS``.

Everything below uses only the library's public API. A page holds ONE connection
speaking the subscriptions protocol (``longconn.js``'s ``LongConn.session()``) and
subscribes to three kinds of topics on it, each resumed from its own cursor:
``room:<name>`` (the room it shows), ``dm:<user>`` (its direct messages) and
``notify`` (finished uploads, for everyone). The same topics are served over
WebSocket (``SubscriptionMixin``), Server-Sent Events and long-poll (the
multi-topic handlers, reading through one shared ``LongPollWaiter``). Messages are
sent with ``call("chat.send")`` / ``call("dm.send")`` on WebSocket and ``POST
/api/send/<room>`` / ``POST /api/dm/<user>`` otherwise, so the server stamps the
sender. Presence snapshots (who is here, on which transport, with which heartbeat
latency) are ordinary messages of the room, so every transport sees them; who is
here comes from the library's presence store (``presence_for``: with ``--redis``
the members of every process, and those of a process that died leave within its
TTL), the latency from the process that measured it.

Nothing is acknowledged that was not done: a chat message the backend could not
publish gets ``503`` over HTTP and an ``unavailable`` error answer to the call over
WebSocket. Chat messages are bounded in size and JSON depth before they are
parsed; rooms are freed when nobody uses them; ``/api/send`` takes only
same-origin JSON; requests naming a host outside ``--allowed-hosts`` get 421;
the server runs with the production limits of :mod:`tornado_longconn.server`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import tempfile
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

import tornado.httputil
import tornado.ioloop
import tornado.web
import tornado.websocket

from tornado_longconn.backends import Backend, MemoryBackend, backend_from_url
from tornado_longconn.broadcast import BroadcastGroup, BroadcastHub
from tornado_longconn.drain import ReadinessHandler, drain
from tornado_longconn.exceptions import LongConnError
from tornado_longconn.heartbeat import HeartbeatMixin
from tornado_longconn.inspection import InspectionHandler
from tornado_longconn.log import Cursor
from tornado_longconn.longpoll import LongPollWaiter
from tornado_longconn.presence import (
    MemoryPresence,
    PresenceEvent,
    PresenceStore,
    presence_for,
)
from tornado_longconn.server import ServerLimits, start_server
from tornado_longconn.staticfiles import static_url_spec
from tornado_longconn.subscriptions import (
    SubscriptionError,
    SubscriptionMixin,
    subscription_group,
)
from tornado_longconn.subscriptions_http import SubscriptionPollHandler, SubscriptionSSEHandler
from tornado_longconn.upload import ChunkedUploadSink, UploadStore
from tornado_longconn.upload_tus import TusUploadHandler
from tornado_longconn.upload_ws import WebSocketUploadHandler

try:  # the [metrics] extra: pip install -e ".[metrics]"
    from tornado_longconn.metrics import LongConnCollector, MetricsHandler
except ImportError:  # prometheus_client is missing: no /metrics
    LongConnCollector = None  # type: ignore[assignment,misc]

log = logging.getLogger("demo")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ROOM_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
HISTORY = 500  # messages kept per room
RECENT = 50  # messages shown when a page joins a room
MAX_ROOMS = 100  # rooms this process serves at once
MAX_TOPICS = 8  # topics one connection or request holds (a page uses 3: room, dm, notify)
MAX_TEXT = 2000  # characters per chat message
MAX_MESSAGE = 16 * 1024  # bytes of one chat message (JSON), checked before parsing
MAX_DEPTH = 4  # nesting of [] and {} in a chat message, checked before parsing
MAX_UPLOAD = 256 << 20  # bytes per upload
UPLOAD_CHUNK = 256 << 10  # bytes per WebSocket upload chunk
POLL_GRACE = 40.0  # seconds a long-poll user stays present between polls
PRESENCE_TTL = 15.0  # seconds the members of a process that died stay listed (Redis)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
NOTIFY = "notify"  # the topic every page subscribes to: finished uploads


def clean_user(name: str) -> str:
    """A short user name from the client's ``?user=`` (it is not authentication).

    Letters, digits, ``_ . -`` only, so that ``dm:<user>`` is a valid topic.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "", name)[:24]
    return name or "anonymous"


def dm_topic(user: str) -> str:
    """The topic of ``user``'s direct messages."""
    return "dm:" + user


class Room:
    """One room: its broadcast group, who is present on this process (and their latency).

    The snapshot lists the members of every process, read from the presence store.
    """

    def __init__(self, demo: Demo, name: str) -> None:
        self.demo = demo
        self.name = name
        # The group of the protocol topic "room:<name>" (history, topic envelope, resync).
        self.group: BroadcastGroup = subscription_group(demo.hub, "room:" + name)
        self.present: dict[str, dict[str, Any]] = {}  # user -> {"transports": {...}, "latency": s}
        # Any change on any process (a join elsewhere, members of a dead process
        # leaving) publishes a fresh snapshot, so the last one is right everywhere.
        self._watch = asyncio.ensure_future(demo.presence.watch(self.group.name, self._event))
        self._publishing = asyncio.Lock()  # snapshots leave in the order they were read
        self._poll_timers: dict[str, object] = {}
        self._publish_handle: object | None = None
        self.busy = 0  # requests using the room right now (history, send, SSE, long-poll)

    def idle(self) -> bool:
        """Nobody uses the room: no member, no waiter, nothing left to publish."""
        return not (
            self.busy
            or self.present
            or self._poll_timers
            or self._publish_handle
            or len(self.group)
        )

    def enter(self, user: str, transport: str) -> None:
        entry = self.present.setdefault(user, {"transports": {}, "latency": None})
        entry["transports"][transport] = entry["transports"].get(transport, 0) + 1
        self.changed()

    def leave(self, user: str, transport: str) -> None:
        entry = self.present.get(user)
        if entry is None or transport not in entry["transports"]:
            return
        entry["transports"][transport] -= 1
        if entry["transports"][transport] <= 0:
            del entry["transports"][transport]
        if not entry["transports"]:
            del self.present[user]
        self.changed()

    def polled(self, user: str) -> None:
        """A long-poll request of ``user``: present until POLL_GRACE passes without one."""
        loop = tornado.ioloop.IOLoop.current()
        timer = self._poll_timers.pop(user, None)
        if timer is None:
            self.enter(user, "longpoll")
        else:
            loop.remove_timeout(timer)
        self._poll_timers[user] = loop.call_later(POLL_GRACE, self._poll_expired, user)

    def _poll_expired(self, user: str) -> None:
        self._poll_timers.pop(user, None)
        self.leave(user, "longpoll")
        self.demo.release(self)

    def set_latency(self, user: str, latency: float | None) -> None:
        entry = self.present.get(user)
        if entry is None or latency is None:
            return
        old = entry["latency"]
        entry["latency"] = latency
        # Snapshots go into the room's history: publish only changes worth showing.
        if old is None or abs(latency - old) > max(0.002, 0.2 * old):
            self.changed(delay=self.demo.latency_refresh)

    def _event(self, event: PresenceEvent) -> None:
        self.changed()

    def close(self) -> None:
        """Stop watching the room's presence (the room is freed)."""
        self._watch.cancel()
        self.demo.presence.unwatch(self.group.name, self._event)

    async def snapshot(self) -> dict[str, Any]:
        """Who is here on every process (presence store), with this process's latencies."""
        transports: dict[str, set[str]] = {}
        cursor = None
        for _ in range(10):  # at most 10 pages of 1,000 connections
            page = await self.demo.presence.presence(self.group.name, cursor=cursor, limit=1000)
            for member in page.members:
                if member.user is not None:
                    transports.setdefault(member.user, set()).add(member.transport)
            cursor = page.cursor
            if cursor is None:
                break
        members = []
        for user, kinds in sorted(transports.items()):
            latency = self.present.get(user, {}).get("latency")
            members.append(
                {
                    "user": user,
                    "transport": "+".join(sorted(kinds)),
                    "latency_ms": None if latency is None else latency * 1000,
                }
            )
        return {"type": "presence", "members": members, "count": len(members), "time": time.time()}

    def changed(self, delay: float = 0.05) -> None:
        """Publish a presence snapshot soon; changes within ``delay`` share one message."""
        if self._publish_handle is None:
            loop = tornado.ioloop.IOLoop.current()
            self._publish_handle = loop.call_later(delay, self._publish_presence)

    async def _publish_presence(self) -> None:
        self._publish_handle = None
        self.busy += 1
        try:
            async with self._publishing:
                await self.demo.presence.settled()  # this process's joins and leaves are stored
                try:
                    snapshot = await self.snapshot()
                except LongConnError as exc:
                    log.warning("presence of %s unavailable: %r", self.name, exc)
                    return
                await self.demo.publish(self, snapshot)
        finally:
            self.busy -= 1
            self.demo.release(self)


class Demo:
    """The application's shared objects, handed to every handler by ``initialize``."""

    def __init__(
        self,
        backend: Backend,
        storage: str,
        heartbeat: float,
        *,
        upload_expiry: float = 86400.0,
        presence_ttl: float = PRESENCE_TTL,
    ) -> None:
        self.backend = backend
        # Every topic is a group of this hub made by subscription_group(): history,
        # {"topic","cursor","data"} messages, resync notices (longconn.js handles them).
        self.hub = BroadcastHub(backend, history=HISTORY)
        # Who is in which room, on every process (RedisPresence on a Redis backend).
        self.presence: PresenceStore
        try:
            self.presence = presence_for(backend, ttl=presence_ttl)
        except TypeError:  # a backend without a shared store (Redis Cluster, NATS)
            log.warning("member lists show this process's members only")
            self.presence = MemoryPresence()
        self.waiter = LongPollWaiter(backend)  # serves both long-poll and SSE
        self.store = UploadStore(storage, max_size=MAX_UPLOAD, expire_after=upload_expiry)
        # /metrics: every part's stats(), read when Prometheus scrapes.
        self.collector = (
            LongConnCollector(
                hubs=[self.hub],
                waiters=[self.waiter],
                upload_stores=[self.store],
                presence=self.presence,
            )
            if LongConnCollector is not None
            else None
        )
        self.heartbeat = heartbeat
        self.latency_refresh = max(heartbeat, 1.0)
        self.rooms: dict[str, Room] = {}
        self.files: OrderedDict[str, dict[str, Any]] = OrderedDict()  # recent uploads
        self.stats = {"rooms_freed": 0, "not_sent": 0, "bad_messages": 0, "refused": 0}
        self._tasks: set[asyncio.Future[bool]] = set()

    async def publish_to(self, topic: str, message: dict[str, Any]) -> bool:
        """Publish ``message`` to a protocol topic; False (logged, counted) if the backend could not."""
        try:
            await subscription_group(self.hub, topic).publish(json.dumps(message))
        except LongConnError as exc:
            self.stats["not_sent"] += 1
            log.warning("could not publish to %s: %r", topic, exc)
            return False
        return True

    async def send_dm(self, sender: str, to: str, text: str) -> bool:
        """A direct message to ``to``, and a copy to ``sender`` (their other pages)."""
        message = {"type": "dm", "from": sender, "to": to, "text": text, "time": time.time()}
        if not await self.publish_to(dm_topic(to), message):
            return False
        if to != sender:
            await self.publish_to(dm_topic(sender), message)
        return True

    def notify(self, text: str, **extra: Any) -> None:
        """Publish a notice to every page (``notify`` topic), without waiting."""
        message = {"type": "notice", "text": text, "time": time.time(), **extra}
        task = asyncio.ensure_future(self.publish_to(NOTIFY, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def check_room(self, name: str) -> None:
        """404 for a bad name, 503 when ``name`` is not open and MAX_ROOMS are."""
        if not ROOM_RE.fullmatch(name):
            raise tornado.web.HTTPError(404, reason="no such room")
        if name not in self.rooms and len(self.rooms) >= MAX_ROOMS:
            raise tornado.web.HTTPError(503, reason="too many rooms")

    def room(self, name: str) -> Room:
        """The room called ``name``, opened if needed (see :meth:`check_room`).

        Whoever opens a room without making it busy (entering, joining, ``busy``)
        must call :meth:`release` once done, so that an unused room is freed.
        """
        self.check_room(name)
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(self, name)
        return room

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[Room]:
        """The room called ``name``, kept open while the ``with`` block runs."""
        room = self.room(name)
        room.busy += 1
        try:
            yield room
        finally:
            room.busy -= 1
            self.release(room)

    def release(self, room: Room) -> None:
        """Free ``room`` if nobody uses it (its group's history stays in the backend)."""
        if room.idle() and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            room.close()
            self.stats["rooms_freed"] += 1

    async def publish(self, room: Room, message: dict[str, Any]) -> bool:
        """Publish ``message`` to ``room``; False (logged, counted) if the backend could not."""
        try:
            await room.group.publish(message)
        except LongConnError as exc:
            self.stats["not_sent"] += 1
            log.warning("could not publish to %s: %r", room.name, exc)
            return False
        return True

    async def history(self, room: Room) -> dict[str, Any]:
        """The room's last RECENT chat and file messages, and the cursor to continue from."""
        topic = room.group.name
        head = await self.backend.head(topic)
        result = await self.backend.since(topic, Cursor(head.epoch, max(0, head.offset - HISTORY)))
        messages = [
            {"cursor": str(m.cursor), "data": data}
            for m in result.messages
            if isinstance(m.data, str) and (data := json.loads(m.data)).get("type") != "presence"
        ]
        return {
            "messages": messages[-RECENT:],
            "cursor": str(result.cursor),
            "presence": await room.snapshot(),
        }

    async def upload_complete(self, sink: ChunkedUploadSink) -> None:
        """Announce a finished upload in the room named in its metadata."""
        info = {
            "type": "file",
            "id": sink.id,
            "name": sink.filename,
            "size": sink.size,
            "sha256": sink.sha256,
            "url": f"/download/{sink.id}?name={urllib.parse.quote(sink.filename)}",
            "user": clean_user(sink.metadata.get("user", "")),
            "time": time.time(),
        }
        self.files[sink.id] = info
        while len(self.files) > 1000:
            self.files.popitem(last=False)
        room_name = sink.metadata.get("room", "")
        if ROOM_RE.fullmatch(room_name) and (
            room_name in self.rooms or len(self.rooms) < MAX_ROOMS
        ):
            with self.using(room_name) as room:
                await self.publish(room, info)
        self.notify(f"{info['user']} uploaded {sink.filename}", room=room_name, url=info["url"])

    async def sweep_uploads(self) -> None:
        """Remove expired partial uploads (run by a timer)."""
        try:
            removed = await self.store.sweep()
        except Exception:  # a failed sweep is retried by the next tick
            log.exception("sweeping expired uploads failed")
            return
        if removed:
            log.info("swept %d expired uploads", removed)


class BadMessage(ValueError):
    """A chat message the demo refuses; ``status`` is the HTTP answer, ``args[0]`` the reason."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


class JSONErrors(tornado.web.RequestHandler):
    """Errors answered as a short JSON reason, never a traceback or an HTML page."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        reason = getattr(exc, "reason", None) or http.client.responses.get(status_code, "")
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish({"error": status_code, "reason": reason})


class DemoHandler(JSONErrors):
    def initialize(self, demo: Demo) -> None:
        self.demo = demo

    def user(self) -> str:
        return clean_user(self.get_query_argument("user", ""))


class DemoHooks:
    """Who may read which topic, for the WebSocket, SSE and long-poll handlers alike.

    ``room:<name>`` (a valid name; a 101st room in use at once is refused with
    ``limit``), ``dm:<user>`` for that user only, ``notify`` for everyone. Nobody
    publishes directly: messages go through ``call`` (WebSocket) or ``POST``
    (the other transports), which check them and stamp the sender.
    """

    demo: Demo
    user: str
    max_topics = MAX_TOPICS  # so that one page cannot hold many of the MAX_ROOMS rooms

    def authorize_subscribe(self, topic: str, params: Any) -> bool:
        kind, _, name = topic.partition(":")
        if topic == NOTIFY:
            return True
        if kind == "dm":
            return name == self.user
        if kind == "room" and ROOM_RE.fullmatch(name):
            try:
                self.demo.check_room(name)
            except tornado.web.HTTPError:
                raise SubscriptionError("limit", "too many rooms") from None
            return True
        return False

    def authorize_publish(self, topic: str, data: Any) -> bool:
        return False


def room_of(topic: str) -> str | None:
    """``"lobby"`` for ``"room:lobby"``; None for any other topic."""
    kind, _, name = topic.partition(":")
    return name if kind == "room" and ROOM_RE.fullmatch(name) else None


class DemoSocket(DemoHooks, HeartbeatMixin, SubscriptionMixin, tornado.websocket.WebSocketHandler):
    """A page's one WebSocket: the subscriptions protocol, with application-level heartbeats.

    Calls: ``chat.send`` ``{"room", "text"}`` and ``dm.send`` ``{"to", "text"}``
    answer ``{"sent": true}`` once published, ``bad_request`` for a malformed
    message, ``unavailable`` when the backend could not publish it.
    """

    heartbeat_interval = 5.0
    heartbeat_mode = "application"  # the protocol's {"type":"ping"}; longconn.js answers
    max_frame_size = MAX_MESSAGE  # a larger frame is answered too_large, never parsed

    def initialize(self, demo: Demo) -> None:
        self.demo = demo
        self.subscription_hub = demo.hub
        self.subscription_presence = demo.presence  # every subscription is a member
        self.rooms: dict[str, Room] = {}  # rooms this page is present in

    def prepare(self) -> None:
        self.user = clean_user(self.get_query_argument("user", ""))
        self.current_user = self.user  # the library's log lines name the user (longconn_user)

    def authorize_presence(self, topic: str) -> bool:
        # Rooms are public (every page lists their members): anyone may read who is
        # in one, e.g. `longconn presence ws://.../ws room:lobby`; nobody else's DMs.
        return room_of(topic) is not None

    async def authorize_subscribe(self, topic: str, params: Any) -> bool:  # type: ignore[override]
        if not super().authorize_subscribe(topic, params):
            return False
        name = room_of(topic)
        if name is not None and name not in self.rooms:
            room = self.rooms[name] = self.demo.room(name)  # checked just above, no await since
            room.enter(self.user, "websocket")
        return True

    def on_message(self, message: str | bytes) -> Any:
        # Presence: a page that leaves a room unsubscribes from it. (An unsubscribe
        # frame is small; anything else is the mixin's to answer.)
        if isinstance(message, str) and len(message) < 512 and '"unsubscribe"' in message:
            with contextlib.suppress(ValueError, RecursionError):
                frame = json.loads(message)
                if isinstance(frame, dict) and frame.get("type") == "unsubscribe":
                    self._leave(room_of(str(frame.get("topic"))))
        return super().on_message(message)

    async def on_call(self, method: str, params: Any) -> Any:
        if not isinstance(params, dict):
            params = {}
        if method == "chat.send":
            name = str(params.get("room", ""))
            text = call_text(params)
            if not ROOM_RE.fullmatch(name):
                raise SubscriptionError("bad_request", "no such room")
            try:
                with self.demo.using(name) as room:
                    sent = await self.demo.publish(room, chat(self.user, text))
            except tornado.web.HTTPError:
                raise SubscriptionError("limit", "too many rooms") from None
        elif method == "dm.send":
            to = str(params.get("to", ""))
            text = call_text(params)
            if not to or clean_user(to) != to:
                raise SubscriptionError("bad_request", "no such user")
            sent = await self.demo.send_dm(self.user, to, text)
        else:
            raise SubscriptionError("not_found", f"no method {method[:40]!r}")
        if not sent:
            raise SubscriptionError("unavailable", "not sent: backend unavailable")
        return {"sent": True}

    def is_heartbeat_reply(self, message: str) -> bool:
        answered = super().is_heartbeat_reply(message)
        if answered and self.rooms:
            # The mixin records the round trip right after this returns.
            tornado.ioloop.IOLoop.current().add_callback(self._latency_changed)
        return answered

    def _latency_changed(self) -> None:
        for room in self.rooms.values():
            room.set_latency(self.user, self.latency)

    def _leave(self, name: str | None) -> None:
        room = self.rooms.pop(name, None) if name is not None else None
        if room is not None:
            room.leave(self.user, "websocket")
            self.demo.release(room)

    def on_close(self) -> None:
        for name in list(self.rooms):
            self._leave(name)


def call_text(params: dict[str, Any]) -> str:
    """The ``text`` of a send call, stripped and cut to MAX_TEXT; ``bad_request`` if none."""
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise SubscriptionError("bad_request", 'expected {"text": "..."}')
    return text.strip()[:MAX_TEXT]


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest in ``text`` (JSON), counted without parsing it."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    steps = (1 if c in "[{" else -1 for c in brackets)
    return max(accumulate(steps, initial=0))


def chat_text(body: str | bytes, kind: str = "chat") -> str | None:
    """The text of a message ``{"type": "chat", "text": "..."}`` (``kind`` is the type).

    None when ``body`` is JSON but not a chat message; raises :class:`BadMessage`
    when it is larger than MAX_MESSAGE bytes (413), nested deeper than MAX_DEPTH,
    not UTF-8 JSON, or a chat message without text (400). Size and depth are
    checked before the JSON is parsed.
    """
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    if len(body) > MAX_MESSAGE:
        raise BadMessage(f"message larger than {MAX_MESSAGE} bytes", 413)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadMessage("message is not UTF-8") from None
    if json_depth(text) > MAX_DEPTH:
        raise BadMessage(f"message nested deeper than {MAX_DEPTH}")
    try:
        msg = json.loads(text)
    except ValueError:
        raise BadMessage("message is not JSON") from None
    if not isinstance(msg, dict) or msg.get("type") != kind:
        return None
    if not isinstance(msg.get("text"), str) or not msg["text"].strip():
        raise BadMessage(f'expected {{"type": "{kind}", "text": "..."}}')
    return str(msg["text"]).strip()[:MAX_TEXT]


def chat(user: str, text: str) -> dict[str, Any]:
    return {"type": "chat", "user": user, "text": text, "time": time.time()}


def requested_rooms(handler: tornado.web.RequestHandler) -> list[str]:
    """The rooms among an SSE or long-poll request's ``?topics=``.

    Empty for a request over the topic limit (the handler refuses it with 429):
    a refused request makes nobody present anywhere.
    """
    topics = (handler.get_query_argument("topics", "") or "").split(",")
    if len(topics) > MAX_TOPICS:
        return []
    return [name for t in topics if (name := room_of(t)) is not None]


class DemoPoll(DemoHooks, SubscriptionPollHandler):
    """Long-poll fallback: the page's topics; the user counted as present in its rooms."""

    presence_grace = POLL_GRACE

    def initialize(self, demo: Demo) -> None:  # type: ignore[override]
        super().initialize(hub=demo.hub, waiter=demo.waiter)
        self.demo = demo
        self.subscription_presence = demo.presence

    def presence_user(self) -> str | None:
        return self.user

    def presence_client(self) -> str | None:
        return "poll-" + self.user  # one long-poll member per user and process

    def prepare(self) -> None:
        self.user = clean_user(self.get_query_argument("user", ""))

    async def get(self) -> None:  # type: ignore[override]
        with contextlib.ExitStack() as stack:
            for name in requested_rooms(self):
                with contextlib.suppress(tornado.web.HTTPError):  # refused by the hook
                    stack.enter_context(self.demo.using(name)).polled(self.user)
            await self.poll_subscriptions()


class DemoEvents(DemoHooks, SubscriptionSSEHandler):
    """Server-Sent Events fallback: the page's topics; present in its rooms while it streams."""

    def initialize(self, demo: Demo) -> None:  # type: ignore[override]
        super().initialize(hub=demo.hub, waiter=demo.waiter)
        self.demo = demo
        self.subscription_presence = demo.presence

    def presence_user(self) -> str | None:
        return self.user

    def prepare(self) -> None:
        self.user = clean_user(self.get_query_argument("user", ""))

    async def get(self) -> None:  # type: ignore[override]
        with contextlib.ExitStack() as stack:
            rooms: list[Room] = []
            for name in requested_rooms(self):
                with contextlib.suppress(tornado.web.HTTPError):  # refused by the hook
                    rooms.append(stack.enter_context(self.demo.using(name)))
            for room in rooms:
                room.enter(self.user, "sse")
            try:
                await self.stream_subscriptions()
            finally:
                for room in rooms:
                    room.leave(self.user, "sse")


class SendHandler(DemoHandler):
    """POST a chat message (used by pages on SSE or long-poll).

    204 once the message is published; 403 cross-site, 415 not JSON, 413 too
    large, 400 malformed or too deep, 503 when the backend could not publish it.
    """

    def prepare(self) -> None:
        # A cross-site form or text/plain fetch cannot send application/json without
        # a CORS preflight (which this server never grants): refuse everything else.
        if not same_origin(self.request):
            self.demo.stats["refused"] += 1
            raise tornado.web.HTTPError(403, reason="cross-site request refused")
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            self.demo.stats["refused"] += 1
            raise tornado.web.HTTPError(415, reason="Content-Type must be application/json")

    kind = "chat"

    def text(self) -> str:
        """The body's text (see :func:`chat_text`), or the HTTP error for a bad body."""
        try:
            text = chat_text(self.request.body, self.kind)
        except BadMessage as exc:
            self.demo.stats["bad_messages"] += 1
            raise tornado.web.HTTPError(exc.status, reason=str(exc)) from None
        if text is None:
            self.demo.stats["bad_messages"] += 1
            raise tornado.web.HTTPError(
                400, reason=f'expected {{"type": "{self.kind}", "text": "..."}}'
            )
        return text

    def not_sent(self) -> None:
        self.set_header("Retry-After", "5")
        raise tornado.web.HTTPError(503, reason="not sent: backend unavailable")

    async def post(self, room: str) -> None:
        text = self.text()
        with self.demo.using(room) as r:
            if not await self.demo.publish(r, chat(self.user(), text)):
                self.not_sent()
        self.set_status(204)


class DirectMessageHandler(SendHandler):
    """POST ``{"type": "dm", "text": "..."}`` to ``/api/dm/<user>`` (pages on SSE or long-poll).

    The same checks and answers as :class:`SendHandler`.
    """

    kind = "dm"

    async def post(self, to: str) -> None:
        text = self.text()
        if not await self.demo.send_dm(self.user(), to, text):
            self.not_sent()
        self.set_status(204)


def same_origin(request: tornado.httputil.HTTPServerRequest) -> bool:
    """False for a browser request from another site (``Sec-Fetch-Site``, ``Origin``).

    Requests without either header come from non-browser clients and pass.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urllib.parse.urlsplit(origin).netloc.lower() == request.host.lower()


class HistoryHandler(DemoHandler):
    async def get(self, room: str) -> None:
        self.set_header("Cache-Control", "no-store")
        with self.demo.using(room) as r:
            self.write(await self.demo.history(r))


class RoomsHandler(DemoHandler):
    def get(self) -> None:
        rooms = [{"name": "lobby", "count": 0}] if "lobby" not in self.demo.rooms else []
        rooms += [
            {"name": r.name, "count": len(r.present), "sockets": len(r.group)}
            for r in self.demo.rooms.values()
        ]
        self.write({"rooms": rooms})


class ConfigHandler(DemoHandler):
    def get(self) -> None:
        interval = self.demo.heartbeat
        self.write(
            {
                "heartbeat_interval": interval,
                # No heartbeat for two intervals: the server is gone, reconnect.
                "idle_timeout": 2 * interval + 5,
                "backend": type(self.demo.backend).__name__,
            }
        )


class FileInfoHandler(DemoHandler):
    def get(self, upload_id: str) -> None:
        info = self.demo.files.get(upload_id)
        if info is None:
            raise tornado.web.HTTPError(404)
        self.write(info)


# (type: ignore: the two bases annotate on_message differently; both return an awaitable.)
class UploadSocket(HeartbeatMixin, WebSocketUploadHandler):  # type: ignore[misc]
    """The WebSocket chunk protocol, with heartbeats (protocol pings: browsers answer them).

    A vanished client is dropped within interval + timeout, which frees its upload for a
    resume from another connection. Upload messages are bigger than chat messages.
    """

    @property
    def max_message_size(self) -> int:
        return UPLOAD_CHUNK + 8  # offset header + chunk


class DownloadHandler(tornado.web.StaticFileHandler):
    """Completed uploads (``<storage>/<id>``); the URL only matches 32-hex ids."""

    def set_extra_headers(self, path: str) -> None:
        name = self.get_query_argument("name", "download")
        # Never rendered by the browser as a page of this site (uploaded HTML, SVG...).
        self.set_header(
            "Content-Disposition", "attachment; filename*=UTF-8''" + urllib.parse.quote(name)
        )
        self.set_header("X-Content-Type-Options", "nosniff")


class MisdirectedHandler(JSONErrors):
    """421 for a request naming a host this server does not serve (DNS rebinding)."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(421, reason="unknown host")


class DemoApplication(tornado.web.Application):
    """The demo's application: requests whose ``Host`` is not allowed get 421."""

    def __init__(self, *args: Any, allowed_hosts: frozenset[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed_hosts = allowed_hosts

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        if host_name(request.host) not in self.allowed_hosts:
            return self.get_handler_delegate(request, MisdirectedHandler)
        return super().find_handler(request, **kwargs)


def host_name(host: str) -> str:
    """``Host`` without the port, lower case: ``"[::1]:8888"`` -> ``"::1"``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_allowed_hosts(listen_host: str) -> frozenset[str]:
    """The listen address (unless a wildcard) and the names of this machine's loopback."""
    hosts = set(LOCAL_HOSTS)
    if listen_host not in ("", "0.0.0.0", "::"):
        hosts.add(host_name(listen_host))
    return frozenset(hosts)


def local_only(request: tornado.httputil.HTTPServerRequest) -> bool:
    """The inspection endpoint's auth hook: only clients on this machine."""
    return request.remote_ip in ("127.0.0.1", "::1")


def make_app(
    demo: Demo,
    allowed_hosts: frozenset[str] | None = None,
    base_url: str | None = None,
    cors_origins: list[str] | None = None,
) -> tornado.web.Application:
    d = {"demo": demo}
    room = r"([A-Za-z0-9_-]{1,40})"
    routes: list[Any] = [
        (r"/()", tornado.web.StaticFileHandler, {"path": STATIC, "default_filename": "index.html"}),
        (r"/ws", DemoSocket, d),  # one connection per page: rooms, DMs, notifications
        (r"/poll", DemoPoll, d),
        (r"/sse", DemoEvents, d),
        (r"/api/send/" + room, SendHandler, d),
        (r"/api/dm/([A-Za-z0-9_.-]{1,24})", DirectMessageHandler, d),
        (r"/api/history/" + room, HistoryHandler, d),
        (r"/api/rooms", RoomsHandler, d),
        (r"/api/config", ConfigHandler, d),
        (r"/ready", ReadinessHandler),  # 503 while draining: point the load balancer here
        (r"/api/files/([0-9a-f]{32})", FileInfoHandler, d),
        (r"/download/([0-9a-f]{32})", DownloadHandler, {"path": demo.store.root}),
        static_url_spec("/longconn/"),  # longconn.js, shipped inside the package
        *TusUploadHandler.routes(
            "/files",
            store=demo.store,
            on_complete=demo.upload_complete,
            # Location: <base URL>/files/<id>, or relative; never from the client's Host.
            base_url=base_url.rstrip("/") + "/files" if base_url else None,
            # Browser tus clients (tus-js-client, Uppy) on other origins: --cors-origin.
            cors_origins=("*" if "*" in cors_origins else cors_origins) if cors_origins else None,
        ),
        (
            r"/ws-upload",
            UploadSocket,
            {"store": demo.store, "chunk_size": UPLOAD_CHUNK, "on_complete": demo.upload_complete},
        ),
        (
            r"/api/inspect",
            InspectionHandler,
            {
                "authorize": local_only,
                "hubs": [demo.hub],
                "waiters": [demo.waiter],
                "upload_stores": [demo.store],
            },
        ),
    ]
    if demo.collector is not None:
        routes.append((r"/metrics", MetricsHandler, {"collector": demo.collector}))
    return DemoApplication(
        routes,
        allowed_hosts=allowed_hosts if allowed_hosts is not None else frozenset(LOCAL_HOSTS),
        static_path=STATIC,
        heartbeat_interval=demo.heartbeat,
        # A hard cap (Tornado closes with 1009); from MAX_MESSAGE on a message is answered
        # 413 (HTTP) or too_large (WebSocket).
        websocket_max_message_size=64 * 1024,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--redis", metavar="URL", help="use the Redis backend at URL")
    parser.add_argument("--redis-prefix", default="longconn-demo:", help="Redis key prefix")
    parser.add_argument("--storage", help="upload directory (default: a temporary directory)")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="comma-separated Host names this server answers (default: the --host address "
        "and localhost, 127.0.0.1, ::1); other hosts get 421",
    )
    parser.add_argument(
        "--base-url",
        metavar="URL",
        help="public URL of the demo (e.g. https://chat.example) for upload Location headers "
        "(default: relative Locations)",
    )
    parser.add_argument(
        "--cors-origin",
        metavar="ORIGIN",
        action="append",
        default=[],
        help="an origin (e.g. https://app.example) whose pages may upload to /files/ with "
        "tus-js-client or Uppy; repeat for more, '*' for any (default: none)",
    )
    parser.add_argument(
        "--upload-expiry",
        type=float,
        default=86400.0,
        help="seconds an idle partial upload is kept",
    )
    parser.add_argument(
        "--presence-ttl",
        type=float,
        default=PRESENCE_TTL,
        help="seconds the members of a process that died stay listed (Redis; default 15)",
    )
    parser.add_argument(
        "--sweep-interval", type=float, default=600.0, help="seconds between upload sweeps"
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=ServerLimits.idle_connection_timeout,
        help="seconds to send a request head; also the keep-alive idle timeout (default 20)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=ServerLimits.body_timeout,
        help="seconds to send a request body (default 60)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    backend: Backend = MemoryBackend()
    if args.redis:
        try:
            backend = backend_from_url(args.redis, prefix=args.redis_prefix)
        except (ImportError, ValueError) as exc:  # e.g. pip install -e ".[redis]" is needed
            parser.error(str(exc))
    try:
        await asyncio.wait_for(backend.start(), 10)
    except (asyncio.TimeoutError, LongConnError, OSError) as exc:
        log.error("the %s backend did not start: %r", type(backend).__name__, exc)
        raise SystemExit(1) from exc
    storage = args.storage or os.path.join(tempfile.gettempdir(), "tornado-longconn-demo")
    demo = Demo(
        backend,
        storage,
        args.heartbeat,
        upload_expiry=args.upload_expiry,
        presence_ttl=args.presence_ttl,
    )
    await demo.presence.start()
    if args.allowed_hosts:
        allowed = frozenset(host_name(h) for h in args.allowed_hosts.split(",") if h.strip())
    else:
        allowed = default_allowed_hosts(args.host)
    limits = ServerLimits(
        idle_connection_timeout=args.header_timeout, body_timeout=args.body_timeout
    )
    app = make_app(demo, allowed, args.base_url, args.cors_origin)
    server = start_server(
        app,
        args.port,
        args.host,
        limits=limits,
    )
    if demo.collector is not None:
        demo.collector.servers.append(server)  # accept-loop counters on /metrics
    sweeper = tornado.ioloop.PeriodicCallback(demo.sweep_uploads, args.sweep_interval * 1000)
    sweeper.start()
    where = "localhost" if args.host in ("127.0.0.1", "::1", "localhost") else args.host
    log.info(
        "tornado-longconn demo: open http://%s:%d/ (backend: %s; uploads in %s)",
        where,
        args.port,
        "redis " + args.redis if args.redis else "memory",
        demo.store.root,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    sweeper.stop()
    # /ready answers 503, the server stops listening, pending long-polls are answered
    # and SSE streams end, members get 1001 "going away" in jittered batches; then it
    # waits for the streams, polls and upload requests to finish (returning earlier would cancel their
    # handlers, which Tornado answers with 500).
    await drain(
        app, servers=[server], waiters=[demo.waiter], hubs=[demo.hub], upload_stores=[demo.store]
    )
    await demo.presence.close()  # this process's members leave at once
    await backend.close()
    demo.store.close()


if __name__ == "__main__":
    asyncio.run(main())
