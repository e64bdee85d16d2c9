"""tornado-longconn demo: chat rooms with history, presence, heartbeat latency and uploads.

Run it from a checkout (in-memory backend, one process)::

    python -m pip install -e . && python docs/demo/app.py

then open the address it prints (http://localhost:8888/). Options: ``--port``,
``--host``, ``--redis redis://127.0.0.1:6379/0`` (Redis backend: run several
processes on several ports and they behave as one app), ``--storage DIR`` (uploads),
``--heartbeat SECONDS``, ``--allowed-hosts NAMES``, ``--upload-expiry SECONDS``,
``--sweep-interval SECONDS``.

Everything below uses only the library's public API. Per room there is ONE
``BroadcastGroup`` with history; the same topic is served over WebSocket (members
of the group), Server-Sent Events and long-poll (both read the group's history
through one shared ``LongPollWaiter``). Presence snapshots (who is here, on which
transport, with which heartbeat latency) are ordinary messages of the room, so every
transport sees them.

Nothing is acknowledged that was not done: a chat message the backend could not
publish gets ``503`` over HTTP and an ``{"type": "error", ...}`` reply over
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
from tornado_longconn.broadcast import BroadcastGroup, BroadcastHub, GapPolicy, cursor_envelope
from tornado_longconn.codes import CloseCode
from tornado_longconn.exceptions import CursorError, LongConnError
from tornado_longconn.heartbeat import HeartbeatMixin
from tornado_longconn.inspection import InspectionHandler
from tornado_longconn.log import Cursor
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.server import ServerLimits, start_server
from tornado_longconn.sse import SSEHandler
from tornado_longconn.staticfiles import static_url_spec
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
MAX_TEXT = 2000  # characters per chat message
MAX_MESSAGE = 16 * 1024  # bytes of one chat message (JSON), checked before parsing
MAX_DEPTH = 4  # nesting of [] and {} in a chat message, checked before parsing
MAX_UPLOAD = 256 << 20  # bytes per upload
UPLOAD_CHUNK = 256 << 10  # bytes per WebSocket upload chunk
POLL_GRACE = 40.0  # seconds a long-poll user stays present between polls
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def clean_user(name: str) -> str:
    """A short display name from the client's ``?user=`` (it is not authentication)."""
    name = re.sub(r"[^\w .-]", "", name)[:24].strip()
    return name or "anonymous"


class Room:
    """One room: its broadcast group and who is present (on this process)."""

    def __init__(self, demo: Demo, name: str) -> None:
        self.demo = demo
        self.name = name
        self.group: BroadcastGroup = demo.hub.group("room:" + name)
        self.present: dict[str, dict[str, Any]] = {}  # user -> {"transports": {...}, "latency": s}
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

    def snapshot(self) -> dict[str, Any]:
        members = [
            {
                "user": user,
                "transport": "+".join(sorted(entry["transports"])),
                "latency_ms": None if entry["latency"] is None else entry["latency"] * 1000,
            }
            for user, entry in sorted(self.present.items())
        ]
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
            await self.demo.publish(self, self.snapshot())
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
    ) -> None:
        self.backend = backend
        self.hub = BroadcastHub(
            backend,
            history=HISTORY,
            envelope=cursor_envelope,  # each WebSocket message carries its cursor
            gap_policy=GapPolicy.NOTICE,  # longconn.js shows and handles resync notices
        )
        self.waiter = LongPollWaiter(backend)  # serves both long-poll and SSE
        self.store = UploadStore(storage, max_size=MAX_UPLOAD, expire_after=upload_expiry)
        # /metrics: every part's stats(), read when Prometheus scrapes.
        self.collector = (
            LongConnCollector(hubs=[self.hub], waiters=[self.waiter], upload_stores=[self.store])
            if LongConnCollector is not None
            else None
        )
        self.heartbeat = heartbeat
        self.latency_refresh = max(heartbeat, 1.0)
        self.rooms: dict[str, Room] = {}
        self.files: OrderedDict[str, dict[str, Any]] = OrderedDict()  # recent uploads
        self.stats = {"rooms_freed": 0, "not_sent": 0, "bad_messages": 0, "refused": 0}

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
            "presence": room.snapshot(),
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


