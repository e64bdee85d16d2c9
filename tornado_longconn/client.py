"""A Python asyncio client for the subscriptions protocol: reconnecting, resuming, many topics.

It speaks ``docs/reference/subscriptions-protocol.md`` (the protocol of
:class:`~tornado_longconn.subscriptions.SubscriptionMixin` and of the
multi-topic SSE and long-poll handlers), as ``longconn.js``' ``Session`` does in
a browser::

    async with connect("ws://host/ws", sse_url="http://host/events",
                       poll_url="http://host/poll", publish_url="http://host/publish") as client:
        room = await client.subscribe("room:1", cursor=saved_cursor)
        await client.publish("room:1", {"text": "hi"})
        answer = await client.call("rooms.list", {}, timeout=5)
        async for event in room:
            if isinstance(event, Resync):
                reload_state()          # history was lost: nothing is skipped silently
            else:
                handle(event.data, event.cursor)

* **Resume.** Every subscription keeps the cursor of the last message it
  received; after a reconnect each is subscribed again from its own cursor, so a
  message arrives once, in order (a duplicate at the seam is skipped and
  counted). When the server cannot resume exactly it says so and the iterator
  yields a :class:`Resync` -- a distinct event, never silence.
* **Reconnect** with full-jitter exponential backoff: before attempt *n* wait a
  random time in ``[0, min(backoff_cap, backoff_base * 2**n))``; *n* goes back
  to 0 once a connection opened.
* **Fallback.** When the WebSocket upgrade is refused (the server answers the
  upgrade with an HTTP status such as 403 or 404), the client moves to
  Server-Sent Events (``sse_url``) and then long-poll (``poll_url``) at once;
  a transport that fails ``fallback_after`` times without ever opening is left
  too. It stays on the transport that worked. Over HTTP, ``publish`` POSTs to
  ``publish_url`` and ``call`` is not available.
* **Heartbeats.** The protocol's ``{"type":"ping"}`` is answered with
  ``{"type":"pong"}``; WebSocket pings are answered by Tornado. A WebSocket or
  SSE stream that brings no frame (messages, heartbeats, keep-alive comments)
  for ``idle_timeout`` seconds (:data:`DEFAULT_IDLE_TIMEOUT`) is taken for a dead
  server: dropped and reconnected. Keep it above the server's heartbeat interval
  (20 s by default) and SSE keep-alive (15 s).
* **Slow consumers.** Each subscription buffers at most ``buffer_size`` events
  (:data:`DEFAULT_BUFFER_SIZE`); what happens when it is full is a
  :class:`BufferPolicy`, counted in :meth:`Client.stats`.

Built on Tornado's ``websocket_connect``: Tornado is already this library's
only dependency, and its client answers WebSocket pings, applies flow control
(a message not yet read holds the socket) and runs on any asyncio loop, uvloop
included. The HTTP transports use Tornado's ``TCPClient`` and
``HTTP1Connection`` (:mod:`tornado_longconn.client_http`), so that a stream can
be stopped at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import json
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import tornado.httpclient
import tornado.iostream
import tornado.websocket
from typing_extensions import Self

from ._subproto import ERROR_STATUS, binary_frame, format_cursor_map, is_topic, parse_binary_frame
from .backoff import ReconnectBackoff
from .client_http import SSEParser, http_request
from .exceptions import CursorError, LongConnError
from .log import Cursor, parse_cursor
from .stats import COUNTER, GAUGE

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_IDLE_TIMEOUT",
    "BufferPolicy",
    "Client",
    "ClientError",
    "ClientStats",
    "Event",
    "PresenceChange",
    "PresencePage",
    "Resync",
    "Subscription",
    "TopicMessage",
    "backoff_delay",
    "connect",
    "is_after",
]

log = logging.getLogger("tornado_longconn.client")

#: Events one subscription buffers for its consumer.
DEFAULT_BUFFER_SIZE: Final = 1000
#: Seconds without any frame after which a WebSocket or SSE stream is dropped.
DEFAULT_IDLE_TIMEOUT: Final = 60.0
#: Seconds: the first reconnect waits up to this long (full jitter).
DEFAULT_BACKOFF_BASE: Final = 0.5
#: Seconds: no reconnect waits longer.
DEFAULT_BACKOFF_CAP: Final = 30.0

# Close codes after which reconnecting cannot help: the server refused us.
_FATAL_CLOSE: Final = {1008: "bad_request", 4401: "unauthorized", 4403: "forbidden"}
_RESYNC_REQUIRED: Final = 4001
# Seconds a closing WebSocket waits for the server's close frame.
_CLOSE_TIMEOUT: Final = 2.0
# HTTP statuses of a refused WebSocket upgrade or HTTP transport: try the next one.
_REFUSED_STATUS: Final = frozenset((400, 403, 404, 405, 426, 501))


# ---------------------------------------------------------------------- pure helpers


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Full-jitter backoff: a random delay in ``[0, min(cap, base * 2**attempt))`` seconds.

    The delay of :class:`~tornado_longconn.backoff.ReconnectBackoff` after
    ``attempt`` failures; raises ``ValueError`` unless ``0 < base <= cap``.

    >>> backoff_delay(0, 0.5, 30, lambda: 0.5)
    0.25
    >>> backoff_delay(10, 0.5, 30, lambda: 0.5)
    15.0
    """
    return ReconnectBackoff(base, cap, attempt).next_delay(rand)


def is_after(cursor: str | None, last: str | None) -> bool:
    """False when ``cursor`` is at or before ``last`` in the same epoch (a duplicate).

    A cursor of another epoch, or a missing or unreadable one, counts as after.

    >>> is_after("e-5", "e-4"), is_after("e-4", "e-4"), is_after("f-1", "e-9")
    (True, False, True)
    """
    if cursor is None or last is None:
        return True
    try:
        a, b = parse_cursor(cursor), parse_cursor(last)
    except CursorError:
        return True
    return a.epoch != b.epoch or a.offset > b.offset


def _advance(current: str | None, candidate: str | None) -> str | None:
    """A topic's position after the server reported ``candidate``: never moves back."""
    if candidate is None:
        return current
    if current is None:
        return candidate
    try:
        a, b = parse_cursor(candidate), parse_cursor(current)
    except CursorError:
        return current
    return candidate if a.epoch == b.epoch and a.offset > b.offset else current


def _with_query(url: str, query: dict[str, str]) -> str:
    parts = urlsplit(url)
    extra = urlencode(query)
    joined = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, parts.fragment))


# ---------------------------------------------------------------------- public types


class ClientError(LongConnError):
    """A request or subscription failed: ``code`` (the protocol's error codes, or the client's).

    The protocol's codes (``forbidden``, ``not_found``, ``limit``, ...) come with
    their ``status``. The client's own: ``disconnected`` (the connection was lost
    before the answer: a publish may or may not have happened), ``timeout`` (no
    answer in time), ``closed`` (the client was closed), ``unsupported`` (``call``
    or a bytes publish over HTTP), ``unavailable`` (no transport could connect).
    ``topic`` is set when the request named one.
    """

    def __init__(
        self, code: str, reason: str = "", *, status: int | None = None, topic: str | None = None
    ) -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason or code
        self.status = status if status is not None else ERROR_STATUS.get(code)
        self.topic = topic


