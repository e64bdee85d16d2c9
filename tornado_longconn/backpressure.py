"""Flow control for one outgoing connection: :class:`BackpressureWriter`.

A writer sits between the application and one connection -- a
``WebSocketHandler`` (frames) or a streaming ``RequestHandler`` (``write`` +
``flush``, e.g. Server-Sent Events or a long HTTP response) -- and keeps the
bytes held in memory for that connection bounded:

* ``await writer.send(message)`` returns at once while the buffer is at or
  below the high-water mark, and otherwise waits until it drains to the
  low-water mark. The wake-up comes from Tornado's write futures, never from
  a sleep loop.
* ``writer.send_nowait(message)`` never waits: above the high-water mark it
  applies the writer's :class:`OverflowPolicy` and says what happened
  (:class:`SendResult`).

The bookkeeping (buffered bytes, water marks, the overflow queue, counters) is
the I/O-free :class:`FlowState`; the writer is a thin shell that frames
messages, corks them, and hands them to the socket. On a plain (non-TLS)
WebSocket, a ``send_nowait`` frame with nothing corked or pending in front of
it, and nothing written yet in this event-loop iteration, goes straight to the
socket; the frames after it in the same iteration are corked and leave in one
socket write at the end of the iteration. So one message per iteration costs
one ``send()`` and no bookkeeping, and a burst costs about two writes.

Example::

    class Feed(tornado.websocket.WebSocketHandler):
        async def on_message(self, message):
            writer = BackpressureWriter.of(self)
            for item in await load_items():
                await writer.send(item)          # waits while the client is slow
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeAlias, TypeVar, Union

import tornado.web
import tornado.websocket
from tornado.iostream import IOStream, StreamClosedError

from ._frames import (
    OP_BINARY,
    OP_TEXT,
    Encoded,
    build_frame,
    encode_message,
    frame_for_connection,
)
from ._tornado import fanout, iostream, web, websocket_proto
from ._tornado.hooks import HandlerHooks, Hook, add_websocket_listener
from .codes import CloseCode
from .connections import _find_slots, _slots_of
from .exceptions import ConnectionClosedError, PeerGoneError, SlowConsumerError
from .logfields import log_fields
from .stats import COUNTER, FLAG, GAUGE, PEAK

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_MAX_QUEUE",
    "BackpressureWriter",
    "FlowState",
    "Lifecycle",
    "Message",
    "OverflowPolicy",
    "SendResult",
    "WriterStats",
]

log = logging.getLogger("tornado_longconn.backpressure")

#: Default high-water mark: 1 MiB per connection (see the how-to for why).
DEFAULT_HIGH_WATER: int = 1 << 20

#: Default bound of the ``DROP_OLDEST`` queue, in messages.
DEFAULT_MAX_QUEUE: int = 1000

#: Corked frames are written at once when they reach this many bytes. A burst of
#: 20 x 4 KiB to 5,000 members is then two writes per member (the direct first frame
#: and one of the rest); at 64 KiB it was three, and 25-35% slower.
_CORK_LIMIT = 256 * 1024
#: A frame this large is written at once with whatever is corked before it: joining
#: large frames saves no system call worth the copy, and the copy would briefly hold
#: a connection's bytes twice (a slow reader's memory stays within high water plus
#: one message).
_LARGE_FRAME = 64 * 1024

#: What :meth:`BackpressureWriter.send` accepts: ``str`` (text), ``bytes``
#: (binary), ``dict``/``list`` (JSON text) or an already :class:`Encoded` message.
Message: TypeAlias = Union[  # noqa: UP007 (a runtime alias on Python 3.10)
    str, bytes, bytearray, memoryview, dict[str, Any], list[Any], Encoded
]
Message.__doc__ = (
    "What a writer sends: str (text), bytes (binary), dict/list (JSON text), "
    "or an already encoded message."
)

T = TypeVar("T")


class OverflowPolicy(enum.Enum):
    """What :meth:`BackpressureWriter.send_nowait` does above the high-water mark."""

    #: Discard the message being sent (the newest); counted in ``stats().dropped``.
    DROP_NEWEST = "drop_newest"
    #: Keep a bounded queue of not-yet-written messages (``max_queue``) and
    #: discard the oldest queued one when it is full; counted in ``stats().dropped``.
    DROP_OLDEST = "drop_oldest"
    #: Close the connection as a slow consumer (close code
    #: :attr:`~tornado_longconn.codes.CloseCode.SLOW_CONSUMER`, 4000); the client
    #: reconnects and resumes from its last cursor.
    CLOSE = "close"


class Lifecycle(enum.Enum):
    """Where a writer's connection is in its life (:attr:`FlowState.lifecycle`)."""

    #: Messages are accepted.
    OPEN = "open"
    #: The connection started closing under the writer (a close frame went out or
    #: came in, or it was aborted); no data frame may follow. The writer settles
    #: on ``CLOSED_BY_US`` or ``GONE`` the next time it is used.
    CLOSING = "closing"
    #: This side closed it (:meth:`BackpressureWriter.close`, ``handler.close()``,
    #: ``finish()``); using the writer raises ``ConnectionClosedError``.
    CLOSED_BY_US = "closed_by_us"
    #: The peer is gone, or the ``CLOSE`` policy closed it as a slow consumer;
    #: using the writer raises ``PeerGoneError`` (``SlowConsumerError``).
    GONE = "gone"


_OPEN = Lifecycle.OPEN


