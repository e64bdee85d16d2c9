"""Server-Sent Events over a topic's history: :class:`SSEHandler` and :class:`SSEMixin`.

``GET <url>`` (optionally ``?cursor=<cursor>``, or the ``Last-Event-ID`` header
that browsers send when an ``EventSource`` reconnects; the header wins) answers
``200 text/event-stream`` and then streams::

    retry: 3000                    <- reconnect hint (milliseconds), first block only
    id: a1b2c3-7                   <- the cursor the stream starts after
    event: ready
    data: {"cursor":"a1b2c3-7"}

    id: a1b2c3-8                   <- one event per message: id is its cursor
    data: hello                    <- text; a multi-line text gives several data: lines

    id: a1b2c3-9
    event: binary                  <- a binary message: data is base64
    data: AAEC/w==

    : keep-alive                   <- a comment line after `keepalive` seconds of silence
    id: a1b2c3-42
    event: resync                  <- gap: history no longer reaches back
    data: {"cursor":"a1b2c3-42","reason":"evicted"}

Text messages are ordinary ``message`` events (``EventSource.onmessage``).
Line breaks inside a text message arrive as ``\\n`` (the SSE format cannot carry
``\\r``). On ``resync`` the client reloads its state by other means; the
event's ``id`` already moved ``lastEventId`` to the current head, so the
stream simply continues from there.

No cursor means "from now on" (the ``ready`` event names the head). A malformed
cursor is answered ``400 {"error": ...}`` before the stream starts; a full
waiter (``max_streams``) ``503``.

Waiting is done by the shared :class:`~tornado_longconn.longpoll.LongPollWaiter`
(one backend subscription per topic for all streams and long-polls). Writes go
through a :class:`~tornado_longconn.backpressure.BackpressureWriter`: while a
client reads slowly the stream stops pulling messages, so the backlog stays in
the topic's history (bounded) rather than in memory per client. A client that
falls behind the history gets ``resync``; one that reads nothing for
``stall_timeout`` seconds is disconnected and resumes with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from typing import Final

import tornado.web

from .backpressure import DEFAULT_HIGH_WATER, BackpressureWriter
from .connections import ConnectionCounters
from .exceptions import BackendError, CursorError, LongConnError
from .log import Cursor, Message, parse_cursor
from .logfields import log_fields
from .longpoll import (
    LongPollWaiter,
    PollResult,
    WaiterLimitError,
    json_error,
    topic_for_request,
)
from .origin import refuse_cross_origin

__all__ = [
    "DEFAULT_KEEPALIVE",
    "DEFAULT_RETRY",
    "DEFAULT_STALL_TIMEOUT",
    "SSEHandler",
    "SSEMixin",
    "format_comment",
    "format_event",
    "format_message",
    "format_result",
]

log = logging.getLogger("tornado_longconn.sse")

#: Seconds of silence after which a ``: keep-alive`` comment is sent.
DEFAULT_KEEPALIVE: Final = 15.0
#: Reconnect delay hint sent as ``retry:`` (milliseconds).
DEFAULT_RETRY: Final = 3000
#: Seconds a write may wait for a client that reads nothing before it is disconnected.
DEFAULT_STALL_TIMEOUT: Final = 60.0

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def format_comment(text: str = "") -> bytes:
    """SSE comment lines (``: text``), ignored by clients; keeps proxies from idling out.

    No blank line follows: a blank line would end an (empty) event, which some
    client libraries report as an empty message.
    """
    return b"".join(b": " + line.encode() + b"\n" for line in _LINE_BREAK.split(text))


def format_event(
    data: str,
    *,
    id: str | None = None,
    event: str | None = None,
    retry: int | None = None,
) -> bytes:
    """One SSE event block: optional ``retry:``, ``id:``, ``event:``, then ``data:`` lines.

    ``data`` is split on ``\\r\\n``, ``\\r`` and ``\\n`` into one ``data:`` line
    each (clients join them with ``\\n``). ``id`` and ``event`` must not contain
    line breaks (or NUL, for ``id``): :class:`ValueError`.
    """
    parts: list[str] = []
    if retry is not None:
        parts.append(f"retry: {int(retry)}\n")
    if id is not None:
        if _LINE_BREAK.search(id) or "\0" in id:
            raise ValueError("an SSE id cannot contain line breaks or NUL")
        parts.append(f"id: {id}\n")
    if event is not None:
        if _LINE_BREAK.search(event):
            raise ValueError("an SSE event name cannot contain line breaks")
        parts.append(f"event: {event}\n")
    parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def format_message(message: Message) -> bytes:
    """The SSE event of one message: ``id`` = cursor; bytes as ``event: binary`` + base64."""
    cursor = str(message.cursor) if message.cursor is not None else None
    if isinstance(message.data, bytes):
        return format_event(
            base64.b64encode(message.data).decode("ascii"), id=cursor, event="binary"
        )
    return format_event(message.data, id=cursor)


def format_result(result: PollResult) -> bytes:
    """The SSE form of a :class:`~tornado_longconn.longpoll.PollResult`.

    A gap is one ``resync`` event (id = the head); messages are one event each;
    an empty result is a keep-alive comment.
    """
    if result.gap:
        data = json.dumps({"cursor": str(result.cursor), "reason": result.reason})
        return format_event(data, id=str(result.cursor), event="resync")
    if not result.messages:
        return format_comment("keep-alive")
    return b"".join(format_message(m) for m in result.messages)


def _ready(cursor: Cursor, retry: int | None) -> bytes:
    data = json.dumps({"cursor": str(cursor)}, separators=(",", ":"))
    return format_event(data, id=str(cursor), event="ready", retry=retry)


class SSEMixin(tornado.web.RequestHandler):
    """Server-Sent Events streaming for your own ``RequestHandler``.

    Set ``self.sse_waiter`` (a shared
    :class:`~tornado_longconn.longpoll.LongPollWaiter`, usually in ``initialize``),
    then in ``get`` (after your own authentication) ``await self.stream_events(topic)``.
    It returns when the client goes away, the stream stalls, or the waiter closes.
    If you override ``on_connection_close``, call ``super().on_connection_close()``.

    Class attributes (override per class, or set on ``self`` in ``initialize``):
    ``sse_keepalive`` (:data:`DEFAULT_KEEPALIVE` seconds), ``sse_retry``
    (:data:`DEFAULT_RETRY` ms; None sends no ``retry:``), ``sse_high_water``
    (bytes buffered before the stream stops pulling messages, default 1 MiB),
    ``sse_stall_timeout`` (:data:`DEFAULT_STALL_TIMEOUT` seconds).
    """

    sse_waiter: LongPollWaiter
    sse_keepalive: float = DEFAULT_KEEPALIVE
    sse_retry: int | None = DEFAULT_RETRY
    sse_high_water: int = DEFAULT_HIGH_WATER
    sse_stall_timeout: float = DEFAULT_STALL_TIMEOUT

    _sse_task: asyncio.Future[None] | None = None
    _sse_gone = False

    def sse_start_cursor(self) -> Cursor | None:
        """The cursor to resume after: ``Last-Event-ID``, else ``?cursor=``, else None.

        Raises :class:`~tornado_longconn.exceptions.CursorError` when malformed.
        """
        raw = self.request.headers.get("Last-Event-ID") or self.get_query_argument("cursor", None)
        return parse_cursor(raw) if raw else None

    async def stream_events(self, topic: str | None = None) -> None:
        """Stream ``topic``'s messages after the start cursor until the client leaves.

        Answers 400 for a malformed cursor and 503 when the waiter has
        ``max_streams`` streams or the backend fails before the stream starts.
        """
        if refuse_cross_origin(self):
            return
        waiter = self.sse_waiter
        try:
            cursor = self.sse_start_cursor()
        except CursorError as exc:
            json_error(self, 400, str(exc))
            return
        try:
            with waiter.stream():
                if self._sse_gone:
                    return
                counters = ConnectionCounters.for_application(self.application)
                counters.opened(self, "sse")
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("SSE stream on %r", topic, extra=log_fields(self, topic=topic))
                self._sse_task = asyncio.ensure_future(self._sse_run(topic, cursor))
                try:
                    await self._sse_task
                except asyncio.CancelledError:
                    if not self.sse_client_gone():
                        raise
                finally:
                    self._sse_task = None
                    counters.closed(self)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "SSE stream on %r ended", topic, extra=log_fields(self, topic=topic)
                        )
        except WaiterLimitError as exc:
            json_error(self, 503, str(exc))

    def sse_client_gone(self) -> bool:
        """True once the client closed the connection."""
        return self._sse_gone

    async def _sse_run(self, topic: str | None, cursor: Cursor | None) -> None:
        waiter = self.sse_waiter
        if cursor is None:
            try:
                cursor = (await waiter.wait(None, 0, topic=topic)).cursor
            except BackendError as exc:
                log.warning(
                    "SSE on %r could not start: %s", topic, exc, extra=log_fields(self, topic=topic)
                )
                json_error(self, 503, "backend unavailable")
                return
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
        writer = BackpressureWriter.of(self, high_water=self.sse_high_water)
        try:
            await writer.send(_ready(cursor, self.sse_retry))
            while True:
                try:
                    result = await waiter.wait(cursor, self.sse_keepalive, topic=topic)
                except BackendError as exc:
                    # end the stream; the client reconnects with Last-Event-ID
                    log.warning(
                        "SSE on %r: backend failed, ending stream: %s",
                        topic,
                        exc,
                        extra=log_fields(self, topic=topic),
                    )
                    break
                except LongConnError:  # the waiter was closed
                    break
                chunk = result.encoded("sse", format_result)
                if writer.buffered <= writer.high_water:
                    await writer.send(chunk)  # below the high-water mark: does not wait
                else:
                    try:
                        await asyncio.wait_for(writer.send(chunk), self.sse_stall_timeout)
                    except asyncio.TimeoutError:
                        log.info(
                            "SSE on %r: client stalled, disconnecting",
                            topic,
                            extra=log_fields(self, topic=topic),
                        )
                        break
                cursor = result.cursor
        except LongConnError:  # PeerGoneError / ConnectionClosedError: the client is gone
            return
        writer.close()

    def on_connection_close(self) -> None:
        """Stop the stream: the client is gone."""
        self._sse_gone = True
        task = self._sse_task
        if task is not None:
            task.cancel()
        super().on_connection_close()


class SSEHandler(SSEMixin):
    """A ready-made SSE endpoint (see the module docs for the stream format).

    ``initialize`` kwargs: ``waiter`` (the shared
    :class:`~tornado_longconn.longpoll.LongPollWaiter`), ``topic`` (default: the
    waiter's topic, else the URL's ``topic`` group or first group), and
    optionally ``keepalive``, ``retry``, ``high_water``, ``stall_timeout``::

        waiter = LongPollWaiter(backend)
        app = Application([
            (r"/events/(?P<topic>[a-z0-9-]+)", SSEHandler, {"waiter": waiter}),
        ])
    """

    def initialize(
        self,
        waiter: LongPollWaiter,
        topic: str | None = None,
        *,
        keepalive: float | None = None,
        retry: int | None = None,
        high_water: int | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        """Store the shared ``waiter``, the fixed ``topic`` and the optional settings."""
        self.sse_waiter = waiter
        self.sse_topic = topic
        if keepalive is not None:
            self.sse_keepalive = keepalive
        if retry is not None:
            self.sse_retry = retry
        if high_water is not None:
            self.sse_high_water = high_water
        if stall_timeout is not None:
            self.sse_stall_timeout = stall_timeout

    def get_topic(self, *args: str, **kwargs: str) -> str:
        """The topic to serve; raises ``HTTPError(404)`` when there is none."""
        return topic_for_request(self.sse_topic, self.sse_waiter, args, kwargs)

    async def get(self, *args: str, **kwargs: str) -> None:
        """Stream events (see :meth:`SSEMixin.stream_events`)."""
        await self.stream_events(self.get_topic(*args, **kwargs))