@dataclass(frozen=True, slots=True)
class TopicMessage:
    """A message of a subscribed topic: ``data`` (a JSON value, or ``bytes``) at ``cursor``."""

    topic: str
    cursor: str | None
    data: Any
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Resync:
    """The topic could not be resumed exactly: reload what you show, then go on.

    ``reason``: from the server ``"epoch"`` (its history was lost, e.g. an
    in-memory server restarted), ``"trimmed"`` (history no longer reaches
    back), ``"gap"`` (anything else that lost messages), ``"resync required"``
    (close code 4001) or ``"cursor rejected"`` (an HTTP server could not read
    the cursors); from this client ``"overflow"`` (:attr:`BufferPolicy.DROP_OLDEST`
    dropped messages the consumer had not read). Delivery continues after
    ``cursor`` (None: from the topic's current position).
    """

    topic: str
    cursor: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """Who is on a topic changed (only for a subscription made with ``presence=True``).

    ``kind`` is ``"join"`` or ``"leave"`` (``member`` is the server's member
    object: ``client``, ``user``, ``info``, ``since``, ``transport``; ``reason``
    of a leave is ``"left"`` or ``"expired"``), or ``"presence_gap"``: events
    may have been missed, read the list again with :meth:`Client.presence`
    (``member`` is None).
    """

    topic: str
    kind: str
    member: Any
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PresencePage:
    """One page of a topic's members (:meth:`Client.presence`).

    ``members`` are the server's member objects; ``cursor`` is None on the
    last page (else pass it back for the next one); ``connections`` and
    ``users`` count the whole topic on every server process.
    """

    topic: str
    members: tuple[Any, ...]
    cursor: str | None
    connections: int
    users: int


#: What a :class:`Subscription` yields.
Event = TopicMessage | Resync | PresenceChange


class BufferPolicy(str, enum.Enum):
    """What a full subscription buffer does (``buffer_policy`` of :func:`connect`).

    * ``DROP_OLDEST`` (default) -- the oldest unread events are dropped to make
      room; the consumer next reads a :class:`Resync` with reason ``"overflow"``
      whose cursor is the last dropped message. Counted in
      :attr:`ClientStats.dropped` and :attr:`ClientStats.overflows`. Other topics
      and the connection are never held up.
    * ``BLOCK`` -- the client stops reading the connection until the consumer
      makes room (on WebSocket, TCP flow control pushes back to the server,
      whose own slow-consumer policy may then close the connection: the client
      reconnects and resumes from its cursors; an SSE stream is closed and
      reopened from the cursors). Nothing is dropped, but one slow topic holds
      up every topic of the client. Counted in :attr:`ClientStats.blocked`.
    """

    DROP_OLDEST = "drop_oldest"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class ClientStats:
    """A snapshot of a client's counters (:meth:`Client.stats`).

    Gauges: ``subscriptions`` (held now), ``buffered`` (events waiting for their
    consumers). Counters: ``connects`` (transports opened), ``failures``
    (attempts that failed or connections lost), ``fallbacks`` (moves to the next
    transport), ``messages`` (delivered to buffers), ``duplicates`` (skipped at a
    resume seam), ``resyncs`` (from the server), ``overflows`` / ``dropped``
    (:attr:`BufferPolicy.DROP_OLDEST` events, and messages dropped),
    ``blocked`` (times :attr:`BufferPolicy.BLOCK` stopped reading), ``pings``
    (protocol heartbeats answered), ``idle_timeouts`` (connections dropped as dead).
    """

    subscriptions: int = field(default=0, metadata=GAUGE)
    buffered: int = field(default=0, metadata=GAUGE)
    connects: int = field(default=0, metadata=COUNTER)
    failures: int = field(default=0, metadata=COUNTER)
    fallbacks: int = field(default=0, metadata=COUNTER)
    messages: int = field(default=0, metadata=COUNTER)
    duplicates: int = field(default=0, metadata=COUNTER)
    resyncs: int = field(default=0, metadata=COUNTER)
    overflows: int = field(default=0, metadata=COUNTER)
    dropped: int = field(default=0, metadata=COUNTER)
    blocked: int = field(default=0, metadata=COUNTER)
    pings: int = field(default=0, metadata=COUNTER)
    idle_timeouts: int = field(default=0, metadata=COUNTER)


class _Counters:
    __slots__ = (
        "blocked",
        "connects",
        "dropped",
        "duplicates",
        "failures",
        "fallbacks",
        "idle_timeouts",
        "messages",
        "overflows",
        "pings",
        "resyncs",
    )

    def __init__(self) -> None:
        self.connects = self.failures = self.fallbacks = 0
        self.messages = self.duplicates = self.resyncs = 0
        self.overflows = self.dropped = self.blocked = 0
        self.pings = self.idle_timeouts = 0


_END: Final = object()


class Subscription:
    """One topic of a :class:`Client` (from :meth:`Client.subscribe`): an async iterator of events.

    ``async for event in sub`` yields :class:`TopicMessage` and :class:`Resync` in
    order. The iteration ends when you unsubscribe or close the client; it
    raises :class:`ClientError` when the server refused or ended the
    subscription, or refused the connection. :attr:`cursor` is the position of
    the last message received (the client resumes from it after a reconnect;
    save it to resume in another process). :attr:`active` is True while the
    current connection carries the topic (False while reconnecting).
    """

    def __init__(
        self,
        client: Client,
        topic: str,
        cursor: str | None,
        params: Any,
        size: int,
        policy: BufferPolicy,
    ) -> None:
        self.topic = topic
        self.params = params
        self._client = client
        self._cursor = cursor
        self._buffer: deque[Event] = deque()
        self._size = size
        self._policy = policy
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._ended: ClientError | object | None = None
        #: True while the current connection carries the topic.
        self.active = False
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def cursor(self) -> str | None:
        """The cursor of the last message received (None: none yet, from the subscribe's)."""
        return self._cursor

    @property
    def buffered(self) -> int:
        """Events waiting to be read."""
        return len(self._buffer)

    @property
    def ended(self) -> bool:
        """True once the subscription is over (unsubscribed, refused, ended or closed)."""
        return self._ended is not None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._ended is not None:
                if isinstance(self._ended, ClientError):
                    raise self._ended
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        event = self._buffer.popleft()
        self._room.set()
        return event

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; ``asyncio.TimeoutError`` after ``timeout`` seconds.

        Raises :class:`ClientError` as the iteration does, and ``StopAsyncIteration``
        once it is over.
        """
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def unsubscribe(self) -> None:
        """Stop receiving the topic (:meth:`Client.unsubscribe`)."""
        await self._client.unsubscribe(self.topic)

    # -- the client's side

    def _over(self) -> bool:
        return self._ended is not None

    def _full(self) -> bool:
        return len(self._buffer) >= self._size

    def _put(self, event: Event, counters: _Counters) -> None:
        """Append ``event``; under DROP_OLDEST drop the oldest to make room.

        The dropped events become one ``Resync(reason="overflow")`` at the head
        of the buffer, whose cursor is the last dropped one's.
        """
        buffer = self._buffer
        if len(buffer) >= self._size and self._policy is BufferPolicy.DROP_OLDEST:
            counters.overflows += 1
            last: str | None = None
            # Room for the marker and the new event (size 1: the marker alone).
            while buffer and len(buffer) > self._size - 2:
                old = buffer.popleft()
                if isinstance(old, TopicMessage):
                    counters.dropped += 1
                if not isinstance(old, PresenceChange):
                    last = old.cursor
            if self._size < 2:
                if isinstance(event, TopicMessage):
                    counters.dropped += 1
                cursor = last if isinstance(event, PresenceChange) else event.cursor
                buffer.append(Resync(self.topic, cursor, "overflow"))
                self._wakeup.set()
                return
            buffer.appendleft(Resync(self.topic, last, "overflow"))
        buffer.append(event)
        self._wakeup.set()

    async def _wait_room(self) -> None:
        while self._full() and self._ended is None:
            self._room.clear()
            await self._room.wait()

    def _confirm(self, cursor: str | None) -> None:
        self.active = True
        if self._cursor is None and cursor is not None:
            self._cursor = cursor  # a reconnect resumes from where it started
        if not self._ready.done():
            self._ready.set_result(None)

    def _end(self, error: ClientError | None) -> None:
        if self._ended is not None:
            return
        self._ended = error if error is not None else _END
        self.active = False
        if not self._ready.done():
            if error is not None:
                self._ready.set_exception(error)
                self._ready.exception()  # retrieved: subscribe() may have given up
            else:
                self._ready.cancel()
        self._wakeup.set()
        self._room.set()


# ---------------------------------------------------------------------- transports


class _Refused(Exception):
    """The server refused this transport (an HTTP status): try the next one."""

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Fatal(Exception):
    """The server refused the connection as a whole (close code 1008, 4401, 4403)."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.error = error


