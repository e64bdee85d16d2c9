"""tornado-longconn demo: chat rooms with history, presence, heartbeat latency and uploads.

Run it from a checkout (in-memory backend, one process)::

    python -m pip install -e . && python docs/demo/app.py

then open the address it prints (http://localhost:8888/). Options: ``--port``,
``--host``, ``--redis redis://127.0.0.1:6379/0`` (Redis backend: run several
processes on several ports and they behave as one app), ``--storage DIR`` (uploads),
``--heartbeat SECONDS``.

Everything below uses only the library's public API. Per room there is ONE
``BroadcastGroup`` with history; the same topic is served over WebSocket (members
of the group), Server-Sent Events and long-poll (both read the group's history
through one shared ``LongPollWaiter``). Presence snapshots (who is here, on which
transport, with which heartbeat latency) are ordinary messages of the room, so every
transport sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import tempfile
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

import tornado.ioloop
import tornado.web
import tornado.websocket

from tornado_longconn.backends import Backend, MemoryBackend, backend_from_url
from tornado_longconn.broadcast import BroadcastGroup, BroadcastHub, GapPolicy, cursor_envelope
from tornado_longconn.codes import CloseCode
from tornado_longconn.exceptions import CursorError, LongConnError
from tornado_longconn.heartbeat import HeartbeatMixin
from tornado_longconn.log import Cursor
from tornado_longconn.longpoll import LongPollHandler, LongPollWaiter
from tornado_longconn.sse import SSEHandler
from tornado_longconn.staticfiles import static_url_spec
from tornado_longconn.upload import ChunkedUploadSink, UploadStore
from tornado_longconn.upload_tus import TusUploadHandler
from tornado_longconn.upload_ws import WebSocketUploadHandler

log = logging.getLogger("demo")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ROOM_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
HISTORY = 500  # messages kept per room
RECENT = 50  # messages shown when a page joins a room
MAX_ROOMS = 100  # rooms this process serves at once
MAX_TEXT = 2000  # characters per chat message
MAX_UPLOAD = 256 << 20  # bytes per upload
UPLOAD_CHUNK = 256 << 10  # bytes per WebSocket upload chunk
POLL_GRACE = 40.0  # seconds a long-poll user stays present between polls


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
        await self.demo.publish(self, self.snapshot())


class Demo:
    """The application's shared objects, handed to every handler by ``initialize``."""

    def __init__(self, backend: Backend, storage: str, heartbeat: float) -> None:
        self.backend = backend
        self.hub = BroadcastHub(
            backend,
            history=HISTORY,
            envelope=cursor_envelope,  # each WebSocket message carries its cursor
            gap_policy=GapPolicy.NOTICE,  # longconn.js shows and handles resync notices
        )
        self.waiter = LongPollWaiter(backend)  # serves both long-poll and SSE
        self.store = UploadStore(storage, max_size=MAX_UPLOAD)
        self.heartbeat = heartbeat
        self.latency_refresh = max(heartbeat, 1.0)
        self.rooms: dict[str, Room] = {}
        self.files: OrderedDict[str, dict[str, Any]] = OrderedDict()  # recent uploads

    def room(self, name: str) -> Room:
        """The room called ``name``; 404 for a bad name, 503 past MAX_ROOMS."""
        if not ROOM_RE.fullmatch(name):
            raise tornado.web.HTTPError(404, "no such room")
        room = self.rooms.get(name)
        if room is None:
            if len(self.rooms) >= MAX_ROOMS:
                raise tornado.web.HTTPError(503, "too many rooms")
            room = self.rooms[name] = Room(self, name)
        return room

    async def publish(self, room: Room, message: dict[str, Any]) -> None:
        try:
            await room.group.publish(message)
        except LongConnError:
            log.warning("could not publish to %s", room.name, exc_info=True)

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
        if ROOM_RE.fullmatch(room_name):
            await self.publish(self.room(room_name), info)


class DemoHandler(tornado.web.RequestHandler):
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
        self.room = self.demo.room(self.path_args[0])
        self.user = clean_user(self.get_query_argument("user", ""))

    def open(self, room: str) -> None:
        assert self.room is not None
        try:
            self.room.group.join(self, cursor=self.get_query_argument("cursor", None) or None)
        except CursorError:  # not one of ours: the client starts over (longconn.js resyncs)
            self.close(CloseCode.RESYNC_REQUIRED, "malformed cursor")
            return
        self.room.enter(self.user, "websocket")

    async def on_message(self, message: str | bytes) -> None:
        if self.room is None or not isinstance(message, str):
            return
        text = chat_text(message)
        if text is not None:
            await self.demo.publish(self.room, chat(self.user, text))

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


def chat_text(body: str) -> str | None:
    try:
        msg = json.loads(body)
    except ValueError:
        return None
    if (
        not isinstance(msg, dict)
        or msg.get("type") != "chat"
        or not isinstance(msg.get("text"), str)
    ):
        return None
    text = msg["text"].strip()[:MAX_TEXT]
    return text or None


def chat(user: str, text: str) -> dict[str, Any]:
    return {"type": "chat", "user": user, "text": text, "time": time.time()}


class RoomPoll(LongPollHandler):
    """Long-poll fallback: the room's topic, and the user counted as present."""

    def initialize(self, demo: Demo) -> None:  # type: ignore[override]
        super().initialize(demo.waiter)
        self.demo = demo

    async def get(self, room: str) -> None:  # type: ignore[override]
        r = self.demo.room(room)
        r.polled(clean_user(self.get_query_argument("user", "")))
        await self.long_poll(r.group.name)


class RoomEvents(SSEHandler):
    """Server-Sent Events fallback: the room's topic, user present while the stream is open."""

    def initialize(self, demo: Demo) -> None:  # type: ignore[override]
        super().initialize(demo.waiter)
        self.demo = demo

    async def get(self, room: str) -> None:  # type: ignore[override]
        r = self.demo.room(room)
        user = clean_user(self.get_query_argument("user", ""))
        r.enter(user, "sse")
        try:
            await self.stream_events(r.group.name)
        finally:
            r.leave(user, "sse")


class SendHandler(DemoHandler):
    """POST a chat message (used by pages on SSE or long-poll)."""

    async def post(self, room: str) -> None:
        text = chat_text(self.request.body.decode("utf-8", errors="replace"))
        if text is None:
            raise tornado.web.HTTPError(400, 'expected {"type": "chat", "text": "..."}')
        await self.demo.publish(self.demo.room(room), chat(self.user(), text))
        self.set_status(204)


class HistoryHandler(DemoHandler):
    async def get(self, room: str) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write(await self.demo.history(self.demo.room(room)))


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


def make_app(demo: Demo) -> tornado.web.Application:
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
        *TusUploadHandler.routes("/files", store=demo.store, on_complete=demo.upload_complete),
        (
            r"/ws-upload",
            UploadSocket,
            {"store": demo.store, "chunk_size": UPLOAD_CHUNK, "on_complete": demo.upload_complete},
        ),
    ]
    return tornado.web.Application(
        routes,
        static_path=STATIC,
        heartbeat_interval=demo.heartbeat,
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
    demo = Demo(backend, storage, args.heartbeat)
    server = make_app(demo).listen(args.port, args.host)
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
    server.stop()
    await demo.hub.close()  # 1001 "going away" to every member, in jittered batches
    await demo.waiter.close()
    await backend.close()
    demo.store.close()


if __name__ == "__main__":
    asyncio.run(main())