class RoomSocket(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    """A page's WebSocket: a member of its room's group, with application-level heartbeats."""

    heartbeat_interval = 5.0
    heartbeat_mode = "application"  # browsers cannot see ping frames; longconn.js answers

    def initialize(self, demo: Demo) -> None:
        self.demo = demo
        self.room: Room | None = None

    def prepare(self) -> None:
        # Before the upgrade: a bad room is an HTTP error, not a half-open socket.
        self.demo.check_room(self.path_args[0])
        self.user = clean_user(self.get_query_argument("user", ""))
        self.current_user = self.user  # the library's log lines name the user (longconn_user)

    def open(self, name: str) -> None:
        try:
            room = self.demo.room(name)  # opened and joined with no await in between
        except tornado.web.HTTPError:  # the last free room went since prepare()
            self.close(1013, "too many rooms")  # RFC 6455: try again later
            return
        try:
            room.group.join(self, cursor=self.get_query_argument("cursor", None) or None)
        except CursorError:  # not one of ours: the client starts over (longconn.js resyncs)
            self.demo.release(room)
            self.close(CloseCode.RESYNC_REQUIRED, "malformed cursor")
            return
        self.room = room
        room.enter(self.user, "websocket")

    async def on_message(self, message: str | bytes) -> None:
        if self.room is None:
            return
        try:
            text = chat_text(message)
        except BadMessage as exc:
            self.demo.stats["bad_messages"] += 1
            self.reply_error("bad_message", str(exc))
            return
        if text is None:  # (heartbeat replies never get here: the mixin takes them)
            self.demo.stats["bad_messages"] += 1
            self.reply_error("bad_message", 'expected {"type": "chat", "text": "..."}')
            return
        if not await self.demo.publish(self.room, chat(self.user, text)):
            self.reply_error("not_sent", "backend unavailable", text)

    def reply_error(self, error: str, reason: str, text: str | None = None) -> None:
        """Tell this client (only) that its message was refused or not sent."""
        reply: dict[str, Any] = {"type": "error", "error": error, "reason": reason}
        if text is not None:
            reply["text"] = text
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(reply)

    def is_heartbeat_reply(self, message: str) -> bool:
        answered = super().is_heartbeat_reply(message)
        if answered and self.room is not None:
            # The mixin records the round trip right after this returns.
            tornado.ioloop.IOLoop.current().add_callback(self._latency_changed)
        return answered

    def _latency_changed(self) -> None:
        if self.room is not None:
            self.room.set_latency(self.user, self.latency)

    def on_close(self) -> None:
        if self.room is not None:
            self.room.leave(self.user, "websocket")
            self.demo.release(self.room)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest in ``text`` (JSON), counted without parsing it."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    steps = (1 if c in "[{" else -1 for c in brackets)
    return max(accumulate(steps, initial=0))


def chat_text(body: str | bytes) -> str | None:
    """The text of a chat message ``{"type": "chat", "text": "..."}``.

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
    if not isinstance(msg, dict) or msg.get("type") != "chat":
        return None
    if not isinstance(msg.get("text"), str) or not msg["text"].strip():
        raise BadMessage('expected {"type": "chat", "text": "..."}')
    return str(msg["text"]).strip()[:MAX_TEXT]


def chat(user: str, text: str) -> dict[str, Any]:
    return {"type": "chat", "user": user, "text": text, "time": time.time()}


class RoomPoll(LongPollHandler):
    """Long-poll fallback: the room's topic, and the user counted as present."""

    def initialize(self, demo: Demo) -> None:  # type: ignore[override]
        super().initialize(demo.waiter)
        self.demo = demo

    async def get(self, room: str) -> None:  # type: ignore[override]
        with self.demo.using(room) as r:
            r.polled(clean_user(self.get_query_argument("user", "")))
            await self.long_poll(r.group.name)


class RoomEvents(SSEHandler):
    """Server-Sent Events fallback: the room's topic, user present while the stream is open."""

    def initialize(self, demo: Demo) -> None:  # type: ignore[override]
        super().initialize(demo.waiter)
        self.demo = demo

    async def get(self, room: str) -> None:  # type: ignore[override]
        user = clean_user(self.get_query_argument("user", ""))
        with self.demo.using(room) as r:
            r.enter(user, "sse")
            try:
                await self.stream_events(r.group.name)
            finally:
                r.leave(user, "sse")


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

    async def post(self, room: str) -> None:
        try:
            text = chat_text(self.request.body)
        except BadMessage as exc:
            self.demo.stats["bad_messages"] += 1
            raise tornado.web.HTTPError(exc.status, reason=str(exc)) from None
        if text is None:
            self.demo.stats["bad_messages"] += 1
            raise tornado.web.HTTPError(400, reason='expected {"type": "chat", "text": "..."}')
        with self.demo.using(room) as r:
            if not await self.demo.publish(r, chat(self.user(), text)):
                self.set_header("Retry-After", "5")
                raise tornado.web.HTTPError(503, reason="not sent: backend unavailable")
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
    demo: Demo, allowed_hosts: frozenset[str] | None = None, base_url: str | None = None
) -> tornado.web.Application:
    d = {"demo": demo}
    room = r"([A-Za-z0-9_-]{1,40})"
    routes: list[Any] = [
        (r"/()", tornado.web.StaticFileHandler, {"path": STATIC, "default_filename": "index.html"}),
        (r"/ws/" + room, RoomSocket, d),
        (r"/poll/" + room, RoomPoll, d),
        (r"/sse/" + room, RoomEvents, d),
        (r"/api/send/" + room, SendHandler, d),
        (r"/api/history/" + room, HistoryHandler, d),
        (r"/api/rooms", RoomsHandler, d),
        (r"/api/config", ConfigHandler, d),
        (r"/api/files/([0-9a-f]{32})", FileInfoHandler, d),
        (r"/download/([0-9a-f]{32})", DownloadHandler, {"path": demo.store.root}),
        static_url_spec("/longconn/"),  # longconn.js, shipped inside the package
        *TusUploadHandler.routes(
            "/files",
            store=demo.store,
            on_complete=demo.upload_complete,
            # Location: <base URL>/files/<id>, or relative; never from the client's Host.
            base_url=base_url.rstrip("/") + "/files" if base_url else None,
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
        # A hard cap (Tornado closes with 1009); chat_text() answers 413 from MAX_MESSAGE on.
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
        "--upload-expiry",
        type=float,
        default=86400.0,
        help="seconds an idle partial upload is kept",
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
    demo = Demo(backend, storage, args.heartbeat, upload_expiry=args.upload_expiry)
    if args.allowed_hosts:
        allowed = frozenset(host_name(h) for h in args.allowed_hosts.split(",") if h.strip())
    else:
        allowed = default_allowed_hosts(args.host)
    limits = ServerLimits(
        idle_connection_timeout=args.header_timeout, body_timeout=args.body_timeout
    )
    server = start_server(
        make_app(demo, allowed, args.base_url), args.port, args.host, limits=limits
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
    server.stop()
    await demo.hub.close()  # 1001 "going away" to every member, in jittered batches
    await demo.waiter.close()
    await backend.close()
    demo.store.close()


if __name__ == "__main__":
    asyncio.run(main())