class _Transport:
    """One connection attempt of one kind; :meth:`run` returns when it is over."""

    name = ""
    #: Whether the idle timeout applies (it sees every frame the server sends).
    watched = True
    #: Set before the run is cancelled for a silent server: drop the socket at once.
    abort = False

    def __init__(self, client: Client) -> None:
        self.client = client
        self.changed = asyncio.Event()

    async def run(self) -> str:
        """Connect, carry the session, return why it ended (or raise)."""
        raise NotImplementedError

    def send_text(self, text: str) -> bool:
        """Send a text frame (WebSocket only); False when it cannot be sent."""
        return False

    def send_bytes(self, data: bytes) -> bool:
        """Send a binary frame (WebSocket only); False when it cannot be sent."""
        return False

    def topics_changed(self) -> None:
        """The topic set changed (HTTP transports restart their request)."""
        self.changed.set()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _WebSocket(_Transport):
    name = "websocket"

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.conn: tornado.websocket.WebSocketClientConnection | None = None

    async def run(self) -> str:
        client = self.client
        request = tornado.httpclient.HTTPRequest(
            client.url,
            headers=client.headers,
            connect_timeout=client.connect_timeout,
            request_timeout=client.connect_timeout,
        )
        pending = asyncio.ensure_future(
            tornado.websocket.websocket_connect(
                request,
                ping_interval=client.ping_interval,
                max_message_size=client.max_message_size,
            )
        )
        try:
            conn = await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(_close_late)
            raise
        except tornado.httpclient.HTTPClientError as exc:
            if exc.code in _REFUSED_STATUS:
                raise _Refused(exc.code, f"WebSocket upgrade refused: HTTP {exc.code}") from exc
            raise ConnectionError(f"WebSocket connection failed: {exc}") from exc
        except tornado.websocket.WebSocketError as exc:  # a 200 answer, not an upgrade
            raise _Refused(None, "WebSocket upgrade refused") from exc
        self.conn = conn
        ended = False  # the connection is closed (read_message gave None)
        try:
            while True:  # open once the server's "welcome" came
                message = await conn.read_message()
                if message is None:
                    ended = True
                    code = conn.close_code
                    # 4401 "expired" (a refresh missed) with get_token: a new connection
                    # gets a fresh token, so it is worth a reconnect.
                    expired = code == 4401 and conn.close_reason == "expired"
                    if code in _FATAL_CLOSE and not (expired and client.get_token is not None):
                        raise _Fatal(
                            ClientError(
                                _FATAL_CLOSE[code],
                                f"connection refused (close code {code}: {conn.close_reason})",
                            )
                        )
                    if code == _RESYNC_REQUIRED:
                        client._resync_all("resync required")
                    return f"closed ({code} {conn.close_reason or ''})".strip()
                client._touch()
                if isinstance(message, bytes):
                    await client._on_binary(message)
                else:
                    await client._on_text(message)
        finally:
            self.conn = None
            conn.close()
            if not self.abort and not ended:
                # The closing handshake, bounded: then the socket is closed for
                # sure, also when the loop stops right after (a closed client).
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(_drained(conn), _CLOSE_TIMEOUT)
            _abort(conn)

    def send_text(self, text: str) -> bool:
        conn = self.conn
        if conn is None:
            return False
        try:
            future = conn.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            return False
        future.add_done_callback(_retrieve)
        return True

    def send_bytes(self, data: bytes) -> bool:
        conn = self.conn
        if conn is None:
            return False
        try:
            future = conn.write_message(data, binary=True)
        except tornado.websocket.WebSocketClosedError:
            return False
        future.add_done_callback(_retrieve)
        return True


async def _drained(conn: tornado.websocket.WebSocketClientConnection) -> None:
    while await conn.read_message() is not None:
        pass


def _abort(conn: tornado.websocket.WebSocketClientConnection) -> None:
    """Close the socket of ``conn`` now, without waiting for the server's close frame.

    ``close()`` alone waits up to 5 s for a server that no longer answers; the
    socket would outlive the loop that owns it. ``protocol`` and its ``stream``
    are public (undocumented) attributes of Tornado's client connection; when
    they are missing, Tornado's own timeout closes the socket.
    """
    stream = getattr(getattr(conn, "protocol", None), "stream", None)
    if isinstance(stream, tornado.iostream.IOStream):
        stream.close()


