"""Message history and cursors (I/O-free).

Every message published to a topic that keeps history gets a :class:`Cursor`:
an *epoch* and an *offset*. Offsets count up from 1 within an epoch; a topic
with no messages yet sits at offset 0. The epoch changes whenever history may
have been lost (a restarted in-memory process, a flushed Redis), so a cursor
from another epoch is answered with an explicit gap, never a silent skip.

To clients a cursor is an opaque string, ``"<epoch>-<offset>"``.
:func:`parse_cursor` turns a client's string back into a :class:`Cursor` and
raises :class:`~tornado_longconn.exceptions.CursorError` for anything else.

:class:`TopicLog` is the bounded history of one topic, used by the in-memory
backend and by tests as the reference model; :meth:`TopicLog.since` answers
"what came after this cursor?" with a :class:`SinceResult`.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .exceptions import CursorError

__all__ = [
    "DEFAULT_HISTORY",
    "Cursor",
    "HistoryLimit",
    "Message",
    "SinceResult",
    "TopicLog",
    "gap_reason",
    "new_epoch",
    "parse_cursor",
]

#: Messages kept per topic when a group asks for history without a number.
DEFAULT_HISTORY = 1000

_EPOCH_RE = re.compile(r"[0-9A-Za-z]{1,32}")
_CURSOR_RE = re.compile(r"([0-9A-Za-z]{1,32})-(0|[1-9][0-9]{0,18})")


def new_epoch() -> str:
    """A fresh random epoch: 12 lowercase hex characters."""
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True, order=False)
class Cursor:
    """A position in one topic's history: ``epoch`` and ``offset``.

    ``str(cursor)`` is the wire form ``"<epoch>-<offset>"``.
    """

    epoch: str
    offset: int

    def __post_init__(self) -> None:
        if not _EPOCH_RE.fullmatch(self.epoch):
            raise CursorError(f"invalid cursor epoch {self.epoch!r}: 1-32 letters or digits")
        if self.offset < 0:
            raise CursorError(f"invalid cursor offset {self.offset}: must be >= 0")

    def __str__(self) -> str:
        return f"{self.epoch}-{self.offset}"

    def next(self) -> Cursor:
        """The cursor of the message after this one, in the same epoch."""
        return Cursor(self.epoch, self.offset + 1)

    # Cursors of different epochs are not ordered: every comparison below is
    # False across epochs except :meth:`skips`, which treats another epoch as a gap.

    def at_or_before(self, other: Cursor) -> bool:
        """True when this cursor is ``other`` or older, in the same epoch.

        A message with this cursor was already delivered to a client at ``other``.

        >>> Cursor("e", 3).at_or_before(Cursor("e", 3)), Cursor("e", 3).at_or_before(Cursor("x", 9))
        (True, False)
        """
        return self.epoch == other.epoch and self.offset <= other.offset

    def is_after(self, other: Cursor) -> bool:
        """True when this cursor is newer than ``other``, in the same epoch."""
        return self.epoch == other.epoch and self.offset > other.offset

    def follows(self, other: Cursor) -> bool:
        """True when this is the cursor of the message right after ``other`` (no gap between)."""
        return self.epoch == other.epoch and self.offset == other.offset + 1

    def skips(self, other: Cursor) -> bool:
        """True when messages are missing between ``other`` and this cursor.

        That is: another epoch, or an offset beyond ``other.offset + 1``. A client
        at ``other`` given this message next would miss something.

        >>> Cursor("e", 5).skips(Cursor("e", 3)), Cursor("e", 4).skips(Cursor("e", 3))
        (True, False)
        >>> Cursor("f", 1).skips(Cursor("e", 3))
        True
        """
        return self.epoch != other.epoch or self.offset > other.offset + 1


def gap_reason(cursor: Cursor, *, epoch: str, first_offset: int, head_offset: int) -> str | None:
    """Whether history reaches back to ``cursor``: None if it does, else the gap's reason.

    ``epoch`` is the history's epoch, ``first_offset`` the offset of its oldest
    kept message (``head_offset + 1`` when it keeps none) and ``head_offset`` the
    offset of its newest message ever. The reasons are ``"epoch"`` (another
    epoch), ``"future"`` (ahead of the head) and ``"evicted"`` (messages after
    ``cursor`` are no longer kept).

    >>> gap_reason(Cursor("e", 4), epoch="e", first_offset=5, head_offset=9) is None
    True
    >>> gap_reason(Cursor("e", 3), epoch="e", first_offset=5, head_offset=9)
    'evicted'
    >>> gap_reason(Cursor("e", 9), epoch="e", first_offset=10, head_offset=9) is None
    True
    """
    if cursor.epoch != epoch:
        return "epoch"
    if cursor.offset > head_offset:
        return "future"
    if cursor.offset < head_offset and cursor.offset + 1 < first_offset:
        return "evicted"
    return None


def parse_cursor(value: str | Cursor) -> Cursor:
    """Parse a client's cursor string; raise ``CursorError`` when it is malformed."""
    if isinstance(value, Cursor):
        return value
    if not isinstance(value, str):
        raise CursorError(f"a cursor is a string, not {type(value).__name__}")
    match = _CURSOR_RE.fullmatch(value)
    if match is None:
        raise CursorError(f"malformed cursor {value[:80]!r}: expected '<epoch>-<offset>'")
    return Cursor(match.group(1), int(match.group(2)))