class SendResult(enum.Enum):
    """What :meth:`BackpressureWriter.send_nowait` did with a message."""

    #: Accepted for writing, in order (it may still sit in the cork or the
    #: stream buffer for a moment; no policy will discard it).
    WRITTEN = "written"
    #: Held in the ``DROP_OLDEST`` overflow queue; written when the buffer drains,
    #: unless newer messages push it out first.
    QUEUED = "queued"
    #: Discarded by the overflow policy (``DROP_NEWEST``), and counted.
    DROPPED = "dropped"
    #: Not sent: the connection is closed (by the peer, by this side, or by the
    #: ``CLOSE`` policy just now).
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of one writer's counters (see :meth:`BackpressureWriter.stats`).

    Add up many writers' snapshots with :func:`~tornado_longconn.stats.sum_stats`.
    """

    #: Messages committed to the connection (framed and handed to the transport).
    messages_sent: int = field(metadata=COUNTER)
    #: Bytes of those messages on the wire (frame headers included).
    bytes_sent: int = field(metadata=COUNTER)
    #: Messages discarded by ``DROP_NEWEST`` or ``DROP_OLDEST``.
    dropped: int = field(metadata=COUNTER)
    #: Times a ``send`` (or ``drained``) had to wait for the buffer to drain.
    waits: int = field(metadata=COUNTER)
    #: Highest ``buffered`` value seen.
    peak_buffered: int = field(metadata=PEAK)
    #: True when the ``CLOSE`` policy closed the connection as a slow consumer.
    closed_slow: bool = field(metadata=FLAG)
    #: Messages in the ``DROP_OLDEST`` queue right now.
    queued: int = field(metadata=GAUGE)
    #: Bytes buffered right now (corked + stream buffer + queue).
    buffered: int = field(metadata=GAUGE)
    #: Writes handed to the transport: corked frames go out together, so this
    #: is usually far below ``messages_sent``.
    writes: int = field(metadata=COUNTER)


_DEFAULT_LOW_WATER: Final = max(1, DEFAULT_HIGH_WATER // 4)


class FlowState(Generic[T]):
    """Water-mark, queue and policy bookkeeping for one connection, without I/O.

    The shell reports what happens on the wire (:meth:`commit`, :meth:`flushed`,
    :meth:`set_pending`) and asks what to do (:meth:`must_wait`, :meth:`offer`,
    :meth:`admit`, :meth:`take_queued`, :meth:`is_drained`; :meth:`commit` and
    :meth:`admit` answer "flush now?"). Every path of the writer goes through
    these methods, except the broadcast fan-out's cork-join test, which inlines
    :meth:`admit` for speed and is held to it by a differential test
    (``tests/test_backpressure_fanout.py``). Sizes are byte counts.

    * ``corked`` -- bytes accepted but not yet handed to the transport;
    * ``pending`` -- bytes the transport holds (not yet taken by the kernel);
    * ``queued_bytes`` -- bytes of messages in the ``DROP_OLDEST`` queue.

    ``buffered`` is their sum. Raises :class:`ValueError` for marks that are not
    positive, a low-water mark above the high-water mark, or ``max_queue < 1``.
    """

    __slots__ = (
        "bytes_sent",
        "closed_slow",
        "corked",
        "direct_bytes",
        "direct_messages",
        "dropped",
        "high_water",
        "lifecycle",
        "low_water",
        "max_queue",
        "messages_sent",
        "peak_buffered",
        "pending",
        "policy",
        "queue",
        "queued_bytes",
        "waits",
        "writes",
    )

    def __init__(
        self,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        policy: OverflowPolicy = OverflowPolicy.CLOSE,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if low_water is None:
            # The default's int object shared by every writer (32 bytes each otherwise).
            low_water = (
                _DEFAULT_LOW_WATER if high_water == DEFAULT_HIGH_WATER else max(1, high_water // 4)
            )
        if high_water <= 0 or low_water <= 0:
            raise ValueError(
                f"water marks must be positive (high_water={high_water}, low_water={low_water})"
            )
        if low_water > high_water:
            raise ValueError(f"low_water ({low_water}) is above high_water ({high_water})")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {max_queue}")
        if not isinstance(policy, OverflowPolicy):
            raise TypeError(f"policy must be an OverflowPolicy, not {policy!r}")
        self.high_water = high_water
        self.low_water = low_water
        self.policy = policy
        self.max_queue = max_queue
        self.corked = 0
        self.pending = 0
        # The DROP_OLDEST queue: the shared empty tuple until a message is queued, and
        # again once it is empty (an empty deque costs 624 bytes per connection).
        self.queue: deque[tuple[T, int]] | tuple[()] = ()
        self.queued_bytes = 0
        self.lifecycle = Lifecycle.OPEN
        self.closed_slow = False
        self.messages_sent = 0
        self.bytes_sent = 0
        # Messages the broadcast fan-out wrote straight to an idle socket, counted
        # apart so that its loop does two additions per member (see
        # _tornado/fanout.py); stats() adds them to messages, bytes and writes.
        self.direct_messages = 0
        self.direct_bytes = 0
        self.dropped = 0
        self.waits = 0
        self.writes = 0
        self.peak_buffered = 0

    @property
    def closed(self) -> bool:
        """True unless :attr:`lifecycle` is ``OPEN``: no message may be committed."""
        return self.lifecycle is not _OPEN

    @property
    def committed(self) -> int:
        """Bytes committed to the connection: ``corked + pending``."""
        return self.corked + self.pending

    @property
    def buffered(self) -> int:
        """All bytes held for this connection: ``corked + pending + queued_bytes``."""
        return self.corked + self.pending + self.queued_bytes

    def must_wait(self) -> bool:
        """True when an awaited send must wait before committing its message.

        That is when the buffer is above the high-water mark, or messages are
        queued (they go first, to keep order).
        """
        return bool(self.queue) or self.corked + self.pending > self.high_water

    def is_drained(self) -> bool:
        """True when nothing is queued and the buffer is at or below the low-water mark."""
        return not self.queue and self.corked + self.pending <= self.low_water

    def commit(self, size: int) -> bool:
        """Record one message of ``size`` bytes accepted for writing (into the cork).

        Returns True when the cork must be handed to the transport now: it
        reached ``_CORK_LIMIT`` (256 KiB), the frame is large (64 KiB or more,
        written at once), or the committed bytes are above the high-water mark.
        Otherwise the cork is flushed at the end of the event-loop iteration.
        """
        corked = self.corked = self.corked + size
        self.messages_sent += 1
        self.bytes_sent += size
        return (
            corked >= _CORK_LIMIT or size >= _LARGE_FRAME or corked + self.pending > self.high_water
        )

    def admit(self, size: int) -> int:
        """:meth:`must_wait`, then :meth:`commit`, in one call (the fan-out's per-member rule).

        Returns 0 when the message must wait (nothing recorded: the caller
        applies :meth:`offer`), 1 when it was committed into the cork, 2 when it
        was committed and the cork must be flushed now. Same answers and
        counters as the two calls (a property test holds them together).
        """
        if self.queue:
            return 0
        pending = self.pending
        corked = self.corked
        if corked + pending > self.high_water:
            return 0
        corked = self.corked = corked + size
        self.messages_sent += 1
        self.bytes_sent += size
        if corked >= _CORK_LIMIT or size >= _LARGE_FRAME or corked + pending > self.high_water:
            return 2
        return 1

    def sent(self, size: int, pending: int) -> None:
        """Record one message of ``size`` bytes written straight to the transport.

        It bypassed the cork (nothing was corked); the transport now holds
        ``pending`` bytes (the part the kernel did not take yet).
        """
        self.messages_sent += 1
        self.bytes_sent += size
        self.writes += 1
        self.pending = pending
        if pending:
            self._note_peak()

    def flushed(self, pending: int) -> None:
        """The cork was handed to the transport, which now holds ``pending`` bytes."""
        self._note_peak()
        self.corked = 0
        self.pending = pending
        self.writes += 1

    def set_pending(self, pending: int) -> None:
        """The transport now holds ``pending`` bytes (it drained, or others wrote)."""
        self.pending = pending
        self._note_peak()

    def offer(self, item: T, size: int) -> SendResult:
        """Decide what happens to a message offered without waiting.

        Returns ``WRITTEN`` when the caller must commit it now (then call
        :meth:`commit`); ``QUEUED`` when it was put in the queue (``DROP_OLDEST``;
        the oldest queued message may have been discarded for it); ``DROPPED``
        (``DROP_NEWEST``); ``CLOSED`` when closed, or when the ``CLOSE`` policy
        applies now (``closed`` and ``closed_slow`` are then set, the queue emptied).
        """
        if self.closed:
            return SendResult.CLOSED
        if not self.must_wait():
            return SendResult.WRITTEN
        policy = self.policy
        if policy is OverflowPolicy.DROP_NEWEST:
            self.dropped += 1
            return SendResult.DROPPED
        if policy is OverflowPolicy.DROP_OLDEST:
            queue = self.queue
            if not isinstance(queue, deque):
                queue = self.queue = deque()
            queue.append((item, size))
            self.queued_bytes += size
            if len(queue) > self.max_queue:
                _, old = queue.popleft()
                self.queued_bytes -= old
                self.dropped += 1
            self._note_peak()
            return SendResult.QUEUED
        self.close(slow=True)
        return SendResult.CLOSED

    def take_queued(self) -> T | None:
        """The next queued message to commit now, or None.

        One is returned while the committed bytes are at or below the high-water
        mark; the caller commits it (:meth:`commit`) before asking again.
        """
        queue = self.queue
        if queue and self.corked + self.pending <= self.high_water:
            assert isinstance(queue, deque)
            item, size = queue.popleft()
            self.queued_bytes -= size
            if not queue:
                self.queue = ()
            return item
        return None

    def closing(self) -> None:
        """The connection started closing (``OPEN`` → ``CLOSING``; otherwise no change)."""
        if self.lifecycle is _OPEN:
            self.lifecycle = Lifecycle.CLOSING

    def close(self, *, slow: bool = False, gone: bool = False) -> list[T]:
        """Mark closed; return the queued messages dropped.

        ``CLOSED_BY_US`` by default, ``GONE`` when ``gone`` or ``slow`` (closed by
        the ``CLOSE`` policy; also sets ``closed_slow``).
        """
        self.lifecycle = Lifecycle.GONE if slow or gone else Lifecycle.CLOSED_BY_US
        if slow:
            self.closed_slow = True
        self._note_peak()
        items = [item for item, _ in self.queue]
        self.queue = ()
        self.queued_bytes = 0
        self.corked = 0
        return items

    def _note_peak(self) -> None:
        # The cork only grows between flushes, so the peak is taken when it is
        # flushed, when the pending count changes, and when stats are read.
        buffered = self.corked + self.pending + self.queued_bytes
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered

    def stats(self) -> WriterStats:
        """A :class:`WriterStats` snapshot."""
        self._note_peak()
        direct = self.direct_messages
        return WriterStats(
            messages_sent=self.messages_sent + direct,
            bytes_sent=self.bytes_sent + self.direct_bytes,
            dropped=self.dropped,
            waits=self.waits,
            peak_buffered=self.peak_buffered,
            closed_slow=self.closed_slow,
            queued=len(self.queue),
            buffered=self.buffered,
            writes=self.writes + direct,
        )


class _Flusher:
    """Flushes every dirty writer of one event loop once per loop iteration.

    ``epoch`` counts its runs: a writer that wrote a frame straight to the socket
    remembers the epoch, and corks its further frames until the epoch moves on
    (at the start of the next loop iteration), so a burst still leaves in one
    more write per member while one message per iteration costs no cork at all.
    """

    __slots__ = ("__weakref__", "dirty", "epoch", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[BackpressureWriter] = []
        self.scheduled = False
        self.epoch = 0

    def mark(self, writer: BackpressureWriter) -> None:
        self.dirty.append(writer)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        self.epoch += 1
        dirty, self.dirty = self.dirty, []
        for writer in dirty:
            try:
                writer._scheduled_flush()
            except Exception:
                # One broken connection must not keep the others' frames corked.
                log.exception(
                    "flushing %r failed",
                    writer,
                    extra=log_fields(getattr(writer._transport, "handler", None)),
                )


# One flusher per event loop (a cache of loop machinery, not application state).
_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = (
    weakref.WeakKeyDictionary()
)


def _flusher_for(loop: asyncio.AbstractEventLoop) -> _Flusher:
    flusher = _flushers.get(loop)
    if flusher is None:
        flusher = _flushers[loop] = _Flusher(loop)
    return flusher


def _writer_of(target: Any) -> BackpressureWriter | None:
    """The writer attached to ``target`` (kept in its :class:`~.connections._Slots`), or None."""
    slots = _find_slots(target)
    return None if slots is None else slots.writer


def _detach_writer(target: Any) -> None:
    """Forget the writer attached to ``target`` once its connection closed.

    Breaks the handler <-> writer reference cycle, so a closed handler is freed
    by reference counting; whoever still holds the writer keeps its stats.
    Called by :mod:`tornado_longconn.broadcast` after the handler's close.
    """
    slots = _find_slots(target)
    if slots is None:
        return
    writer: BackpressureWriter | None = slots.writer
    slots.writer = None
    if writer is not None and writer._state.lifecycle in _UNSETTLED:
        writer._sync_closed()


_UNSETTLED = (Lifecycle.OPEN, Lifecycle.CLOSING)


def _flush_before_close(target: Any) -> None:
    """Hook listener: ``close()``/``finish()`` is about to run on ``target``."""
    writer = _writer_of(target)
    if writer is not None:
        writer._flush_before_close()


def _on_protocol_close(target: Any) -> None:
    """Class-level hook listener: ``target``'s WebSocket protocol is about to close.

    Runs for every WebSocket of the process (a handler without a writer, or
    Tornado's client connection, has nothing to do): writes the cork before the
    close frame, then stops the fan-out's direct writes.
    """
    writer = _writer_of(target)
    if writer is not None:
        writer._flush_before_close()
        writer._on_protocol_close()


class _Transport:
    """How a writer reaches its connection: the interface of the two transports.

    ``stream`` is the connection's ``IOStream`` (None when the connection was
    gone before the writer was made); ``sock`` its plain TCP socket when the
    first frame of a loop iteration may go straight to it (else None);
    ``plain`` is True when ``str``/``bytes`` frames can be built without the
    connection (no compression); ``close_hook`` is the handler method that must
    flush the cork first.
    """

    __slots__ = ("close_hook", "plain", "sock", "stream")

    close_hook: Hook

    def __init__(self, stream: IOStream | None) -> None:
        self.stream = stream
        self.sock: socket.socket | None = None
        self.plain = False

    def frame(self, encoded: Encoded) -> bytes:
        """The bytes to write for ``encoded`` (compressing now, in wire order, if negotiated)."""
        raise NotImplementedError

    def is_closing(self) -> bool:
        """True when the connection is closing or closed."""
        raise NotImplementedError

    def ended_here(self) -> bool:
        """True when this side ended the connection and the stream is still open."""
        raise NotImplementedError

    def write(self, writer: BackpressureWriter, data: bytes) -> bool:
        """Hand ``data`` to the connection; False (and the writer told why) if it cannot."""
        raise NotImplementedError

    def close(self, code: int | None, reason: str | None) -> None:
        """Close the connection from this side, after what was written."""
        raise NotImplementedError

    def close_slow(self, writer: BackpressureWriter) -> None:
        """Close as a slow consumer (the ``CLOSE`` policy)."""
        raise NotImplementedError


class _WebSocketTransport(_Transport):
    """A ``WebSocketHandler``: messages become frames, written to the stream (or socket)."""

    __slots__ = ("handler", "proto")

    close_hook = Hook.CLOSE

    def __init__(self, handler: tornado.websocket.WebSocketHandler) -> None:
        proto: Any = handler.ws_connection
        super().__init__(getattr(proto, "stream", None))
        self.handler = handler
        self.proto = proto
        if self.stream is not None:
            self.plain = not websocket_proto.uses_deflate(proto)
            self.sock = iostream.plain_socket(self.stream)

    def frame(self, encoded: Encoded) -> bytes:
        return frame_for_connection(self.proto, encoded)

    def is_closing(self) -> bool:
        return bool(self.proto.is_closing())

    def ended_here(self) -> bool:
        stream = self.stream
        proto = self.proto
        return (
            stream is not None
            and not stream.closed()
            and bool(proto.server_terminated)
            and not proto.client_terminated
        )

    def write(self, writer: BackpressureWriter, data: bytes) -> bool:
        proto = self.proto
        stream = self.stream
        assert stream is not None
        if proto.server_terminated or proto.client_terminated:
            # A close frame has gone out (or come in): no data frame may follow.
            if proto.client_terminated:
                writer._mark_gone(StreamClosedError())
            else:
                writer._closed_here()
            return False
        try:
            sent = iostream.try_send(stream, data)
        except OSError as exc:
            stream.close(exc_info=exc)
            writer._mark_gone(exc)
            return False
        if sent < len(data):
            try:
                fut = stream.write(memoryview(data)[sent:] if sent else data)
            except StreamClosedError as exc:
                writer._mark_gone(exc)
                return False
            writer._track(stream, fut)
        return True

    def close(self, code: int | None, reason: str | None) -> None:
        self.handler.close(code, reason)

    def close_slow(self, writer: BackpressureWriter) -> None:
        stream = self.stream
        self.handler.close(writer._close_code, writer._close_reason)
        if stream is not None and not stream.closed():
            writer._abort_handle = writer._loop.call_later(
                writer.close_grace, iostream.abort, stream
            )


class _ResponseTransport(_Transport):
    """A streaming ``RequestHandler``: payloads written with ``write`` + ``flush``."""

    __slots__ = ("handler",)

    close_hook = Hook.FINISH

    def __init__(self, handler: tornado.web.RequestHandler, stream: IOStream) -> None:
        super().__init__(stream)
        self.handler = handler

    def frame(self, encoded: Encoded) -> bytes:
        return encoded.payload

    def is_closing(self) -> bool:
        stream = self.stream
        return stream is None or stream.closed() or web.finished(self.handler)

    def ended_here(self) -> bool:
        stream = self.stream
        return stream is not None and not stream.closed() and web.finished(self.handler)

    def write(self, writer: BackpressureWriter, data: bytes) -> bool:
        stream = self.stream
        assert stream is not None
        handler = self.handler
        if web.finished(handler):
            writer._closed_here()
            return False
        if stream.closed():
            writer._mark_gone(StreamClosedError(real_error=stream.error))
            return False
        handler.write(data)
        handler.flush()
        return True

    def close(self, code: int | None, reason: str | None) -> None:
        handler = self.handler
        if web.finished(handler):
            return
        try:
            handler.finish()
        except Exception:
            log.exception(
                "finishing the response failed; closing the connection",
                extra=log_fields(handler),
            )
            if self.stream is not None:
                self.stream.close()

    def close_slow(self, writer: BackpressureWriter) -> None:
        if self.stream is not None:
            iostream.abort(self.stream)


class BackpressureWriter:
    """Bounded, flow-controlled writes to one WebSocket or streaming HTTP response.

    ``target`` is a ``tornado.websocket.WebSocketHandler`` (messages become
    frames: ``str`` → text, ``bytes`` → binary, ``dict``/``list`` → JSON text)
    or a ``tornado.web.RequestHandler`` streaming a response (``str`` → UTF-8,
    ``bytes`` as is, ``dict``/``list`` → JSON; written with ``write`` + ``flush``).
    Create it once the connection is open (in ``open()`` for a WebSocket), or
    use :meth:`of`, which returns the writer attached to the handler.

    Arguments:

    * ``high_water`` -- bytes buffered above which ``send`` waits and
      ``send_nowait`` applies the policy (default 1 MiB);
    * ``low_water`` -- bytes to drain to before waiting senders resume
      (default ``high_water // 4``, at least 1);
    * ``policy`` -- :class:`OverflowPolicy` for ``send_nowait`` (default ``CLOSE``);
    * ``max_queue`` -- bound of the ``DROP_OLDEST`` queue in messages (default 1000);
    * ``close_code`` / ``close_reason`` -- sent when the ``CLOSE`` policy closes
      a WebSocket (default 4000, ``"slow consumer"``).

    When the ``CLOSE`` policy fires, the close frame sits behind a full buffer
    and may never reach a peer that stopped reading, so the TCP connection is
    aborted (reset) after :attr:`close_grace` seconds if it is still open.

    Raises :class:`ValueError` for bad water marks, :class:`TypeError` for an
    unsupported target, and :class:`RuntimeError` if the handler already has a
    writer (use :meth:`of`).
    """

    # One writer per connection, alive as long as it: slotted, and its waiter queues
    # and write-future list are made on first need and dropped once empty.
    # No ``__dict__``: on CPython 3.11 it costs ~150 bytes per writer even unused.
    __slots__ = (
        "__weakref__",
        "_abort_handle",
        "_close_code",
        "_close_grace",
        "_close_reason",
        "_cork",
        "_dirty",
        "_drain_waiters",
        "_epoch",
        "_fast_sock",
        "_flusher",
        "_gone",
        "_is_closing",
        "_loop",
        "_plain",
        "_sock",
        "_state",
        "_stream",
        "_target",
        "_transport",
        "_waiters",
        "_watching",
        "_write_futures",
    )

    _close_grace: float | None

    #: The class's :attr:`close_grace` (set it on a subclass, or here for every writer).
    default_close_grace: float = 1.0

    @property
    def close_grace(self) -> float:
        """Seconds the ``CLOSE`` policy waits for a clean close before resetting the TCP connection.

        Default :attr:`default_close_grace` (1.0); set it on one writer, or as a
        class attribute of a subclass.
        """
        grace = self._close_grace
        return self.default_close_grace if grace is None else grace

    @close_grace.setter
    def close_grace(self, seconds: float) -> None:
        self._close_grace = seconds

    def __init__(
        self,
        target: tornado.websocket.WebSocketHandler | tornado.web.RequestHandler,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        policy: OverflowPolicy = OverflowPolicy.CLOSE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        close_code: int = CloseCode.SLOW_CONSUMER,
        close_reason: str = "slow consumer",
    ) -> None:
        self._state: FlowState[Encoded] = FlowState(
            high_water=high_water, low_water=low_water, policy=policy, max_queue=max_queue
        )
        if not isinstance(target, tornado.web.RequestHandler):
            raise TypeError(
                f"target must be a WebSocketHandler or RequestHandler, not {type(target).__name__}"
            )
        if _writer_of(target) is not None:
            raise RuntimeError(
                "this handler already has a BackpressureWriter; use BackpressureWriter.of(handler)"
            )
        self._target = target
        self._close_code = close_code
        self._close_reason = close_reason
        self._close_grace = None
        self._loop = asyncio.get_running_loop()
        self._flusher = _flusher_for(self._loop)
        self._cork: list[bytes] = []
        self._dirty = False
        # The flusher epoch in which a frame last went straight to the socket.
        self._epoch = -1
        # The transport's socket while the broadcast fan-out may write straight to
        # it without asking the writer: plain frames, OPEN, nothing queued. A cache
        # of those three facts, kept by the methods that change them.
        self._fast_sock: socket.socket | None = None
        # Senders waiting for their turn / for the drain, and the stream's write
        # futures with the index each resolves at: None until first needed.
        self._waiters: deque[asyncio.Future[None]] | None = None
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._watching: asyncio.Future[None] | None = None
        self._write_futures: deque[tuple[int, asyncio.Future[None]]] | None = None
        self._gone: BaseException | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        transport: _Transport
        if isinstance(target, tornado.websocket.WebSocketHandler):
            transport = _WebSocketTransport(target)
        else:
            stream = getattr(target.request.connection, "stream", None)
            if stream is None:
                raise TypeError("a RequestHandler target needs an HTTP/1 connection with a stream")
            transport = _ResponseTransport(target, stream)
        self._transport = transport
        self._stream = transport.stream
        # A WebSocket without permessage-deflate: str/bytes frames are built directly.
        self._plain = transport.plain
        # The plain TCP socket (None for TLS and HTTP responses): the first frame
        # of a loop iteration goes straight to it when nothing is pending.
        self._sock = transport.sock
        #: True when the connection is closing or closed (one call on the hot path).
        self._is_closing: Callable[[], bool] = transport.is_closing
        if transport.stream is None:
            self._mark_gone(StreamClosedError())
            _slots_of(target).writer = self
            return
        if isinstance(transport, _WebSocketTransport):
            self._is_closing = transport.proto.is_closing
        if self._is_closing():
            self._sync_closed()
        _slots_of(target).writer = self
        if isinstance(transport, _WebSocketTransport):
            # Class-level listeners (patched once on Tornado's classes) that find the
            # writer on the handler: nothing per connection. ``handler.close()``
            # calls ``ws_connection.close()``, and Tornado calls that right after
            # every change that ends the data phase, so one hook both flushes the
            # cork before the close frame and stops the fan-out's direct writes.
            add_websocket_listener(Hook.PROTOCOL_CLOSE, _on_protocol_close)
            if self._plain and self._sock is not None and self._state.lifecycle is _OPEN:
                self._fast_sock = self._sock
        else:
            # A streaming response: ``finish()`` patched on this handler (rare).
            HandlerHooks.of(target).add_handler_listener(transport.close_hook, _flush_before_close)

    def _flush_before_close(self) -> None:
        """``handler.close()``/``finish()`` is about to run: write the cork first, to keep order."""
        if self._cork and self._state.lifecycle is _OPEN:
            self._flush()

    def _on_protocol_close(self) -> None:
        """The WebSocket protocol started closing: no more direct writes."""
        self._fast_sock = None
        self._state.closing()

    @classmethod
    def of(
        cls,
        target: tornado.websocket.WebSocketHandler | tornado.web.RequestHandler,
        **kwargs: Any,
    ) -> BackpressureWriter:
        """The writer attached to ``target``, created with ``kwargs`` on first use.

        One connection has one writer, so that everything written to it keeps
        one order and one buffer count. ``kwargs`` (the constructor's keyword
        arguments) only apply when the writer is created here.
        """
        writer = _writer_of(target)
        if writer is None:
            writer = cls(target, **kwargs)
        return writer

    # -- public API ----------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes held for this connection: corked frames, the stream's buffer, the queue."""
        self._refresh()
        return self._state.buffered

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by the peer, by :meth:`close`, or by policy)."""
        state = self._state
        if state.lifecycle is not _OPEN or self._is_closing():
            self._sync_closed()
        return state.lifecycle is not _OPEN

    @property
    def lifecycle(self) -> Lifecycle:
        """Where the connection is in its life (:class:`Lifecycle`), settled now.

        ``OPEN``, ``CLOSED_BY_US`` or ``GONE`` (``CLOSING`` is settled on reading).
        """
        if self.closed:
            self._sync_closed()
        return self._state.lifecycle

    @property
    def high_water(self) -> int:
        """The high-water mark in bytes."""
        return self._state.high_water

    @property
    def low_water(self) -> int:
        """The low-water mark in bytes."""
        return self._state.low_water

    @property
    def policy(self) -> OverflowPolicy:
        """The overflow policy applied by :meth:`send_nowait`."""
        return self._state.policy

    def stats(self) -> WriterStats:
        """Counters: messages and bytes sent, dropped, waits, peak and current buffer."""
        self._refresh()
        return self._state.stats()

    async def send(self, message: Message) -> None:
        """Send ``message``, waiting first while the buffer is above the high-water mark.

        Returns at once while ``buffered <= high_water``; otherwise waits (on
        the stream's write futures) until the buffer drains to the low-water
        mark, then commits the message. Concurrent senders are served in order.

        Raises :class:`TypeError` for an unsupported message type,
        :class:`~tornado_longconn.exceptions.PeerGoneError` if the peer is gone
        (the stream error is its ``__cause__``),
        :class:`~tornado_longconn.exceptions.SlowConsumerError` if the ``CLOSE``
        policy closed the connection, and
        :class:`~tornado_longconn.exceptions.ConnectionClosedError` after
        :meth:`close`. A message is not guaranteed to arrive once this returns:
        the peer may vanish while it is buffered.
        """
        state = self._state
        frame: bytes | None = None
        encoded: Encoded | None = None
        if self._plain and isinstance(message, str):
            frame = build_frame(OP_TEXT, message.encode("utf-8"))
        elif self._plain and isinstance(message, bytes):
            frame = build_frame(OP_BINARY, message)
        else:
            encoded = encode_message(message)
        if state.lifecycle is not _OPEN or self._is_closing():
            self._raise_closed()
        if self._waiters or state.must_wait():
            await self._wait_turn()
        if frame is None:
            assert encoded is not None
            frame = self._transport.frame(encoded)
        self._cork_frame(frame)
        if self._waiters and not state.must_wait():
            self._wake_next()

    def send_nowait(self, message: Message) -> SendResult:
        """Send ``message`` without waiting; apply the overflow policy above high water.

        Returns :class:`SendResult`: ``WRITTEN`` (accepted in order), ``QUEUED``
        (``DROP_OLDEST``), ``DROPPED`` (``DROP_NEWEST``) or ``CLOSED`` (the
        connection is closed, or the ``CLOSE`` policy closed it now). Never
        raises for a closed connection or a gone peer; raises :class:`TypeError`
        for an unsupported message type. On a plain WebSocket, the first frame
        of an event-loop iteration goes straight to the socket when nothing is
        corked or pending (a reset peer then gives ``CLOSED`` at once); the
        frames after it in that iteration are written together at its end.
        """
        return self._offer(encode_message(message))

    def _offer(self, encoded: Encoded) -> SendResult:
        """:meth:`send_nowait` for an encoded message (the broadcast fan-out calls this)."""
        state = self._state
        if state.lifecycle is not _OPEN or self._is_closing():
            self._sync_closed()
            return SendResult.CLOSED
        if not state.must_wait():
            frame = encoded.frame if self._plain else self._transport.frame(encoded)
            if (
                not self._cork
                and self._sock is not None
                and self._epoch != self._flusher.epoch
                and not self._stream.writing()  # type: ignore[union-attr]
            ):
                # The first frame of this iteration, nothing pending: straight to the socket.
                return self._send_direct(frame)
            self._cork_frame(frame)
            return SendResult.WRITTEN
        self._refresh()
        result = state.offer(encoded, len(encoded.payload) + 2)
        if result is SendResult.WRITTEN:
            self._cork_frame(self._transport.frame(encoded))
        elif result is SendResult.QUEUED:
            self._fast_sock = None  # queued messages go first: no direct writes until drained
            self._watch()
        elif result is SendResult.CLOSED:
            self._close_slow()
        return result

    def _send_direct(self, frame: bytes) -> SendResult:
        """Write ``frame`` to the socket now; the part the kernel refuses goes to the stream.

        Only with nothing corked and nothing pending in the stream (so order is
        kept). Later frames of the same loop iteration are corked.
        """
        assert self._sock is not None
        try:
            sent = iostream.socket_send(self._sock, frame)
        except OSError as exc:
            self._stream.close(exc_info=exc)  # type: ignore[union-attr]
            self._mark_gone(exc)
            return SendResult.CLOSED
        return self._sent_direct(frame, sent)

    def _sent_direct(self, frame: bytes, sent: int) -> SendResult:
        """``sent`` bytes of ``frame`` went straight to the socket: queue the rest, count it."""
        stream: IOStream = self._stream  # type: ignore[assignment]
        flusher = self._flusher
        self._epoch = flusher.epoch
        if not flusher.scheduled:
            flusher.scheduled = True
            flusher.loop.call_soon(flusher.run)
        size = len(frame)
        pending = 0
        if sent < size:
            try:
                fut = stream.write(memoryview(frame)[sent:] if sent else frame)
            except StreamClosedError as exc:
                self._mark_gone(exc)
                return SendResult.CLOSED
            self._track(stream, fut)
            pending = iostream.pending_bytes(stream)
        self._state.sent(size, pending)
        return SendResult.WRITTEN

    async def drained(self) -> None:
        """Wait until nothing is queued and ``buffered <= low_water``.

        Raises like :meth:`send` if the connection is closed or the peer is gone
        before that.
        """
        state = self._state
        if state.lifecycle is not _OPEN or self._is_closing():
            self._raise_closed()
        self._refresh()
        if state.is_drained():
            return
        state.waits += 1
        self._flush()
        fut: asyncio.Future[None] = self._loop.create_future()
        drain_waiters = self._drain_waiters
        if drain_waiters is None:
            drain_waiters = self._drain_waiters = []
        drain_waiters.append(fut)
        self._progress()
        try:
            await fut
        finally:
            drain_waiters = self._drain_waiters
            if drain_waiters is not None and fut in drain_waiters:
                drain_waiters.remove(fut)
                if not drain_waiters:
                    self._drain_waiters = None
        if state.lifecycle is not _OPEN:
            self._raise_closed()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close the connection from this side, after writing what was committed.

        For a WebSocket, sends a close frame with ``code`` and ``reason`` (as
        ``WebSocketHandler.close``); for an HTTP response, finishes it. Queued
        (``DROP_OLDEST``) messages are discarded. Waiting senders get
        :class:`~tornado_longconn.exceptions.ConnectionClosedError`. Closing
        twice does nothing.
        """
        if self._state.lifecycle is not _OPEN:
            return
        self._flush()
        self._fast_sock = None
        self._state.close()
        self._release_waiters()
        self._transport.close(code, reason)

    # -- internals -----------------------------------------------------------

    def _refresh(self) -> None:
        stream = self._stream
        if stream is not None and self._state.lifecycle is _OPEN:
            self._state.set_pending(iostream.pending_bytes(stream))

    def _sync_closed(self) -> None:
        """The connection is closing or closed under the writer: record who closed it."""
        if self._state.lifecycle not in _UNSETTLED:
            return
        if self._transport.ended_here():
            self._closed_here()  # the handler sent a close frame, or finished the response
        else:
            stream = self._stream
            self._mark_gone(StreamClosedError(real_error=None if stream is None else stream.error))

    def _raise_closed(self) -> None:
        state = self._state
        self._sync_closed()
        if state.closed_slow:
            raise SlowConsumerError(
                f"closed as a slow consumer (more than {state.high_water} bytes buffered)"
            ) from self._gone
        if state.lifecycle is Lifecycle.CLOSED_BY_US:
            raise ConnectionClosedError("the writer was closed by this side")
        raise PeerGoneError("the peer is gone") from self._gone

    def _cork_frame(self, frame: bytes) -> None:
        """Commit ``frame`` into the cork; flush now or at the end of the iteration."""
        self._cork.append(frame)
        if self._state.commit(len(frame)):
            self._flush()
        elif not self._dirty:
            self._dirty = True
            self._flusher.mark(self)

    def _track(self, stream: IOStream, fut: asyncio.Future[None]) -> None:
        """Remember a write future with the write index it resolves at (for :meth:`_watch`)."""
        futures = self._write_futures
        if futures is None:
            futures = self._write_futures = deque()
        else:
            while futures and futures[0][1].done():
                futures.popleft()
        futures.append((iostream.write_indexes(stream)[0], fut))

    def _scheduled_flush(self) -> None:
        self._dirty = False
        if self._cork:
            self._flush()

    def _flush(self) -> None:
        cork = self._cork
        if not cork:
            return
        self._cork = []
        state = self._state
        stream = self._stream
        if state.lifecycle is not _OPEN or stream is None:
            state.corked = 0
            return
        data = cork[0] if len(cork) == 1 else b"".join(cork)
        if self._transport.write(self, data):
            state.flushed(iostream.pending_bytes(stream))

    async def _wait_turn(self) -> None:
        """Wait (in FIFO order with other senders) until a message may be committed."""
        state = self._state
        self._refresh()
        if not self._waiters and not state.must_wait():
            return
        state.waits += 1
        first = True
        while True:
            fut: asyncio.Future[None] = self._loop.create_future()
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = deque()
            if first:
                waiters.append(fut)
                first = False
            else:
                waiters.appendleft(fut)  # keep this sender's place
            self._flush()
            self._progress()
            try:
                await fut
            except BaseException:
                waiters = self._waiters
                try:
                    if waiters is None:
                        raise ValueError
                    waiters.remove(fut)
                except ValueError:
                    # Woken but cancelled before running: hand the turn on.
                    if not state.must_wait():
                        self._wake_next()
                else:
                    if not waiters:
                        self._waiters = None
                raise
            if state.lifecycle is not _OPEN:
                self._raise_closed()
            self._refresh()
            if not state.must_wait():
                return
            # Woken, but others (send_nowait) filled the buffer again: wait again.

    def _wake_next(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                if not waiters:
                    self._waiters = None
                fut.set_result(None)
                return
        self._waiters = None

    def _pump(self) -> bool:
        """Commit queued messages while under high water; False if the writer closed."""
        state = self._state
        if not state.queue:
            return True
        while True:
            item = state.take_queued()
            if item is None:
                break
            self._cork_frame(self._transport.frame(item))
            if state.lifecycle is not _OPEN:
                return False
        self._flush()
        if state.lifecycle is not _OPEN:
            return False
        if not state.queue and self._plain and not self._is_closing():
            self._fast_sock = self._sock  # drained: the fan-out may write directly again
        return True

    def _progress(self) -> None:
        """Re-check the buffer: pump the queue, wake waiters, or keep watching."""
        state = self._state
        if state.lifecycle is not _OPEN:
            self._release_waiters()
            return
        self._refresh()
        if not self._pump():
            self._release_waiters()
            return
        if state.is_drained():
            drain_waiters, self._drain_waiters = self._drain_waiters, None
            if drain_waiters:
                for fut in drain_waiters:
                    if not fut.done():
                        fut.set_result(None)
            if self._waiters:
                self._wake_next()
        if self._waiters or self._drain_waiters or state.queue:
            self._watch()

    def _watch(self) -> None:
        """Arrange for :meth:`_progress` to run when the stream drains to low water."""
        watching = self._watching
        if watching is not None and not watching.done():
            return
        stream = self._stream
        if stream is None or self._state.lifecycle is not _OPEN:
            return
        self._flush()
        total, done = iostream.write_indexes(stream)
        target = total - self._state.low_water
        fut: asyncio.Future[None] | None = None
        if done < target:
            for end, candidate in self._write_futures or ():
                if end >= target and not candidate.done():
                    fut = candidate
                    break
            if fut is None:
                try:
                    fut = stream.write(b"")
                except StreamClosedError as exc:
                    self._mark_gone(exc)
                    return
        if fut is None:
            # Already at or below low water (or only the queue is over): check
            # again on the next iteration, after the stream's own writes.
            self._loop.call_soon(self._progress)
            return
        self._watching = fut
        fut.add_done_callback(self._on_write_done)

    def _on_write_done(self, fut: asyncio.Future[None]) -> None:
        if self._watching is fut:
            self._watching = None
        futures = self._write_futures
        if futures is not None:
            while futures and futures[0][1].done():
                futures.popleft()
            if not futures:
                self._write_futures = None  # drained: an idle writer holds no futures
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self._mark_gone(exc)
            return
        self._progress()

    def _closed_here(self) -> None:
        """The handler was closed or finished directly (not through :meth:`close`)."""
        self._fast_sock = None
        if self._state.lifecycle in _UNSETTLED:
            self._state.close()
        self._cork = []
        self._release_waiters()

    def _mark_gone(self, cause: BaseException) -> None:
        """The peer is gone (or the stream closed under us): release everything."""
        state = self._state
        if self._gone is None:
            self._gone = cause
        self._fast_sock = None
        if state.lifecycle in _UNSETTLED:
            state.close(gone=True)
        self._cork = []
        self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, None
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        drain_waiters, self._drain_waiters = self._drain_waiters, None
        if drain_waiters:
            for fut in drain_waiters:
                if not fut.done():
                    fut.set_result(None)
        self._write_futures = None

    def _close_slow(self) -> None:
        """The ``CLOSE`` policy fired (``FlowState.offer`` already marked it ``GONE``)."""
        self._fast_sock = None
        self._cork = []
        self._release_waiters()
        if self._gone is None:
            self._gone = StreamClosedError()
        log.info(
            "closing a slow consumer (above the high-water mark of %d bytes)",
            self.high_water,
            extra=log_fields(getattr(self._transport, "handler", None)),
        )
        if self._stream is not None:
            self._transport.close_slow(self)


_WRITTEN = SendResult.WRITTEN


def _offer_all(
    writers: tuple[BackpressureWriter, ...], encoded: Encoded, results: list[SendResult]
) -> None:
    """``send_nowait(encoded)`` to ``writers[len(results):]``, appending each result.

    The broadcast fan-out's hot loop, which lives in the door with its raw socket
    writes (:func:`tornado_longconn._tornado.fanout.offer_all`): it joins this
    iteration's cork or writes straight to an idle socket, and hands every other
    case to :meth:`BackpressureWriter._offer`. Its inlined copies of the flow
    rule are held to :meth:`send_nowait` by ``tests/test_backpressure_fanout.py``.
    """
    # The cork rule of FlowState.commit: a large frame never stays corked (limit 0).
    cork_limit = _CORK_LIMIT if len(encoded.frame) < _LARGE_FRAME else 0
    fanout.offer_all(writers, encoded, results, cork_limit, _WRITTEN)