def _close_late(future: asyncio.Future[tornado.websocket.WebSocketClientConnection]) -> None:
    # A connection that opened after its attempt was given up: close it.
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class _HTTPTransport(_Transport):
    """The shared shape of SSE and long-poll: one request per topic set."""

    def _refuse_status(self, status: int, body: bytes) -> None:
        client = self.client
        if status == 400 and client._has_cursors():
            # Cursors the server cannot read (e.g. from another deployment).
            client._resync_all("cursor rejected")
            return
        if status in _REFUSED_STATUS:
            raise _Refused(status, f"{self.name} refused: HTTP {status}")
        raise ConnectionError(f"{self.name}: HTTP {status} {body[:200]!r}")

    async def _until_changed(self, work: Awaitable[Any]) -> tuple[bool, Any]:
        """Run ``work`` until it ends (True, result) or the topic set changes (False, None)."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self.changed.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return False, None
        return True, task.result()


class _Blocked(Exception):
    """BLOCK policy on SSE: the stream is dropped until the consumer made room."""


_BLOCKED: Final = "blocked: a buffer is full"


class _SSE(_HTTPTransport):
    name = "sse"

    async def run(self) -> str:
        client = self.client
        assert client.sse_url is not None
        while True:
            self.changed.clear()
            query = client._topic_query()
            if query is None:
                client._opened(self, idle=True)  # nothing to carry: wait for a topic
                await self.changed.wait()
                continue
            url = _with_query(client.sse_url, query[1])
            parser = SSEParser()

            def on_headers(status: int) -> None:
                if status == 200:
                    client._opened(self)

            async def on_chunk(chunk: bytes, parser: SSEParser = parser) -> None:
                client._touch()
                for event in parser.feed(chunk):
                    if not await client._on_sse_event(event.event, event.data, event.id):
                        raise _Blocked()

            try:
                done, answer = await self._until_changed(
                    http_request(
                        url,
                        headers=dict(client.headers, Accept="text/event-stream"),
                        connect_timeout=client.connect_timeout,
                        on_headers=on_headers,
                        on_chunk=on_chunk,
                    )
                )
            except _Blocked:
                return _BLOCKED
            gone, client._disconnect = client._disconnect, None
            if gone is not None:
                client._disconnected(*gone)
            if not done:
                continue  # the topic set changed: ask again with the new set
            if answer.status != 200:
                gone = _disconnect_answer(answer.body)
                if gone is not None:
                    client._disconnected(*gone)
                self._refuse_status(answer.status, answer.body)
                continue
            return "stream ended"


class _LongPoll(_HTTPTransport):
    name = "longpoll"
    watched = False

    async def run(self) -> str:
        client = self.client
        assert client.poll_url is not None
        fresh = True
        while True:
            self.changed.clear()
            query = client._topic_query()
            if query is None:
                client._opened(self, idle=True)
                await self.changed.wait()
                fresh = True
                continue
            topics, params = query
            timeout = 0.0 if fresh else client.poll_timeout
            params["timeout"] = f"{timeout:g}"
            url = _with_query(client.poll_url, params)
            done, answer = await self._until_changed(
                asyncio.wait_for(
                    http_request(
                        url,
                        headers=dict(client.headers, Accept="application/json"),
                        connect_timeout=client.connect_timeout,
                    ),
                    timeout + client.request_timeout,
                )
            )
            if not done:
                fresh = True
                continue
            if answer.status != 200:
                gone = _disconnect_answer(answer.body)
                if gone is not None:
                    client._disconnected(*gone)
                self._refuse_status(answer.status, answer.body)
                fresh = True
                continue
            fresh = False
            client._opened(self)
            client._touch()
            try:
                body = json.loads(answer.body)
            except ValueError as exc:
                raise ConnectionError("long-poll answer is not JSON") from exc
            await client._on_poll_body(body, topics)


_TRANSPORTS: Final[dict[str, type[_Transport]]] = {
    "websocket": _WebSocket,
    "sse": _SSE,
    "longpoll": _LongPoll,
}


# ---------------------------------------------------------------------- the client


class Client:
    """A subscriptions-protocol client that reconnects and resumes (see :func:`connect`).

    Use it as ``async with connect(url, ...) as client`` (or call :meth:`start`
    and :meth:`close`). Options are those of :func:`connect`.
    """

    def __init__(
        self,
        url: str,
        *,
        sse_url: str | None = None,
        poll_url: str | None = None,
        publish_url: str | None = None,
        transports: Sequence[str] | None = None,
        headers: dict[str, str] | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        buffer_policy: BufferPolicy | str = BufferPolicy.DROP_OLDEST,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = 10.0,
        open_timeout: float = 30.0,
        request_timeout: float = 10.0,
        poll_timeout: float = 25.0,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        fallback_after: int = 2,
        ping_interval: float | None = None,
        max_message_size: int = 10 * 1024 * 1024,
        rand: Callable[[], float] = random.random,
        get_token: Callable[[str], Awaitable[str] | str] | None = None,
        refresh_margin: float = 30.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.url = url
        self.sse_url = sse_url
        self.poll_url = poll_url
        self.publish_url = publish_url
        self.headers = dict(headers or {})
        self.buffer_size = buffer_size
        self.buffer_policy = BufferPolicy(buffer_policy)
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.poll_timeout = poll_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._backoff = ReconnectBackoff(backoff_base, backoff_cap)  # ValueError when invalid
        self.fallback_after = fallback_after
        self.ping_interval = ping_interval
        self.max_message_size = max_message_size
        self.get_token = get_token
        self.refresh_margin = refresh_margin
        self._rand = rand
        # The auth on open, then the refresh before the expiry (token authentication).
        self._auth_task: asyncio.Task[None] | None = None
        #: The user the server's last ``authenticated`` answer named (token authentication).
        self.user: str | None = None
        #: Seconds the identity had left at the last ``authenticated`` answer (None: no expiry).
        self.expires_in: float | None = None
        wanted = list(transports) if transports is not None else list(_TRANSPORTS)
        for name in wanted:
            if name not in _TRANSPORTS:
                raise ValueError(f"unknown transport {name!r}; one of {list(_TRANSPORTS)}")
        self._candidates = [
            n
            for n in wanted
            if (n == "websocket" and url)
            or (n == "sse" and sse_url)
            or (n == "longpoll" and poll_url)
        ]
        if not self._candidates:
            raise ValueError("no transport: give url, sse_url or poll_url")
        self._index = 0
        self._subs: dict[str, Subscription] = {}
        self._sub_requests: dict[int, Subscription | None] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._counters = _Counters()
        self._transport: _Transport | None = None
        self._open = False
        self._opened_event = asyncio.Event()
        self._changed = asyncio.Event()  # set on every open and loss (for waiters)
        self._closed = False
        self._closing = asyncio.Event()
        self._error: ClientError | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_seen = time.monotonic()
        self._blocked = 0
        self._proven = False  # the transport carried something (not only an idle open)
        #: The server's id of this connection (the ``welcome`` frame's ``client``).
        self.client_id: str | None = None
        #: The ``client`` of SSE and long-poll requests: this client's presence
        #: member id there (renewed after the server disconnected it).
        self.presence_client = secrets.token_hex(8)
        # (close code, reason) of an SSE stream's final ``event: disconnect``.
        self._disconnect: tuple[Any, Any] | None = None

    # -- lifecycle

    async def start(self) -> Self:
        """Start connecting and wait until a transport is open.

        Raises :class:`ClientError` ``unavailable`` when none opened within
        ``open_timeout`` seconds (the client is closed then), or the server's
        refusal (``unauthorized``, ``forbidden``).
        """
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(self.wait_open(), self.open_timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise ClientError(
                "unavailable", f"no transport opened within {self.open_timeout:g} s"
            ) from None
        except ClientError:
            await self.close()
            raise
        return self

    async def wait_open(self) -> None:
        """Wait until a transport is open (:class:`ClientError` once the client is closed)."""
        while not self._open:
            if self._closed:
                raise self._error or ClientError("closed", "the client is closed")
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        """Close the connection for good: pending requests fail with ``closed``, iterations end."""
        self._stop_auth()
        if not self._closed:
            self._closed = True
            self._closing.set()
            self._fail_pending(ClientError("closed", "the client was closed"))
            for sub in list(self._subs.values()):
                sub._end(self._error)
            self._subs.clear()
            self._changed.set()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def transport(self) -> str | None:
        """The open transport's name (``"websocket"``, ``"sse"``, ``"longpoll"``), else None."""
        return self._transport.name if self._open and self._transport is not None else None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the server refused the connection."""
        return self._closed

    def stats(self) -> ClientStats:
        """A snapshot of the counters (:class:`ClientStats`)."""
        c = self._counters
        return ClientStats(
            subscriptions=len(self._subs),
            buffered=sum(s.buffered for s in self._subs.values()),
            connects=c.connects,
            failures=c.failures,
            fallbacks=c.fallbacks,
            messages=c.messages,
            duplicates=c.duplicates,
            resyncs=c.resyncs,
            overflows=c.overflows,
            dropped=c.dropped,
            blocked=c.blocked,
            pings=c.pings,
            idle_timeouts=c.idle_timeouts,
        )

    # -- requests

    async def subscribe(
        self, topic: str, *, cursor: str | None = None, params: Any = None
    ) -> Subscription:
        """Subscribe to ``topic``, from after ``cursor`` (None: from now); wait for the server.

        Returns the :class:`Subscription` once the server accepted it (on SSE or
        long-poll: once the request carrying it was answered). If the
        connection is down it is sent when one opens. ``params`` goes with the
        WebSocket subscribe (the server's ``authorize_subscribe`` sees it);
        ``params={"presence": True}`` also asks for the topic's join and leave
        events, which arrive as :class:`PresenceChange` (they are not held back
        by :attr:`BufferPolicy.BLOCK`).
        Raises :class:`ClientError`: ``bad_request`` (topic or cursor),
        ``conflict`` (already subscribed here), the server's refusal
        (``forbidden``, ``limit``, ...), ``timeout`` (no answer within
        ``request_timeout`` while connected), ``closed``.
        """
        if self._closed:
            raise ClientError("closed", "the client is closed", topic=topic)
        if not is_topic(topic):
            raise ClientError("bad_request", f"bad topic {topic!r}", topic=topic)
        if cursor is not None:
            try:
                parse_cursor(cursor)
            except CursorError as exc:
                raise ClientError("bad_request", str(exc), topic=topic) from None
        if topic in self._subs:
            raise ClientError("conflict", f"already subscribed to {topic}", topic=topic)
        sub = Subscription(self, topic, cursor, params, self.buffer_size, self.buffer_policy)
        self._subs[topic] = sub
        transport = self._transport
        if self._open and transport is not None:
            if transport.name == "websocket":
                self._send_subscribe(sub)
            else:
                transport.topics_changed()
        try:
            await self._wait_ready(sub)
        except BaseException:
            if self._subs.get(topic) is sub:
                del self._subs[topic]
                sub._end(None)
                if self._open and self._transport is not None:
                    self._transport.topics_changed()
            raise
        return sub

    async def _wait_ready(self, sub: Subscription) -> None:
        # request_timeout counts while a transport is open; a reconnect restarts it.
        while True:
            if self._open:
                try:
                    await asyncio.wait_for(asyncio.shield(sub._ready), self.request_timeout)
                    return
                except asyncio.TimeoutError:
                    if self._open:
                        raise ClientError(
                            "timeout", "no answer to subscribe", topic=sub.topic
                        ) from None
            else:
                waiter = asyncio.ensure_future(self.wait_open())
                try:
                    await asyncio.wait({waiter, sub._ready}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not waiter.done():
                        waiter.cancel()
                    await asyncio.gather(waiter, return_exceptions=True)
                if sub._ready.done():
                    sub._ready.result()
                    return
                waiter.result()

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``: its iteration ends. Never fails (a lost connection ends it too)."""
        sub = self._subs.pop(topic, None)
        if sub is None:
            return
        sub._end(None)
        for rid, waiting in self._sub_requests.items():
            if waiting is sub:
                self._sub_requests[rid] = None  # its answer still comes: then dropped
        transport = self._transport
        if not self._open or transport is None:
            return
        if transport.name != "websocket":
            transport.topics_changed()
            return
        with contextlib.suppress(ClientError, asyncio.TimeoutError):
            await self._request({"type": "unsubscribe", "topic": topic}, self.request_timeout)

    async def publish(self, topic: str, data: Any) -> str | None:
        """Publish ``data`` (JSON, or ``bytes`` over WebSocket) to ``topic``; return its cursor.

        Over WebSocket it is a publish frame; on SSE or long-poll it is POSTed to
        ``publish_url``. Raises :class:`ClientError`: the server's refusal,
        ``timeout``, ``disconnected`` (the answer was lost: the message may or
        may not be published), ``unsupported`` (bytes over HTTP, or no
        ``publish_url``).
        """
        if self._closed:
            raise ClientError("closed", "the client is closed", topic=topic)
        if not is_topic(topic):
            raise ClientError("bad_request", f"bad topic {topic!r}", topic=topic)
        transport = self._transport
        if self._open and transport is not None and transport.name == "websocket":
            if isinstance(data, (bytes, bytearray, memoryview)):
                rid = self._new_id()
                frame = binary_frame({"type": "publish", "id": rid, "topic": topic}, bytes(data))
                answer = await self._await_answer(rid, transport.send_bytes(frame))
            else:
                answer = await self._request(
                    {"type": "publish", "topic": topic, "data": data}, self.request_timeout
                )
            cursor = answer.get("cursor") if isinstance(answer, dict) else None
            return cursor if isinstance(cursor, str) else None
        if self.publish_url is None:
            raise ClientError(
                "unsupported" if self._open else "disconnected",
                "no open WebSocket and no publish_url",
                topic=topic,
            )
        if isinstance(data, (bytes, bytearray, memoryview)):
            raise ClientError("unsupported", "bytes need the WebSocket transport", topic=topic)
        return await self._http_publish(topic, data)

    async def _http_publish(self, topic: str, data: Any) -> str | None:
        assert self.publish_url is not None
        body = json.dumps({"topic": topic, "data": data}).encode("utf-8")
        try:
            answer = await asyncio.wait_for(
                http_request(
                    self.publish_url,
                    method="POST",
                    headers=dict(self.headers, **{"Content-Type": "application/json"}),
                    body=body,
                    connect_timeout=self.connect_timeout,
                ),
                self.request_timeout,
            )
        except asyncio.TimeoutError:
            raise ClientError("timeout", "no answer to publish", topic=topic) from None
        except (OSError, tornado.iostream.StreamClosedError) as exc:
            raise ClientError("disconnected", f"publish failed: {exc}", topic=topic) from exc
        try:
            reply = json.loads(answer.body)
        except ValueError:
            reply = {}
        if answer.status != 200:
            code = reply.get("code") if isinstance(reply, dict) else None
            raise ClientError(
                code if isinstance(code, str) else "internal",
                str(reply.get("reason", "")) if isinstance(reply, dict) else "",
                status=answer.status,
                topic=topic,
            )
        cursor = reply.get("cursor") if isinstance(reply, dict) else None
        return cursor if isinstance(cursor, str) else None

    async def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:
        """Call ``method`` on the server with ``params``; return its JSON result.

        Needs the WebSocket transport (``unsupported`` on SSE or long-poll,
        ``disconnected`` while reconnecting). ``timeout`` defaults to
        ``request_timeout``. Raises :class:`ClientError` with the server's code
        (``not_found``, ``timeout``, ...) or the client's.
        """
        if self._closed:
            raise ClientError("closed", "the client is closed")
        transport = self._transport
        if not self._open or transport is None:
            raise ClientError("disconnected", "not connected")
        if transport.name != "websocket":
            raise ClientError("unsupported", f"call needs the WebSocket (now {transport.name})")
        frame: dict[str, Any] = {"type": "call", "method": method}
        if params is not None:
            frame["params"] = params
        answer = await self._request(frame, self.request_timeout if timeout is None else timeout)
        return answer.get("result") if isinstance(answer, dict) else None

    async def presence(
        self, topic: str, *, cursor: str | None = None, limit: int | None = None
    ) -> PresencePage:
        """One page of ``topic``'s members, and its counts, on every server process.

        Pass the returned page's ``cursor`` to read the next page; ``limit`` is
        1 to 1000 (the server's default: 100). Needs the WebSocket transport, as
        :meth:`call` does. Raises :class:`ClientError` (``forbidden`` when the
        application does not show this topic's members, ``not_found`` when the
        server keeps no presence).
        """
        if self._closed:
            raise ClientError("closed", "the client is closed")
        transport = self._transport
        if not self._open or transport is None:
            raise ClientError("disconnected", "not connected")
        if transport.name != "websocket":
            raise ClientError("unsupported", f"presence needs the WebSocket (now {transport.name})")
        frame: dict[str, Any] = {"type": "presence", "topic": topic}
        if cursor is not None:
            frame["cursor"] = cursor
        if limit is not None:
            frame["limit"] = limit
        answer = await self._request(frame, self.request_timeout)
        members = answer.get("members")
        return PresencePage(
            topic=topic,
            members=tuple(members) if isinstance(members, list) else (),
            cursor=_str(answer.get("cursor")),
            connections=int(answer.get("connections") or 0),
            users=int(answer.get("users") or 0),
        )

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) % (2**53)
        return self._next_id

    async def _request(self, frame: dict[str, Any], timeout: float) -> Any:
        transport = self._transport
        rid = self._new_id()
        frame["id"] = rid
        sent = transport is not None and transport.send_text(json.dumps(frame))
        return await self._await_answer(rid, sent, timeout)

    async def _await_answer(self, rid: int, sent: bool, timeout: float | None = None) -> Any:
        if not sent:
            raise ClientError("disconnected", "not connected")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            return await asyncio.wait_for(
                future, self.request_timeout if timeout is None else timeout
            )
        except asyncio.TimeoutError:
            raise ClientError("timeout", "no answer in time") from None
        finally:
            self._pending.pop(rid, None)

    def _fail_pending(self, error: ClientError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: the waiter may have timed out

    # -- the connection loop

    async def _run(self) -> None:
        self._backoff.reset()
        failures = 0
        pinned = False
        try:
            while not self._closed:
                name = self._candidates[self._index]
                transport = _TRANSPORTS[name](self)
                self._transport = transport
                fallback = False
                self._proven = False
                reason = ""
                try:
                    reason = await self._watch(transport)
                    log.info("%s connection ended: %s", name, reason)
                except _Fatal as exc:
                    self._error = exc.error
                    break
                except _Refused as exc:
                    log.info("%s", exc)
                    fallback = True
                except (
                    OSError,
                    ConnectionError,
                    asyncio.TimeoutError,
                    tornado.iostream.StreamClosedError,
                    tornado.httpclient.HTTPClientError,
                    tornado.websocket.WebSocketError,
                    ValueError,
                ) as exc:
                    log.info("%s connection failed: %r", name, exc)
                except Exception:  # a bug here must not end the client silently
                    log.exception("%s transport failed", name)
                opened = self._proven
                if opened:
                    pinned = True
                    self._backoff.reset()
                    failures = 0
                self._lost()
                if self._stopped():
                    break
                self._counters.failures += 1
                delay: float | None = None
                if not opened and not pinned:
                    failures += 1
                    if fallback or failures >= self.fallback_after:
                        failures = 0
                        if self._index + 1 < len(self._candidates):
                            self._index += 1
                            self._counters.fallbacks += 1
                            delay = 0.0
                        elif fallback:
                            self._index = 0
                if reason == _BLOCKED:
                    delay = 0.0
                    await self._wait_any_room()
                if delay is None:
                    delay = self._backoff.next_delay(self._rand)
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), delay)
        finally:
            self._lost()
            if not self._closed:
                self._closed = True
                error = self._error or ClientError("closed", "the client stopped")
                self._fail_pending(error)
                for sub in list(self._subs.values()):
                    sub._end(self._error)
                self._subs.clear()
            self._changed.set()

    async def _watch(self, transport: _Transport) -> str:
        """Run ``transport``; drop it when a watched stream stays silent for ``idle_timeout``."""
        task = asyncio.ensure_future(transport.run())
        self._last_seen = time.monotonic()
        try:
            while True:
                idle = self.idle_timeout if transport.watched and self._open else None
                if idle is None:
                    wait: float | None = None
                    if transport.watched and self.idle_timeout is not None:
                        wait = self.idle_timeout  # not open yet: look again then
                    await asyncio.wait({task}, timeout=wait)
                else:
                    remaining = self._last_seen + idle - time.monotonic()
                    if remaining > 0:
                        await asyncio.wait({task}, timeout=remaining)
                if task.done():
                    return task.result()
                if (
                    self._open
                    and idle is not None
                    and self._blocked == 0
                    and time.monotonic() - self._last_seen >= idle
                ):
                    self._counters.idle_timeouts += 1
                    transport.abort = True
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return f"no frame for {idle:g} s"
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _wait_any_room(self) -> None:
        subs = [s for s in self._subs.values() if s._full()]
        if subs:
            waiters: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(s._wait_room()) for s in subs
            ]
            waiters.append(asyncio.ensure_future(self._closing.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)

    def _opened(self, transport: _Transport, *, idle: bool = False) -> None:
        """The transport is open; ``idle``: with nothing to carry yet (not proven to work)."""
        if transport is not self._transport:
            return
        if not idle:
            self._proven = True
        if self._open:
            return
        self._open = True
        self._counters.connects += 1
        self._last_seen = time.monotonic()
        if transport.name == "websocket":
            for sub in list(self._subs.values()):
                self._send_subscribe(sub)  # each from its own cursor
        self._changed.set()

    def _stop_auth(self) -> None:
        task, self._auth_task = self._auth_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _authenticate(self, transport: _Transport) -> None:
        """``auth`` with a token from ``get_token("open")``, then open; refresh before expiry."""
        assert self.get_token is not None
        kind, reason = "auth", "open"
        while transport is self._transport:
            try:
                token = self.get_token(reason)
                if not isinstance(token, str):
                    token = await token
                answer = await self._request({"type": kind, "token": token}, self.request_timeout)
            except asyncio.CancelledError:
                raise
            except ClientError as exc:  # refused: the server closes (4401 / 4403)
                log.warning("%s refused: %s", kind, exc)
                return
            except Exception as exc:  # no token: the server closes when the time is up
                log.warning("getting a token for %s failed: %r", kind, exc)
                return
            self.user = _str(answer.get("user"))
            left = answer.get("expires_in")
            self.expires_in = float(left) if isinstance(left, int | float) else None
            if kind == "auth":
                self._opened(transport)
            if self.expires_in is None:
                return
            # A deadline timer, not a poll: the refresh is due refresh_margin s before.
            await asyncio.sleep(max(self.expires_in - self.refresh_margin, self.expires_in / 2))
            kind, reason = "refresh", "refresh"

    def _lost(self) -> None:
        self._stop_auth()
        was_open = self._open
        self._open = False
        self._sub_requests = {}
        for sub in self._subs.values():
            sub.active = False
        self._fail_pending(ClientError("disconnected", "the connection was lost before the answer"))
        if was_open:
            self._changed.set()

    def _stopped(self) -> bool:
        return self._closed

    def _touch(self) -> None:
        self._last_seen = time.monotonic()

    # -- what the transports hand in

    def _send_subscribe(self, sub: Subscription) -> None:
        transport = self._transport
        if transport is None:
            return
        rid = self._new_id()
        frame: dict[str, Any] = {"type": "subscribe", "id": rid, "topic": sub.topic}
        if sub.cursor is not None:
            frame["cursor"] = sub.cursor
        if sub.params is not None:
            frame["params"] = sub.params
        self._sub_requests[rid] = sub
        transport.send_text(json.dumps(frame))

    def _topic_query(self) -> tuple[list[str], dict[str, str]] | None:
        if not self._subs:
            return None
        topics = list(self._subs)
        cursors: dict[str, Cursor | None] = {}
        for topic, sub in self._subs.items():
            cursors[topic] = parse_cursor(sub.cursor) if sub.cursor is not None else None
        query = {
            "topics": ",".join(topics),
            "cursors": format_cursor_map(cursors),
            "client": self.presence_client,
        }
        if any(_wants_presence(sub.params) for sub in self._subs.values()):
            query["presence"] = "1"
        return topics, query

    def _has_cursors(self) -> bool:
        return any(sub.cursor is not None for sub in self._subs.values())

    async def _deliver(self, topic: str, cursor: str | None, data: Any, binary: bool) -> bool:
        """Put one message in its topic's buffer. False: BLOCK on SSE (drop the stream)."""
        sub = self._subs.get(topic)
        if sub is None or sub.ended:
            return True
        transport = self._transport
        if transport is not None and transport.name == "websocket" and not sub.active:
            return True  # a topic's messages follow its "subscribed"
        if cursor is not None and sub.cursor is not None and not is_after(cursor, sub.cursor):
            self._counters.duplicates += 1
            return True
        if sub._full() and self.buffer_policy is BufferPolicy.BLOCK:
            self._counters.blocked += 1
            if transport is not None and transport.name == "sse":
                return False
            self._blocked += 1
            try:
                await sub._wait_room()
            finally:
                self._blocked -= 1
                self._touch()
            if sub._over():
                return True
        if cursor is not None:
            sub._cursor = cursor
        self._counters.messages += 1
        sub._put(TopicMessage(topic, cursor, data, binary), self._counters)
        return True

    def _topic_resync(self, topic: str, cursor: str | None, reason: str) -> None:
        sub = self._subs.get(topic)
        if sub is None or sub.ended:
            return
        sub._cursor = cursor
        self._counters.resyncs += 1
        sub._put(Resync(topic, cursor, reason), self._counters)

    def _resync_all(self, reason: str) -> None:
        for topic in list(self._subs):
            self._topic_resync(topic, None, reason)

    def _refused(self, topic: str, error: ClientError) -> None:
        sub = self._subs.pop(topic, None)
        if sub is not None:
            sub._end(error)

    async def _on_text(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.warning("unreadable frame from the server: %.80r", text)
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind is None:
            topic = frame.get("topic")
            if isinstance(topic, str):
                await self._deliver(topic, _str(frame.get("cursor")), frame.get("data"), False)
            return
        if kind == "ping":
            self._counters.pings += 1
            if self._transport is not None:
                self._transport.send_text('{"type":"pong"}')
        elif kind == "welcome":
            self.client_id = _str(frame.get("client"))
            transport = self._transport
            if transport is not None:
                if self.get_token is not None and transport.name == "websocket":
                    self._stop_auth()
                    self._auth_task = asyncio.ensure_future(self._authenticate(transport))
                else:
                    self._opened(transport)
        elif kind == "subscribed":
            rid = frame.get("id")
            sub = self._sub_requests.pop(rid, None) if isinstance(rid, int) else None
            if sub is not None and self._subs.get(sub.topic) is sub:
                sub._confirm(_str(frame.get("cursor")))
        elif kind == "resync":
            topic = frame.get("topic")
            if isinstance(topic, str):
                self._topic_resync(topic, _str(frame.get("cursor")), str(frame.get("reason")))
        elif kind == "unsubscribed":
            rid = frame.get("id")
            if rid is not None:
                self._answer(rid, frame)
                return
            topic = frame.get("topic")
            if isinstance(topic, str):
                reason = str(frame.get("reason") or "ended by the server")
                self._refused(topic, ClientError("closed", reason, topic=topic))
        elif kind in ("published", "result", "presence", "authenticated"):
            self._answer(frame.get("id"), frame)
        elif kind in ("join", "leave", "presence_gap"):
            self._presence_change(kind, frame)
        elif kind == "error":
            self._on_error_frame(frame)
        # a type of a newer server: ignored

    def _presence_change(self, kind: str, frame: Any) -> None:
        """A join, leave or presence_gap (WebSocket frame, SSE event, long-poll ``events``)."""
        topic = frame.get("topic") if isinstance(frame, dict) else None
        sub = self._subs.get(topic) if isinstance(topic, str) else None
        if sub is not None and not sub.ended:
            change = PresenceChange(
                topic=sub.topic,
                kind=kind,
                member=frame.get("member"),
                reason=_str(frame.get("reason")),
            )
            sub._put(change, self._counters)

    def _disconnected(self, code: Any, reason: Any) -> None:
        """The server disconnected this client's user over SSE or long-poll: end or reconnect.

        Raises ``_Fatal`` for 1008, 4401, 4403 (as a WebSocket closed with it),
        else ``ConnectionError`` (reconnect with a new presence client id: the
        server refuses the old one for a while).
        """
        self.presence_client = secrets.token_hex(8)
        text = f"disconnected by the server (close code {code}: {reason})"
        if code in _FATAL_CLOSE:
            raise _Fatal(ClientError(_FATAL_CLOSE[code], text))
        raise ConnectionError(text)

    def _answer(self, rid: Any, frame: dict[str, Any]) -> None:
        future = self._pending.get(rid) if isinstance(rid, int) else None
        if future is not None and not future.done():
            future.set_result(frame)

    def _on_error_frame(self, frame: dict[str, Any]) -> None:
        code = frame.get("code")
        error = ClientError(
            code if isinstance(code, str) else "internal",
            str(frame.get("reason") or ""),
            status=frame.get("status") if isinstance(frame.get("status"), int) else None,
            topic=_str(frame.get("topic")),
        )
        rid = frame.get("id")
        if isinstance(rid, int) and rid in self._sub_requests:
            sub = self._sub_requests.pop(rid)
            if sub is not None and self._subs.get(sub.topic) is sub:
                error.topic = sub.topic
                self._refused(sub.topic, error)
            return
        future = self._pending.get(rid) if isinstance(rid, int) else None
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # retrieved: the waiter may have given up
            return
        log.warning("error from the server: %s", error)

    async def _on_binary(self, data: bytes) -> None:
        try:
            header, payload = parse_binary_frame(data)
        except LongConnError:
            log.warning("malformed binary frame from the server")
            return
        topic = header.get("topic")
        if isinstance(topic, str):
            await self._deliver(topic, _str(header.get("cursor")), payload, True)

    async def _on_message_object(self, obj: Any) -> bool:
        if not isinstance(obj, dict) or not isinstance(obj.get("topic"), str):
            return True
        data = obj.get("data")
        binary = bool(obj.get("binary"))
        if binary and isinstance(data, str):
            data = base64.b64decode(data)
        return await self._deliver(obj["topic"], _str(obj.get("cursor")), data, binary)

    def _confirm_topics(self, topics: list[str]) -> None:
        for topic in topics:
            sub = self._subs.get(topic)
            if sub is not None:
                sub._confirm(None)

    def _fill_cursors(self, cursors: Any) -> None:
        if not isinstance(cursors, dict):
            return
        for topic, cursor in cursors.items():
            sub = self._subs.get(topic)
            if sub is not None and isinstance(cursor, str):
                sub._cursor = _advance(sub.cursor, cursor)

    def _topic_error(self, obj: Any) -> None:
        if not isinstance(obj, dict) or not isinstance(obj.get("topic"), str):
            return
        code = obj.get("code")
        self._refused(
            obj["topic"],
            ClientError(
                code if isinstance(code, str) else "forbidden",
                str(obj.get("reason") or ""),
                status=obj.get("status") if isinstance(obj.get("status"), int) else None,
                topic=obj["topic"],
            ),
        )

    async def _on_sse_event(self, event: str, data: str, event_id: str | None) -> bool:
        if event == "":
            return True  # a comment (keep-alive)
        try:
            obj = json.loads(data) if data else None
        except ValueError:
            return True
        if event == "ready":
            start = obj.get("cursors") if isinstance(obj, dict) else None
            if isinstance(start, dict):
                self._fill_cursors(start)
                self._confirm_topics([t for t in start if t in self._subs])
            else:
                self._confirm_topics(list(self._subs))
        elif event == "message":
            return await self._on_message_object(obj)
        elif event == "resync":
            if isinstance(obj, dict) and isinstance(obj.get("topic"), str):
                self._topic_resync(obj["topic"], _str(obj.get("cursor")), str(obj.get("reason")))
        elif event == "error":
            self._topic_error(obj)
        elif event in ("join", "leave", "presence_gap"):
            self._presence_change(event, obj)
        elif event == "disconnect" and isinstance(obj, dict):
            # The server ends the stream after it; the transport acts then (an
            # exception here would be Tornado's, inside its body callback).
            self._disconnect = (obj.get("code"), obj.get("reason"))
        return True

    async def _on_poll_body(self, body: Any, topics: list[str]) -> None:
        if not isinstance(body, dict):
            return
        for item in body.get("resync") or ():
            if isinstance(item, dict) and isinstance(item.get("topic"), str):
                self._topic_resync(item["topic"], _str(item.get("cursor")), str(item.get("reason")))
        for item in body.get("errors") or ():
            self._topic_error(item)
        self._confirm_topics(topics)
        for item in body.get("messages") or ():
            await self._on_message_object(item)
        self._fill_cursors(body.get("cursors"))
        for item in body.get("events") or ():
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in ("join", "leave", "presence_gap"):
                self._presence_change(kind, item)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _wants_presence(params: Any) -> bool:
    return isinstance(params, dict) and params.get("presence") is True


def _disconnect_answer(body: bytes) -> tuple[Any, Any] | None:
    """``(close_code, reason)`` of a long-poll answer ``{"code":"disconnected",...}``, else None."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("code") == "disconnected":
        return obj.get("close_code"), obj.get("reason")
    return None


def connect(
    url: str,
    *,
    sse_url: str | None = None,
    poll_url: str | None = None,
    publish_url: str | None = None,
    transports: Sequence[str] | None = None,
    headers: dict[str, str] | None = None,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    buffer_policy: BufferPolicy | str = BufferPolicy.DROP_OLDEST,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    connect_timeout: float = 10.0,
    open_timeout: float = 30.0,
    request_timeout: float = 10.0,
    poll_timeout: float = 25.0,
    backoff_base: float = DEFAULT_BACKOFF_BASE,
    backoff_cap: float = DEFAULT_BACKOFF_CAP,
    fallback_after: int = 2,
    ping_interval: float | None = None,
    max_message_size: int = 10 * 1024 * 1024,
    get_token: Callable[[str], Awaitable[str] | str] | None = None,
    refresh_margin: float = 30.0,
) -> Client:
    """A :class:`Client` for the subscriptions protocol; use ``async with connect(...) as client``.

    Entering it connects (:meth:`Client.start`); leaving it closes.

    * ``url`` -- the WebSocket endpoint (``ws://`` or ``wss://``, a
      ``SubscriptionMixin`` handler); ``sse_url``, ``poll_url`` -- the
      multi-topic SSE and long-poll handlers (``http(s)://``), tried in that
      order when the WebSocket upgrade is refused; ``publish_url`` -- the HTTP
      publish handler used on SSE and long-poll. ``transports`` restricts or
      reorders ``["websocket", "sse", "longpoll"]``.
    * ``headers`` -- sent with every request (cookies, ``Authorization``).
    * ``buffer_size`` (:data:`DEFAULT_BUFFER_SIZE`), ``buffer_policy``
      (:class:`BufferPolicy`) -- per subscription.
    * ``idle_timeout`` (:data:`DEFAULT_IDLE_TIMEOUT` s; None: off) -- a WebSocket
      or SSE stream silent for that long is dropped and reconnected.
    * ``connect_timeout`` (10 s) -- one TCP connect and upgrade;
      ``open_timeout`` (30 s) -- entering waits this long for a transport;
      ``request_timeout`` (10 s) -- an answer to subscribe, publish, call;
      ``poll_timeout`` (25 s) -- how long a long-poll waits on the server.
    * ``backoff_base`` (0.5 s), ``backoff_cap`` (30 s) -- full-jitter reconnect
      delays (:class:`~tornado_longconn.backoff.ReconnectBackoff`; ``ValueError``
      unless ``0 < backoff_base <= backoff_cap``); ``fallback_after`` (2) --
      failed attempts of a transport that never opened before the next one is
      tried.
    * ``ping_interval`` -- seconds between WebSocket pings sent by the client
      (None: none; the server's pings are answered either way);
      ``max_message_size`` -- the largest frame accepted (10 MiB).
    * ``get_token`` -- ``get_token(reason)`` (sync or async) returns a token for
      the server's ``authenticate`` hook: on every WebSocket the client sends
      ``{"type":"auth","token"}`` first (reason ``"open"``) and is open once it
      is accepted; ``refresh_margin`` (30 s; at most half the lifetime) before
      the identity expires it sends ``{"type":"refresh","token"}`` (reason
      ``"refresh"``). A refused token makes the server close with 4401/4403:
      the client ends with that error; a close 4401 ``"expired"`` (a refresh
      missed) reconnects with a fresh token instead.
    """
    return Client(
        url,
        sse_url=sse_url,
        poll_url=poll_url,
        publish_url=publish_url,
        transports=transports,
        headers=headers,
        buffer_size=buffer_size,
        buffer_policy=buffer_policy,
        idle_timeout=idle_timeout,
        connect_timeout=connect_timeout,
        open_timeout=open_timeout,
        request_timeout=request_timeout,
        poll_timeout=poll_timeout,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        fallback_after=fallback_after,
        ping_interval=ping_interval,
        max_message_size=max_message_size,
        get_token=get_token,
        refresh_margin=refresh_margin,
    )