@dataclass(frozen=True, slots=True)
class HistoryLimit:
    """How much history a topic keeps.

    ``max_messages`` (default :data:`DEFAULT_HISTORY`) always applies;
    ``max_bytes`` additionally bounds the summed payload size; ``max_age`` (seconds)
    drops messages older than that. When a limit is hit the OLDEST messages are
    evicted; a cursor older than the oldest kept message then gets a gap answer.
    """

    max_messages: int = DEFAULT_HISTORY
    max_bytes: int | None = None
    max_age: float | None = None

    def __post_init__(self) -> None:
        if self.max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {self.max_messages}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {self.max_bytes}")
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError(f"max_age must be > 0 or None, got {self.max_age}")


@dataclass(frozen=True, slots=True)
class Message:
    """One published message as a backend delivers it.

    ``data`` is ``str`` for a text message and ``bytes`` for a binary one (dicts
    and lists were JSON-encoded to ``str`` before publishing). ``cursor`` is
    ``None`` when the topic keeps no history. ``tag`` is an opaque string set by
    the publisher and carried to every process (the group uses it for ``exclude``).
    ``time`` is the publisher's wall-clock time (seconds since the epoch).
    """

    topic: str
    data: str | bytes
    cursor: Cursor | None = None
    tag: str | None = None
    time: float = 0.0


@dataclass(frozen=True, slots=True)
class SinceResult:
    """The answer to "what came after this cursor?".

    ``gap`` False: ``messages`` are every kept message after the cursor, in order,
    and ``cursor`` is where to continue from (the last message's cursor, or the
    asked cursor when there is nothing new).

    ``gap`` True: history no longer reaches back to the cursor (evicted, another
    epoch, or a cursor from the future). ``messages`` is empty and ``cursor`` is
    the topic's current head: the client must resync (reload its state) and then
    continue from ``cursor``.
    """

    messages: Sequence[Message]
    cursor: Cursor
    gap: bool = False
    reason: str | None = field(default=None)


def _size(data: str | bytes) -> int:
    return len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))


class TopicLog:
    """The bounded, ordered history of one topic (I/O-free; takes ``now``).

    >>> log = TopicLog("room", HistoryLimit(max_messages=2), epoch="e1")
    >>> [str(log.append("a", now=0.0).cursor), str(log.append("b", now=0.0).cursor)]
    ['e1-1', 'e1-2']
    >>> log.append("c", now=0.0).cursor.offset
    3
    >>> log.since(parse_cursor("e1-0"), now=0.0).gap   # message 1 was evicted
    True
    >>> [m.data for m in log.since(parse_cursor("e1-1"), now=0.0).messages]
    ['b', 'c']
    """

    def __init__(self, topic: str, limit: HistoryLimit | None = None, *, epoch: str | None = None):
        self.topic = topic
        self.limit = limit or HistoryLimit()
        self.epoch = epoch or new_epoch()
        self._messages: deque[Message] = deque()
        self._bytes = 0
        self._last = 0  # offset of the newest message ever appended in this epoch
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def head(self) -> Cursor:
        """The cursor of the newest message (offset 0 before the first one)."""
        return Cursor(self.epoch, self._last)

    @property
    def first_offset(self) -> int:
        """Offset of the oldest kept message (``head.offset + 1`` when empty)."""
        return self._messages[0].cursor.offset if self._messages else self._last + 1  # type: ignore[union-attr]

    @property
    def nbytes(self) -> int:
        """Summed payload size of the kept messages."""
        return self._bytes

    def append(
        self,
        data: str | bytes,
        *,
        now: float,
        tag: str | None = None,
        limit: HistoryLimit | None = None,
    ) -> Message:
        """Record a message, give it the next cursor, evict what the limit says; return it."""
        if limit is not None:
            self.limit = limit
        self._last += 1
        message = Message(self.topic, data, Cursor(self.epoch, self._last), tag, now)
        self._messages.append(message)
        self._bytes += _size(data)
        self._evict(now)
        return message

    def _evict(self, now: float) -> None:
        limit = self.limit
        msgs = self._messages
        while len(msgs) > limit.max_messages or (
            limit.max_bytes is not None and self._bytes > limit.max_bytes and len(msgs) > 1
        ):
            self._bytes -= _size(msgs.popleft().data)
            self.evicted += 1
        if limit.max_age is not None:
            horizon = now - limit.max_age
            while msgs and msgs[0].time < horizon:
                self._bytes -= _size(msgs.popleft().data)
                self.evicted += 1

    def since(self, cursor: Cursor | None, *, now: float, limit: int | None = None) -> SinceResult:
        """Messages after ``cursor`` (at most ``limit``), or a gap answer.

        ``cursor`` None means "from now on": nothing, positioned at the head.
        """
        self._evict(now)
        head = self.head
        if cursor is None:
            return SinceResult((), head)
        first = self.first_offset
        reason = gap_reason(cursor, epoch=self.epoch, first_offset=first, head_offset=self._last)
        if reason is not None:
            return SinceResult((), head, gap=True, reason=reason)
        if cursor.offset == self._last:
            return SinceResult((), cursor)
        start = cursor.offset + 1 - first
        stop = len(self._messages) if limit is None else min(len(self._messages), start + limit)
        msgs = list(itertools.islice(self._messages, start, stop))
        last = msgs[-1].cursor if msgs else None
        return SinceResult(msgs, last or cursor)
