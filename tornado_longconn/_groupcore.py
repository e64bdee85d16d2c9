"""The I/O-free core of a broadcast group: membership and the history-to-live hand-over.

:class:`GroupCore` knows who the members of one group are and, for a member
that joined with a cursor, how it gets from history to the live stream with no
gap and no duplicate at the seam. It never touches a socket, a backend or an
event loop: it takes plain values (:class:`~tornado_longconn.log.Message`,
:class:`~tornado_longconn.log.SinceResult`) and returns what to deliver.
:class:`~tornado_longconn.broadcast.BroadcastGroup` is the shell that reads
history from its backend, writes to the members' writers and awaits.

A member's life (:class:`MemberState`)::

    join without cursor ------------------------------------> LIVE
    join with cursor --> REPLAYING --(history page, seam ok)--> LIVE
                          |    ^
       buffer overflow or |    | history read again from the member's position
       backend gap        v    |
                          REREAD
    leave (any state) --> LEFT

While a member replays history, every live message is buffered for it
(:meth:`GroupCore.offer`). When its history read comes back short of a full
page, :meth:`GroupCore.go_live` drops the buffered messages the member already
has from history (same epoch, offset at or before its position) and, when the
first remaining one follows its position directly, returns the rest and makes
the member live in the same synchronous step. Otherwise (a message missing
between history and the buffer, or the buffer overflowed) it asks for history
again from the member's position. A position that history no longer reaches
becomes an explicit :class:`Resync` answer per the group's :class:`GapPolicy`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from .log import Cursor, Message, SinceResult

__all__ = [
    "GapPolicy",
    "GroupCore",
    "MemberSlot",
    "MemberState",
    "Replay",
    "Resync",
]

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")
M = TypeVar("M", bound="MemberSlot[Any]")


class GapPolicy(Enum):
    """What a member is told when it cannot be given every message.

    This happens when ``join(handler, cursor=...)`` asks for history that is no
    longer kept (evicted, another epoch after a restart, a cursor from the
    future), and when the backend reports that live messages may have been
    missed (``Subscriber.on_gap``, e.g. the connection to Redis dropped).
    """

    #: Close the connection with :attr:`CloseCode.RESYNC_REQUIRED` (4001) and the
    #: reason ``"resync required: <reason>"``. The client reloads its state and
    #: reconnects with the cursor that came with that state. The default: a client
    #: cannot miss it, and any WebSocket client understands a close code.
    CLOSE = "close"
    #: Send the JSON text message built by :func:`resync_notice`,
    #: ``{"type": "resync", "topic": ..., "cursor": "<head>", "reason": ...}``, and
    #: keep the member: it receives the messages after ``cursor`` from then on.
    #: Pick this when the client handles the notice (``longconn.js`` does).
    NOTICE = "notice"


class MemberState(Enum):
    """Where a member is in the hand-over from history to the live stream."""

    #: Reading history after its cursor; live messages are buffered for it.
    REPLAYING = "replaying"
    #: Its buffer overflowed, or the backend reported a gap, while it replayed:
    #: nothing is buffered until history is read again from its position.
    REREAD = "reread"
    #: Receiving live messages.
    LIVE = "live"
    #: Not a member (left, removed, or never joined).
    LEFT = "left"


_REPLAYING = MemberState.REPLAYING
_REREAD = MemberState.REREAD
_LIVE = MemberState.LIVE
_LEFT = MemberState.LEFT


class MemberSlot(Generic[P]):
    """One member's hand-over state, kept by a :class:`GroupCore`.

    ``state`` is a :class:`MemberState`; ``position`` the cursor of the last
    message the member was given from history (or told to continue from), None
    for a member that joined live. The shell's membership class derives from it,
    so a member costs one object.
    """

    __slots__ = ("_buffer", "position", "state")

    def __init__(self) -> None:
        self.state = _LEFT
        self.position: Cursor | None = None
        self._buffer: deque[tuple[Message, P]] | None = None

    @property
    def buffered(self) -> int:
        """Live messages buffered while the member replays history."""
        return len(self._buffer) if self._buffer is not None else 0


@dataclass(frozen=True, slots=True)
class Resync(Generic[M]):
    """A gap answer: ``members`` cannot be given every message.

    ``policy`` is the group's :class:`GapPolicy`: with ``NOTICE`` each member is
    sent a resync notice naming ``head`` (None when the backend reported the gap)
    and stays; with ``CLOSE`` the caller closes each member with
    :attr:`~tornado_longconn.codes.CloseCode.RESYNC_REQUIRED` and calls
    :meth:`GroupCore.leave`. ``reason`` is ``"evicted"``, ``"epoch"``,
    ``"future"`` or the backend's reason.
    """

    policy: GapPolicy
    head: Cursor | None
    reason: str
    members: tuple[M, ...]

    @property
    def keeps_members(self) -> bool:
        """True when the members stay (``NOTICE``)."""
        return self.policy is GapPolicy.NOTICE


@dataclass(frozen=True, slots=True)
class Replay(Generic[M]):
    """What to do with one page of history (:meth:`GroupCore.history`).

    Deliver ``resync`` first when set (a gap answer), then ``messages`` in
    order. Then, when ``more`` is True, read history again from the member's
    ``position``; else call :meth:`GroupCore.go_live`.
    """

    messages: Sequence[Message]
    resync: Resync[M] | None = None
    more: bool = False


class GroupCore(Generic[K, M, P]):
    """Membership of one group and its history-to-live hand-over (I/O-free).

    Generic over the member key ``K`` (a connection), the member type ``M`` (a
    :class:`MemberSlot` or subclass) and the payload ``P`` buffered with each
    live message for a replaying member. ``gap_policy`` decides the :class:`Resync` answers; ``buffer_limit`` bounds the
    live messages buffered for one replaying member (beyond it the buffer is
    dropped and history read again: state ``REREAD``).

    >>> from tornado_longconn.log import HistoryLimit, TopicLog
    >>> log = TopicLog("t", HistoryLimit(10), epoch="e")
    >>> for text in "abc":
    ...     _ = log.append(text, now=0.0)
    >>> core: GroupCore[str, MemberSlot[None], None] = GroupCore(GapPolicy.CLOSE, buffer_limit=10)
    >>> slot = MemberSlot[None]()
    >>> core.add("alice", slot, cursor=Cursor("e", 1))
    >>> page = log.since(slot.position, now=0.0)        # the shell awaits its backend here
    >>> core.offer(log.append("d", now=0.0), None)      # live while replaying: buffered
    >>> [m.data for m in core.history("alice", page, page_size=100).messages]
    ['b', 'c']
    >>> [m.data for m, _ in core.go_live("alice")]      # the seam: d follows c
    ['d']
    >>> slot.state
    <MemberState.LIVE: 'live'>
    """

    __slots__ = ("_live", "_members", "_resuming", "buffer_limit", "gap_policy")

    def __init__(self, gap_policy: GapPolicy, *, buffer_limit: int) -> None:
        if buffer_limit < 1:
            raise ValueError(f"buffer_limit must be >= 1, got {buffer_limit}")
        self.gap_policy = gap_policy
        self.buffer_limit = buffer_limit
        self._members: dict[K, M] = {}
        self._resuming: dict[K, M] = {}
        self._live: tuple[M, ...] | None = ()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._members))

    def get(self, key: K) -> M | None:
        """``key``'s member, or None."""
        return self._members.get(key)

    def members(self) -> list[M]:
        """Every member, in join order (a copy)."""
        return list(self._members.values())

    def items(self) -> list[tuple[K, M]]:
        """``(key, member)`` pairs, in join order (a copy)."""
        return list(self._members.items())

    @property
    def resuming(self) -> int:
        """Members still replaying history (``REPLAYING`` or ``REREAD``)."""
        return len(self._resuming)

    def live(self) -> tuple[M, ...]:
        """The ``LIVE`` members in join order; the same tuple until membership changes."""
        live = self._live
        if live is None:
            live = self._live = tuple(m for m in self._members.values() if m.state is _LIVE)
        return live

    # ------------------------------------------------------------------ membership

    def add(self, key: K, member: M, *, cursor: Cursor | None = None) -> None:
        """Make ``member`` the member for ``key``: live, or replaying history after ``cursor``.

        Raises ``ValueError`` when ``key`` is already a member.
        """
        if key in self._members:
            raise ValueError(f"{key!r} is already a member")
        self._members[key] = member
        member.position = cursor
        if cursor is None:
            member.state = _LIVE
            member._buffer = None
            self._live = None
        else:
            member.state = _REPLAYING
            member._buffer = deque()
            self._resuming[key] = member

    def leave(self, key: K) -> M | None:
        """Remove ``key``; return its member (now ``LEFT``), or None if it was not one."""
        member = self._members.pop(key, None)
        if member is None:
            return None
        if self._resuming.pop(key, None) is None:
            self._live = None
        member.state = _LEFT
        member._buffer = None
        return member

    # ------------------------------------------------------------------ live messages

    def offer(self, message: Message, payload: P) -> None:
        """A live message arrived: buffer it (with ``payload``) for each replaying member.

        Call it before handing the message to the live members. A member whose
        buffer is full drops it and goes to ``REREAD``.
        """
        if not self._resuming:
            return
        entry = (message, payload)
        limit = self.buffer_limit
        for member in self._resuming.values():
            if member.state is not _REPLAYING:
                continue
            buffer = member._buffer
            assert buffer is not None
            if len(buffer) >= limit:
                buffer.clear()
                member.state = _REREAD
            else:
                buffer.append(entry)

    def backend_gap(self, reason: str) -> Resync[M]:
        """The backend may have lost live messages: what to tell whom.

        Replaying members read history again (it covers the gap when it reaches
        back). The live members are in the returned :class:`Resync` (head None).
        """
        for member in self._resuming.values():
            if member.state is _REPLAYING:
                member.state = _REREAD
                assert member._buffer is not None
                member._buffer.clear()
        return Resync(self.gap_policy, None, reason, self.live())

    # ------------------------------------------------------------------ hand-over

    def history(self, key: K, result: SinceResult, *, page_size: int) -> Replay[M]:
        """``result`` answered ``since(position, limit=page_size)`` for ``key``: what to deliver.

        Advances the member's ``position`` past the returned messages (or, on a
        ``NOTICE`` gap answer, to the head; for the reason ``"epoch"`` to offset 0
        of the new epoch, with ``more`` set so that the new epoch's history is read
        from its start). A key that is not replaying gets nothing.
        """
        member = self._resuming.get(key)
        if member is None:
            return Replay(())
        if result.gap:
            head = result.cursor
            reason = result.reason or "gap"
            more = False
            if reason == "epoch" and head.offset > 0:
                # History was lost and a new epoch began (a restarted in-memory server,
                # a flushed or failed-over Redis): the member continues from the new
                # epoch's start, so it gets everything the new epoch still holds rather
                # than only what comes after the head (read again from offset 0).
                head = Cursor(head.epoch, 0)
                more = True
            resync = Resync(self.gap_policy, head, reason, (member,))
            if self.gap_policy is GapPolicy.NOTICE:
                member.position = head
                return Replay((), resync, more)
            return Replay((), resync)
        messages = result.messages
        member.position = result.cursor
        return Replay(messages, None, len(messages) >= page_size)

    def go_live(self, key: K) -> list[tuple[Message, P]] | None:
        """Try to close the seam: the buffered messages to deliver now, or None.

        On success the member is ``LIVE`` from this call on: deliver the returned
        ``(message, payload)`` pairs before anything else is delivered to it (no
        await in between). None means history must be read again from
        the member's ``position`` (the buffer overflowed, or a message is
        missing between history and the buffer); the member is ``REPLAYING``
        again. A key that is not replaying gets None.
        """
        member = self._resuming.get(key)
        if member is None:
            return None
        buffer = member._buffer
        assert buffer is not None
        position = member.position
        if member.state is _REREAD:
            member.state = _REPLAYING
            buffer.clear()
            return None
        if position is not None:
            while buffer:
                cursor = buffer[0][0].cursor
                if cursor is None or not cursor.at_or_before(position):
                    break
                buffer.popleft()
            if buffer:
                cursor = buffer[0][0].cursor
                if cursor is not None and cursor.skips(position):
                    buffer.clear()
                    return None
        entries = list(buffer)
        del self._resuming[key]
        member._buffer = None
        member.state = _LIVE
        self._live = None
        return entries
