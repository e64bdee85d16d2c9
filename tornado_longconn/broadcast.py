"""Broadcast groups: rooms of WebSocket connections with encode-once, corked fan-out.

A :class:`BroadcastGroup` is a named topic (a chat room, a dashboard feed) whose
members are Tornado ``WebSocketHandler`` connections of this process. A
:class:`BroadcastHub` is the registry of an application's groups and holds the
backend they publish through (in-memory by default, Redis for many processes).
Create one hub per application and hand it to handlers through ``initialize()``
keyword arguments or application settings::

    class Chat(tornado.websocket.WebSocketHandler):
        def initialize(self, hub: BroadcastHub) -> None:
            self.room = hub.group("room:42")

        def open(self) -> None:
            self.room.join(self)            # left automatically when the socket closes

        async def on_message(self, message: str | bytes) -> None:
            await self.room.publish(message)

How a message travels: :meth:`BroadcastGroup.publish` encodes it once and
publishes it through the backend; the backend hands it back to every
subscribed group in every process (:meth:`BroadcastGroup.on_message`), which
builds the WebSocket frame once and gives the same bytes to each member's
:class:`~tornado_longconn.backpressure.BackpressureWriter`. The first frame a
member gets in an event-loop iteration goes straight to its socket when nothing
is pending for it; the frames after it in that iteration are corked and leave
in one socket write, so a burst of 100 messages costs about two writes per
member and one message per iteration one ``send()`` per member. A slow
member is handled by its writer's overflow policy (drop newest, drop oldest,
or close with :attr:`~tornado_longconn.codes.CloseCode.SLOW_CONSUMER`); it never
delays the other members and never raises into ``publish()``.

Groups that keep history give every message a cursor; ``join(handler,
cursor=...)`` replays what the member missed and then continues live, with no
gap and no duplicate at the seam. When history no longer reaches back, the
member is told to resync (see :class:`GapPolicy`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final

from tornado.websocket import WebSocketHandler

from ._frames import OP_TEXT, Encoded, encode_message
from ._groupcore import GapPolicy, GroupCore, MemberSlot, MemberState
from ._tornado.hooks import Hook, add_websocket_listener
from .backends.base import Backend
from .backends.memory import MemoryBackend
from .backoff import ReconnectBackoff, retry_unavailable
from .backpressure import (
    BackpressureWriter,
    OverflowPolicy,
    SendResult,
    _detach_writer,
    _offer_all,
)
from .codes import CloseCode
from .connections import _find_slots, _slots_of
from .exceptions import BackendError, BackendUnavailableError, LongConnError
from .log import DEFAULT_HISTORY, Cursor, HistoryLimit, Message, SinceResult, parse_cursor
from .logfields import log_fields
from .stats import COUNTER, GAUGE, PEAK, counters_only, sum_stats

# GapPolicy and MemberState are defined with the I/O-free core (_groupcore), public here.

if TYPE_CHECKING:
    import tornado.web

__all__ = [
    "DEFAULT_CLOSE_BATCH",
    "DEFAULT_CLOSE_SPREAD",
    "DEFAULT_HIGH_WATER",
    "SETTINGS_KEY",
    "BroadcastGroup",
    "BroadcastHub",
    "BroadcastStats",
    "GapPolicy",
    "GroupOptions",
    "MemberState",
    "Membership",
    "PublishResult",
    "cursor_envelope",
    "resync_notice",
]

log = logging.getLogger("tornado_longconn.broadcast")

#: Application settings key under which :meth:`BroadcastHub.of` finds the hub.
SETTINGS_KEY: Final = "longconn_hub"

#: Default per-member buffer limit of a group (bytes). Lower than the writer's own
#: default because a room multiplies it: 10,000 members x 256 KiB = 2.5 GiB at worst.
DEFAULT_HIGH_WATER: Final = 256 * 1024

#: Members closed per batch on graceful shutdown.
DEFAULT_CLOSE_BATCH: Final = 500

#: Seconds over which a graceful shutdown spreads its batches (jittered).
DEFAULT_CLOSE_SPREAD: Final = 1.0

# Messages read from history per ``since`` call while a member resumes.
_RESUME_PAGE: Final = 500
# A resume whose backend read or subscribe fails as unavailable (a timeout, a pool
# exhausted by a reconnect storm) is tried again this many times, after a jittered
# delay of at most min(cap, base * 2**attempt) seconds, before the member is closed
# with 1011: closing would send the client into a reconnect, which costs more.
_RESUME_RETRIES: Final = 6
_RESUME_RETRY_BASE: Final = 0.1
_RESUME_RETRY_CAP: Final = 2.0
# Exclusion sets of publishes whose message has not come back from the backend yet.
_MAX_PENDING_EXCLUDES: Final = 10_000

Exclude = WebSocketHandler | Iterable[WebSocketHandler] | None
Envelope = Callable[[Message], Any]
Notice = Callable[[str, Cursor | None, str], str]

# The handler attribute holding the groups a connection belongs to.

_WRITTEN: Final = SendResult.WRITTEN
_QUEUED: Final = SendResult.QUEUED
_DROPPED: Final = SendResult.DROPPED


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What :meth:`BroadcastGroup.publish` did.

    ``message`` is what the backend recorded (with its ``cursor`` when the group
    keeps history). ``delivered`` / ``dropped`` / ``closed`` count this process's
    members: accepted by their writer (written or queued), dropped by an overflow
    policy, or found closed (slow consumer closed by the ``CLOSE`` policy, or a
    vanished peer). ``local`` is True when the backend delivered the message to
    this process before ``publish()`` returned (always with the in-memory
    backend); when False (an asynchronous backend such as Redis), the counts are
    zero here and the delivery is counted in :meth:`BroadcastGroup.stats` instead.
    """

    message: Message
    delivered: int = 0
    dropped: int = 0
    closed: int = 0
    local: bool = False

    @property
    def cursor(self) -> Cursor | None:
        """The published message's cursor (None when the group keeps no history)."""
        return self.message.cursor


@dataclass(frozen=True, slots=True)
class BroadcastStats:
    """Counters of a group (or, summed, of a hub); see :meth:`BroadcastGroup.stats`.

    * ``groups`` -- groups counted (1 for a group).
    * ``members`` -- current members (``resuming`` of them are still replaying history).
    * ``joined`` / ``left`` -- joins and leaves so far (``left`` includes closes).
    * ``published`` -- messages published through this group.
    * ``received`` -- messages the backend delivered to this group for fan-out.
    * ``delivered`` -- member deliveries accepted by a writer (written or queued);
      ``frames`` is the same count and ``bytes`` their uncompressed frame bytes.
    * ``dropped`` -- member deliveries discarded by an overflow policy.
    * ``closed`` -- members removed because their connection was closed while
      delivering (``CLOSE`` policy on a slow consumer, or a vanished peer).
    * ``closed_slow`` -- of those, the ones the writer closed as slow consumers.
    * ``resyncs`` -- members told to resync (:class:`GapPolicy`).
    * ``gaps`` -- gaps reported by the backend.
    * ``max_buffered`` -- the largest member buffer right now (bytes);
      ``peak_buffered`` -- the largest any current member's buffer has been.

    ``groups``, ``members`` and ``resuming`` are gauges, the two buffer sizes
    peaks (summed as a maximum), the rest counters; a hub's snapshot is
    :func:`~tornado_longconn.stats.sum_stats` of its groups'.
    """

    groups: int = field(default=0, metadata=GAUGE)
    members: int = field(default=0, metadata=GAUGE)
    resuming: int = field(default=0, metadata=GAUGE)
    joined: int = field(default=0, metadata=COUNTER)
    left: int = field(default=0, metadata=COUNTER)
    published: int = field(default=0, metadata=COUNTER)
    received: int = field(default=0, metadata=COUNTER)
    delivered: int = field(default=0, metadata=COUNTER)
    frames: int = field(default=0, metadata=COUNTER)
    bytes: int = field(default=0, metadata=COUNTER)
    dropped: int = field(default=0, metadata=COUNTER)
    closed: int = field(default=0, metadata=COUNTER)
    closed_slow: int = field(default=0, metadata=COUNTER)
    resyncs: int = field(default=0, metadata=COUNTER)
    gaps: int = field(default=0, metadata=COUNTER)
    max_buffered: int = field(default=0, metadata=PEAK)
    peak_buffered: int = field(default=0, metadata=PEAK)


def _history_limit(history: int | HistoryLimit | None) -> HistoryLimit | None:
    if history is None or isinstance(history, HistoryLimit):
        return history
    if isinstance(history, bool) or not isinstance(history, int):
        raise TypeError(f"history must be an int, a HistoryLimit or None, not {history!r}")
    return HistoryLimit(max_messages=history)


@dataclass(frozen=True, slots=True)
class GroupOptions:
    """A group's settings, resolved and validated once (see :class:`BroadcastGroup`).

    A hub holds one as the defaults of its groups (``hub.defaults``); each group
    holds its own (``group.options``), made by :meth:`merged` from the hub's
    defaults and the group's keyword arguments. ``history`` may be given as an
    ``int`` (a number of messages); it is stored as a
    :class:`~tornado_longconn.log.HistoryLimit`. ``low_water`` and
    ``max_queue`` None leave the writer's own defaults.

    Raises ``ValueError`` for an out-of-range value (``high_water < 1``,
    ``low_water`` outside 1..``high_water``, ``max_queue < 1``,
    ``close_batch < 1``, ``close_spread < 0``, a policy name that does not
    exist) and ``TypeError`` for a value of the wrong type.
    """

    history: HistoryLimit | None = None
    policy: OverflowPolicy = OverflowPolicy.CLOSE
    high_water: int = DEFAULT_HIGH_WATER
    low_water: int | None = None
    max_queue: int | None = None
    gap_policy: GapPolicy = GapPolicy.CLOSE
    envelope: Envelope | None = None
    close_batch: int = DEFAULT_CLOSE_BATCH
    close_spread: float = DEFAULT_CLOSE_SPREAD
    notice: Notice | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "history", _history_limit(self.history))
        set_(self, "policy", _enum(OverflowPolicy, self.policy, "policy"))
        set_(self, "gap_policy", _enum(GapPolicy, self.gap_policy, "gap_policy"))
        high = _int(self.high_water, "high_water")
        if high < 1:
            raise ValueError(f"high_water must be >= 1, got {high}")
        if self.low_water is not None:
            low = _int(self.low_water, "low_water")
            if not 1 <= low <= high:
                raise ValueError(f"low_water must be between 1 and high_water ({high}), got {low}")
        if self.max_queue is not None and _int(self.max_queue, "max_queue") < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.envelope is not None and not callable(self.envelope):
            raise TypeError(f"envelope must be callable or None, not {self.envelope!r}")
        if self.notice is not None and not callable(self.notice):
            raise TypeError(f"notice must be callable or None, not {self.notice!r}")
        if _int(self.close_batch, "close_batch") < 1:
            raise ValueError(f"close_batch must be >= 1, got {self.close_batch}")
        spread = self.close_spread
        if isinstance(spread, bool) or not isinstance(spread, (int, float)):
            raise TypeError(f"close_spread must be a number, not {spread!r}")
        if not spread >= 0:
            raise ValueError(f"close_spread must be >= 0, got {spread}")

    def merged(self, **overrides: Any) -> GroupOptions:
        """These options with ``overrides`` applied (validated); None values keep the current one.

        Raises ``TypeError`` for a name that is not an option.
        """
        changes = {}
        for key, value in overrides.items():
            if key not in _OPTION_NAMES:
                raise TypeError(f"unknown group option {key!r}")
            if value is not None:
                changes[key] = value
        if not changes:
            return self
        values = {name: getattr(self, name) for name in _OPTION_NAMES}
        values.update(changes)
        return GroupOptions(**values)

    def differences(self, other: GroupOptions) -> list[tuple[str, Any, Any]]:
        """``(name, mine, theirs)`` for every option where ``other`` differs."""
        return [
            (name, getattr(self, name), getattr(other, name))
            for name in _OPTION_NAMES
            if getattr(self, name) != getattr(other, name)
        ]


def _enum(kind: Any, value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"{name} must be one of {choices}, not {value!r}") from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    return value


_OPTION_NAMES: Final = tuple(f.name for f in fields(GroupOptions))
_DEFAULT_OPTIONS: Final = GroupOptions()


def cursor_envelope(message: Message) -> Any:
    """Wrap a text message with its cursor: ``{"cursor": "<epoch>-<offset>", "data": ...}``.

    Pass it as ``envelope=`` to a group that keeps history, so that clients learn
    each message's cursor and can resume after a reconnect (``longconn.js``
    understands this shape). ``data`` is the published JSON value when the text
    is JSON, else the text as a string; ``cursor`` is null without history.
    Binary messages are sent unchanged (binary frames carry no cursor).
    """
    data = message.data
    if isinstance(data, bytes):
        return data
    cursor = json.dumps(str(message.cursor)) if message.cursor is not None else "null"
    try:
        json.loads(data)
    except ValueError:
        body = json.dumps(data, ensure_ascii=False)
    else:
        body = data
    return f'{{"cursor":{cursor},"data":{body}}}'


def resync_notice(topic: str, cursor: Cursor | None, reason: str) -> str:
    """The JSON text sent to a member under :attr:`GapPolicy.NOTICE`.

    ``{"type": "resync", "topic": topic, "cursor": "<epoch>-<offset>" | null,
    "reason": reason}``: the client reloads its state; messages after ``cursor``
    follow on the same connection.
    """
    return json.dumps(
        {
            "type": "resync",
            "topic": topic,
            "cursor": None if cursor is None else str(cursor),
            "reason": reason,
        },
        separators=(",", ":"),
    )


def _wire(message: Any) -> tuple[str | bytes, Encoded]:
    """Backend data (``str``/``bytes``) and the encoded message, built once."""
    if isinstance(message, str):
        return message, Encoded(OP_TEXT, message.encode("utf-8"))
    if isinstance(message, Encoded):
        if message.is_text:
            return message.payload.decode("utf-8"), message
        return message.payload, message
    if isinstance(message, (dict, list)):
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        return text, Encoded(OP_TEXT, text.encode("utf-8"))
    encoded = encode_message(message)  # bytes-like, or TypeError for anything else
    return encoded.payload, encoded


def _exclude_set(exclude: Exclude) -> frozenset[WebSocketHandler] | None:
    if exclude is None:
        return None
    if isinstance(exclude, WebSocketHandler):
        return frozenset((exclude,))
    members = frozenset(exclude)
    return members or None


def _connection_gone(handler: WebSocketHandler) -> bool:
    conn = handler.ws_connection
    return conn is None or conn.is_closing()


class _Tally:
    """Counts of one publish call while its message is delivered locally."""

    __slots__ = ("closed", "delivered", "dropped", "seen")

    def __init__(self) -> None:
        self.delivered = 0
        self.dropped = 0
        self.closed = 0
        self.seen = False


# What a member replaying history gets buffered with each live message: the
# encoded frame and the publish's exclusion set.
_Live = tuple[Encoded, frozenset[WebSocketHandler] | None]


class _Resume:
    """What a resuming member adds: its resume task, the gap met, messages replayed."""

    __slots__ = ("gap", "replayed", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.gap: SinceResult | None = None
        self.replayed = 0


class Membership(MemberSlot[_Live]):
    """One connection's membership of one group, returned by :meth:`BroadcastGroup.join`.

    Awaiting it is optional: ``await group.join(handler)`` returns once the
    member receives live messages (the group is subscribed to the backend and,
    with a cursor, the history after it was handed to the member's writer).
    It raises :class:`~tornado_longconn.exceptions.BackendUnavailableError` when
    the group could not subscribe to the backend; the member then stays joined
    and the subscription is retried on the next join or publish.

    Attributes: ``group``, ``handler``, ``writer`` (the connection's
    :class:`~tornado_longconn.backpressure.BackpressureWriter`, None when the join
    was refused because the connection or the group was already closed),
    ``state`` (a :class:`MemberState`: replaying
    history, live, or left), ``active`` (still a member), ``live`` (receiving
    live messages), ``replayed`` (history messages delivered on resume) and
    ``gap`` (the :class:`~tornado_longconn.log.SinceResult` when resuming hit a
    gap, else None).
    """

    # A member that resumes keeps its resume's task, gap and count in a _Resume made
    # then: most members never resume, and a membership is the unit of memory of a
    # subscription (the subscriptions protocol makes one per topic per connection).
    __slots__ = (
        "_dropped_seen",
        "_resume",
        "group",
        "handler",
        "writer",
    )

    def __init__(
        self, group: BroadcastGroup, handler: WebSocketHandler, writer: BackpressureWriter | None
    ) -> None:
        super().__init__()
        self.group = group
        self.handler = handler
        self.writer = writer
        self._dropped_seen = 0
        self._resume: _Resume | None = None

    @property
    def replayed(self) -> int:
        """History messages delivered on resume (0 for a member that joined live)."""
        resume = self._resume
        return 0 if resume is None else resume.replayed

    @property
    def gap(self) -> SinceResult | None:
        """The history answer when resuming hit a gap, else None."""
        resume = self._resume
        return None if resume is None else resume.gap

    @property
    def _task(self) -> asyncio.Task[None] | None:
        resume = self._resume
        return None if resume is None else resume.task

    @property
    def active(self) -> bool:
        """True while the connection is a member (live or replaying history)."""
        return self.state is not MemberState.LEFT

    @property
    def live(self) -> bool:
        """True once the member receives live messages."""
        return self.state is MemberState.LIVE

    def __repr__(self) -> str:
        state = "live" if self.live else "resuming" if self.active else "left"
        return f"<Membership {self.group.name!r} {state}>"

    def __await__(self) -> Generator[Any, None, Membership]:
        return self._wait().__await__()

    async def _wait(self) -> Membership:
        if not self.active:
            return self
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait((task,))
        else:
            await self.group._ensure_subscribed()
        return self

    def leave(self) -> bool:
        """Leave the group (same as ``group.leave(handler)``); False if already left."""
        return self.group.leave(self.handler)

    def _sync_dropped(self) -> int:
        """Messages the writer dropped since last asked (DROP_OLDEST evictions)."""
        writer = self.writer
        if writer is None:
            return 0
        total = writer.stats().dropped
        new = total - self._dropped_seen
        self._dropped_seen = total
        return max(new, 0)


def _members_of(handler: WebSocketHandler) -> dict[BroadcastGroup, None]:
    """The groups ``handler`` belongs to, in join order, as a dict (made if needed).

    A connection in one group keeps just that group on the handler (a dict costs
    about 220 bytes per connection); :func:`_join_group` and this function turn
    it into a dict once a second group is joined or the dict is asked for.

    Every close path makes it leave every group, through listeners patched once
    on Tornado's classes (:func:`~tornado_longconn._tornado.hooks.add_websocket_listener`):
    ``on_ws_connection_close`` (the end of the frame loop, before
    ``on_connection_close``) and the protocol's ``close`` once the stream is
    closed (covers an ``open()`` that raised after joining, which Tornado aborts
    without ``on_connection_close``). Nothing is hooked per connection, and the
    groups and the writer are dropped once it closed, so a closed member is freed
    by reference counting alone.
    """
    slots = _slots_of(handler)
    groups: dict[BroadcastGroup, None] | BroadcastGroup | None = slots.groups
    if isinstance(groups, dict):
        return groups
    _hook_group_close()
    as_dict: dict[BroadcastGroup, None] = {} if groups is None else {groups: None}
    slots.groups = as_dict
    return as_dict


def _join_group(handler: WebSocketHandler, group: BroadcastGroup) -> None:
    """Record that ``handler`` joined ``group`` (the group itself while it is the only one)."""
    slots = _slots_of(handler)
    groups: dict[BroadcastGroup, None] | BroadcastGroup | None = slots.groups
    if groups is None:
        _hook_group_close()
        slots.groups = group
    elif isinstance(groups, dict):
        groups[group] = None
    elif groups is not group:
        slots.groups = {groups: None, group: None}


def _left_group(handler: WebSocketHandler, group: BroadcastGroup) -> None:
    """Forget that ``handler`` is in ``group`` (nothing if it is not)."""
    slots = _find_slots(handler)
    groups = None if slots is None else slots.groups
    if isinstance(groups, dict):
        groups.pop(group, None)
    elif slots is not None and groups is group:
        slots.groups = {}


def _hook_group_close() -> None:
    # Class-level listeners (patched once on Tornado's classes) that find the
    # groups on the handler: nothing per connection.
    add_websocket_listener(Hook.CONNECTION_CLOSE, _leave_all)
    add_websocket_listener(Hook.AFTER_CONNECTION_CLOSE, _forget)
    add_websocket_listener(Hook.STREAM_CLOSE, _leave_all)


def _leave_all(handler: Any) -> None:
    """The connection closed: leave every group it belongs to (a class-level hook listener)."""
    slots = _find_slots(handler)
    groups: dict[BroadcastGroup, None] | BroadcastGroup | None = (
        None if slots is None else slots.groups
    )
    if not groups:
        return
    for group in list(groups) if isinstance(groups, dict) else [groups]:
        try:
            group._remove(handler, closed=False)
        except Exception:
            log.exception(
                "leaving %r on close failed",
                group,
                extra=log_fields(handler, topic=group.name),
            )


def _forget(handler: Any) -> None:
    """Drop what :func:`_members_of` attached to a closed handler, and its writer.

    A class-level listener: runs after every WebSocket's ``on_connection_close``.
    """
    slots = _find_slots(handler)
    if slots is None or slots.groups is None:
        return
    if isinstance(slots.groups, dict) and not slots.groups:
        slots.groups = None
    _detach_writer(handler)


class BroadcastGroup:
    """A named topic whose members are WebSocket connections of this process.

    Arguments (all keyword-only except ``name``; unset ones come from ``hub``,
    else from the defaults below):

    * ``name`` -- the topic; every process that has a group of this name on the
      same backend shares its messages.
    * ``hub`` -- a :class:`BroadcastHub` to take the backend and defaults from;
      the group registers in it (:meth:`BroadcastHub.group` is the usual way).
    * ``backend`` -- a :class:`~tornado_longconn.backends.base.Backend` (default:
      the hub's, else a private :class:`~tornado_longconn.backends.MemoryBackend`).
    * ``history`` -- keep this many messages (an ``int``), a
      :class:`~tornado_longconn.log.HistoryLimit`, or None (default: no history,
      no cursors, no resume).
    * ``policy`` -- each member writer's overflow policy (default
      ``OverflowPolicy.CLOSE``); ``high_water`` (default :data:`DEFAULT_HIGH_WATER`),
      ``low_water`` and ``max_queue`` -- its limits (see ``BackpressureWriter``).
    * ``gap_policy`` -- :class:`GapPolicy` (default ``CLOSE``).
    * ``envelope`` -- a function ``Message -> str | bytes | dict | list`` applied
      once per message before fan-out, e.g. :func:`cursor_envelope`; default None
      sends the published data unchanged.
    * ``close_batch`` / ``close_spread`` -- graceful shutdown batching (see :meth:`close`).
    * ``notice`` -- a function ``(topic, cursor, reason) -> str`` building the JSON
      text of a ``GapPolicy.NOTICE`` resync message (default :func:`resync_notice`);
      the subscriptions protocol passes its own.

    The options are resolved once into :attr:`options` (a frozen
    :class:`GroupOptions`) and read back as attributes (``group.history``, ...).
    Raises ``ValueError`` when ``hub`` already has a group of this name, or for
    an invalid option (see :class:`GroupOptions`).

    Membership and the history-to-live hand-over live in an I/O-free core
    (:class:`~tornado_longconn._groupcore.GroupCore`); the group reads history
    from the backend, writes to the members' writers and counts.
    """

    def __init__(
        self,
        name: str,
        *,
        hub: BroadcastHub | None = None,
        backend: Backend | None = None,
        history: int | HistoryLimit | None = None,
        policy: OverflowPolicy | None = None,
        high_water: int | None = None,
        low_water: int | None = None,
        max_queue: int | None = None,
        gap_policy: GapPolicy | None = None,
        envelope: Envelope | None = None,
        close_batch: int | None = None,
        close_spread: float | None = None,
        notice: Notice | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a group name is a non-empty string, not {name!r}")
        if hub is not None and backend is None:
            backend = hub.backend
        base = hub.defaults if hub is not None else _DEFAULT_OPTIONS
        options = base.merged(
            history=history,
            policy=policy,
            high_water=high_water,
            low_water=low_water,
            max_queue=max_queue,
            gap_policy=gap_policy,
            envelope=envelope,
            close_batch=close_batch,
            close_spread=close_spread,
            notice=notice,
        )
        self.name = name
        self.hub = hub
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        self.options: GroupOptions = options
        self._envelope = options.envelope
        limit = options.history.max_messages if options.history is not None else DEFAULT_HISTORY
        # Membership and the resume hand-over (I/O-free); a replaying member buffers
        # at most a page or its history's size of live messages before re-reading.
        self._core: GroupCore[WebSocketHandler, Membership, _Live] = GroupCore(
            options.gap_policy, buffer_limit=max(limit, _RESUME_PAGE)
        )
        # The core's live members and their writers, rebuilt when the core's changes.
        self._snapshot: tuple[tuple[Membership, ...], tuple[BackpressureWriter, ...]] | None
        self._snapshot = None
        self._token = secrets.token_hex(4)
        self._seq = itertools.count(1)
        self._inflight: dict[str, _Tally] = {}
        self._excludes: OrderedDict[str, frozenset[WebSocketHandler]] = OrderedDict()
        self._stash: tuple[str | bytes | None, Encoded | None] = (None, None)
        self._closed = False
        self._close_code = int(CloseCode.GOING_AWAY)
        self._close_reason = "going away"
        self._tasks: set[asyncio.Task[Any]] = set()
        # History reads in flight, shared by members resuming from the same position,
        # with the count of messages received when each was sent.
        self._reads: dict[Cursor | None, tuple[int, asyncio.Future[SinceResult]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Backend subscription: wanted while the group has members and is open.
        self._subscribed = False
        self._sync_task: asyncio.Task[None] | None = None
        self._sub_error: BaseException | None = None
        self._sub_waiters: list[asyncio.Future[None]] = []
        self._started = False
        # Counters.
        self._joined = 0
        self._left = 0
        self._published = 0
        self._received = 0
        self._delivered = 0
        self._bytes = 0
        self._dropped = 0
        self._closed_members = 0
        self._closed_slow = 0
        self._resyncs = 0
        self._gaps = 0
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        if hub is not None:
            hub._register(self)

    def __repr__(self) -> str:
        return f"<BroadcastGroup {self.name!r} members={len(self._core)}>"

    def __len__(self) -> int:
        return len(self._core)

    def __iter__(self) -> Iterator[WebSocketHandler]:
        return iter(self._core)

    def __contains__(self, handler: object) -> bool:
        return handler in self._core

    def __bool__(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def history(self) -> HistoryLimit | None:
        """The history kept for the topic (None: no history, no cursors)."""
        return self.options.history

    @property
    def policy(self) -> OverflowPolicy:
        """The members' writers' overflow policy."""
        return self.options.policy

    @property
    def high_water(self) -> int:
        """The members' writers' high-water mark (bytes)."""
        return self.options.high_water

    @property
    def low_water(self) -> int | None:
        """The members' writers' low-water mark (None: the writer's default)."""
        return self.options.low_water

    @property
    def max_queue(self) -> int | None:
        """The members' writers' queue limit (None: the writer's default)."""
        return self.options.max_queue

    @property
    def gap_policy(self) -> GapPolicy:
        """What members are told when they cannot be given every message."""
        return self.options.gap_policy

    @property
    def envelope(self) -> Envelope | None:
        """The function applied to each message before fan-out, or None."""
        return self.options.envelope

    @property
    def close_batch(self) -> int:
        """Members closed per batch on :meth:`close`."""
        return self.options.close_batch

    @property
    def close_spread(self) -> float:
        """Seconds over which :meth:`close` spreads its batches."""
        return self.options.close_spread

    async def head(self) -> Cursor | None:
        """The topic's current cursor (None when the group keeps no history).

        Concurrent calls, and members resuming at the same time, share one backend
        read. Raises the backend's :class:`~tornado_longconn.exceptions.BackendError`.
        """
        if self.history is None:
            return None
        return (await self._read(None)).cursor

    def _read(self, position: Cursor | None) -> asyncio.Future[SinceResult]:
        """``backend.since(position)``, shared by concurrent readers (single-flight).

        A read in flight is joined only if the group has received no message since
        it was sent: a message delivered before the joining member's buffer existed
        may be missing from that read, while one delivered later is in the member's
        buffer, where the core checks the seam (and reads again when a message is
        missing). A head read (``position`` None) is always shared: a member joins
        from the head it was told and replays everything after it.
        """
        reads = self._reads
        entry = reads.get(position)
        if entry is None or (position is not None and entry[0] != self._received):
            read = asyncio.ensure_future(
                self.backend.since(self.name, position, limit=_RESUME_PAGE)
            )
            entry = reads[position] = (self._received, read)
            read.add_done_callback(functools.partial(self._read_done, position))
        return asyncio.shield(entry[1])

    def _read_done(self, position: Cursor | None, read: asyncio.Future[SinceResult]) -> None:
        entry = self._reads.get(position)
        if entry is not None and entry[1] is read:
            del self._reads[position]
        if not read.cancelled():
            read.exception()  # retrieved here: every reader may have been cancelled

    def membership(self, handler: WebSocketHandler) -> Membership | None:
        """``handler``'s :class:`Membership` of this group, or None."""
        return self._core.get(handler)

    # ------------------------------------------------------------------ membership

    def join(
        self,
        handler: WebSocketHandler,
        *,
        policy: OverflowPolicy | None = None,
        high_water: int | None = None,
        cursor: str | Cursor | None = None,
    ) -> Membership:
        """Add ``handler`` to the group; it leaves automatically when its connection closes.

        Call it from ``open()``. Joining again returns the existing
        :class:`Membership` and changes nothing. ``policy`` and ``high_water``
        override the group's for this member's writer; they apply when the
        connection's writer is created, i.e. on its first join or send.

        ``cursor`` (a client's ``"<epoch>-<offset>"`` string) resumes: the
        messages after it are replayed from history, then live messages follow,
        with no gap and no duplicate. When history no longer reaches back, the
        member is told to resync as ``gap_policy`` says.

        Returns the :class:`Membership`; awaiting it waits until the member is
        live. A connection that is already closed, or a group that is closed, is
        not joined: the returned membership is inactive (and on a closed group the
        connection is closed with the group's close code). Raises
        :class:`~tornado_longconn.exceptions.CursorError` for a malformed cursor
        and ``ValueError`` for a cursor on a group without history.
        """
        existing = self._core.get(handler)
        if existing is not None:
            return existing
        resume_from: Cursor | None = None
        if cursor is not None:
            if self.history is None:
                raise ValueError(f"group {self.name!r} keeps no history: it cannot resume a cursor")
            resume_from = parse_cursor(cursor)
        if self._closed:
            if not _connection_gone(handler):
                handler.close(self._close_code, self._close_reason)
            return Membership(self, handler, None)
        if _connection_gone(handler):
            return Membership(self, handler, None)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        writer = BackpressureWriter.of(handler, **self._writer_options(policy, high_water))
        member = Membership(self, handler, writer)
        _join_group(handler, self)
        self._core.add(handler, member, cursor=resume_from)
        self._joined += 1
        if resume_from is not None:
            resume = member._resume = _Resume()
            resume.task = self._spawn(self._resume(member))
        if not self._subscribed:
            self._sync_subscription()
        return member

    def leave(self, handler: WebSocketHandler) -> bool:
        """Remove ``handler`` from the group; True if it was a member. Never raises."""
        return self._remove(handler, closed=False)

    def _writer_options(
        self, policy: OverflowPolicy | None, high_water: int | None
    ) -> dict[str, Any]:
        group = self.options
        options: dict[str, Any] = {
            "policy": group.policy if policy is None else policy,
            "high_water": group.high_water if high_water is None else high_water,
        }
        if group.low_water is not None and high_water is None:
            options["low_water"] = group.low_water
        if group.max_queue is not None:
            options["max_queue"] = group.max_queue
        return options

    def _remove(self, handler: WebSocketHandler, *, closed: bool) -> bool:
        member = self._core.leave(handler)
        if member is None:
            return False
        self._snapshot = None  # holds the member: a closed one must be freed at once
        self._left += 1
        if closed:
            self._closed_members += 1
            writer = member.writer
            if writer is not None and _closed_as_slow(writer):
                self._closed_slow += 1
        task = member._task
        if task is not None and not task.done() and task is not _current_task():
            task.cancel()
        _left_group(handler, self)
        if not self._core:
            if self._subscribed:
                self._sync_subscription()
            if self.hub is not None:
                self.hub._idle(self)
        return True

    # ------------------------------------------------------------------ subscription

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _sync_subscription(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = self._spawn(self._run_subscription())

    async def _run_subscription(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                want = bool(self._core) and not self._closed
                if want == self._subscribed:
                    break
                try:
                    if want:
                        if not self._started:
                            await self.backend.start()
                            self._started = True
                        await self.backend.subscribe(self.name, self)
                    else:
                        await self.backend.unsubscribe(self.name, self)
                except Exception as exc:
                    log.error(
                        "group %r: backend %s failed: %r",
                        self.name,
                        "subscribe" if want else "unsubscribe",
                        exc,
                        extra=log_fields(topic=self.name),
                    )
                    error = exc
                    break
                self._subscribed = want
        finally:
            self._sub_error = error
            waiters, self._sub_waiters = self._sub_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _ensure_subscribed(self) -> None:
        """Wait until the group is subscribed (when it has members)."""
        if self._subscribed or not self._core or self._closed:
            return
        self._sync_subscription()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sub_waiters.append(waiter)
        await waiter
        if not self._subscribed and self._core and not self._closed:
            error = self._sub_error
            raise BackendUnavailableError(
                f"group {self.name!r} could not subscribe to its backend"
            ) from error

    # ------------------------------------------------------------------ publishing

    def _begin_publish(self, message: Any, exclude: Exclude) -> tuple[str | bytes, str, _Tally]:
        data, encoded = _wire(message)
        excluded = _exclude_set(exclude)
        tag = f"{self._token}.{next(self._seq)}"
        if excluded is not None:
            excludes = self._excludes
            excludes[tag] = excluded
            if len(excludes) > _MAX_PENDING_EXCLUDES:
                excludes.popitem(last=False)
        tally = self._inflight[tag] = _Tally()
        self._stash = (data, encoded)
        return data, tag, tally

    def _end_publish(self, message: Message, tag: str, tally: _Tally) -> PublishResult:
        self._published += 1
        self._inflight.pop(tag, None)
        self._stash = (None, None)
        if not tally.seen and self._core and not self._subscribed:
            # Not subscribed yet (first member joined in this loop iteration):
            # deliver locally; the backend will not hand this message to us.
            self._fan_out(message, tally)
        return PublishResult(message, tally.delivered, tally.dropped, tally.closed, tally.seen)

    async def publish(self, message: Any, *, exclude: Exclude = None) -> PublishResult:
        """Publish ``message`` to every member of the group in every process.

        ``str`` is sent as a text frame, ``bytes`` as a binary frame, ``dict`` and
        ``list`` as JSON text (encoded once). ``exclude`` is a handler or an
        iterable of handlers of this process that must not receive it (e.g. the
        sender). Returns a :class:`PublishResult`. Slow or closed members never
        make this raise or wait; it raises ``TypeError`` for another message
        type and :class:`~tornado_longconn.exceptions.BackendUnavailableError`
        when the backend cannot publish (then nobody received the message).
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        data, tag, tally = self._begin_publish(message, exclude)
        try:
            if self._core and not self._subscribed:
                await self._ensure_subscribed()
            published = await self.backend.publish(self.name, data, history=self.history, tag=tag)
        except BaseException:
            self._inflight.pop(tag, None)
            self._excludes.pop(tag, None)
            self._stash = (None, None)
            raise
        return self._end_publish(published, tag, tally)

    def publish_nowait(self, message: Any, *, exclude: Exclude = None) -> PublishResult:
        """Synchronous :meth:`publish`, for backends that publish without waiting.

        The in-memory backend does (it has ``publish_nowait``); with another
        backend this raises ``TypeError``: use :meth:`publish`. Must be called on
        the event loop's thread; from other threads use :meth:`publish_threadsafe`.
        """
        publish_nowait = getattr(self.backend, "publish_nowait", None)
        if publish_nowait is None:
            raise TypeError(
                f"{type(self.backend).__name__} cannot publish without waiting: "
                "use 'await group.publish(...)'"
            )
        data, tag, tally = self._begin_publish(message, exclude)
        try:
            published: Message = publish_nowait(self.name, data, history=self.history, tag=tag)
        except BaseException:
            self._inflight.pop(tag, None)
            self._excludes.pop(tag, None)
            self._stash = (None, None)
            raise
        return self._end_publish(published, tag, tally)

    def publish_threadsafe(
        self, message: Any, *, exclude: Exclude = None
    ) -> concurrent.futures.Future[PublishResult]:
        """Publish from any thread (sensor readers, blocking SDKs, executors).

        ``message`` is encoded in the calling thread (so later changes to a dict
        do not leak into the message), then :meth:`publish` runs on the group's
        event loop via ``loop.call_soon_threadsafe``; messages published from one
        thread keep their order. Returns a ``concurrent.futures.Future`` with the
        :class:`PublishResult` (or the exception); ignoring it is fine. Raises
        ``RuntimeError`` when the group has not seen its event loop yet (create
        the group, or join or publish once, inside the running loop first) or
        when that loop is closed.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError(
                f"group {self.name!r} has no event loop yet: create it inside the running loop"
            )
        data, _ = _wire(message)
        future: concurrent.futures.Future[PublishResult] = concurrent.futures.Future()

        def start() -> None:  # on the loop's thread
            if not future.set_running_or_notify_cancel():
                return  # cancelled by the caller before it started
            task = self._spawn(self.publish(data, exclude=exclude))
            task.add_done_callback(done)

        def done(task: asyncio.Task[PublishResult]) -> None:
            if task.cancelled():
                future.set_exception(asyncio.CancelledError())
            elif (error := task.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(task.result())

        # The coroutine is only created on the loop, so a closed loop raises
        # RuntimeError here and leaves no never-awaited coroutine behind.
        loop.call_soon_threadsafe(start)
        return future

    # ------------------------------------------------------------------ delivery

    def on_message(self, message: Message) -> None:
        """Backend callback: fan ``message`` out to this process's members. Never raises."""
        try:
            tag = message.tag
            tally = self._inflight.get(tag) if tag is not None else None
            if tally is None:
                tally = _Tally()
            self._fan_out(message, tally)
        except Exception:
            log.exception(
                "group %r: delivering a message failed",
                self.name,
                extra=log_fields(topic=self.name),
            )

    def _encode_incoming(self, message: Message) -> Encoded:
        envelope = self._envelope
        if envelope is not None:
            return encode_message(envelope(message))
        data, encoded = self._stash
        if encoded is not None and data is message.data:
            return encoded
        return _wire(message.data)[1]

    def _fan_out(self, message: Message, tally: _Tally) -> None:
        tally.seen = True
        self._received += 1
        core = self._core
        if not core:
            return
        tag = message.tag
        excluded = self._excludes.pop(tag, None) if tag is not None and self._excludes else None
        encoded = self._encode_incoming(message)
        if core.resuming:
            core.offer(message, (encoded, excluded))
        live = core.live()
        snapshot = self._snapshot
        if snapshot is None or snapshot[0] is not live:
            snapshot = self._snapshot = (
                live,
                tuple(m.writer for m in live),  # type: ignore[misc]
            )
        members, writers = snapshot
        if excluded is not None:
            keep = [i for i, m in enumerate(members) if m.handler not in excluded]
            members = tuple(members[i] for i in keep)
            writers = tuple(writers[i] for i in keep)
        # The hot loop (one pass over the writers), outcomes counted in C afterwards.
        results: list[SendResult] = []
        total = len(writers)
        broken: list[Membership] | None = None
        while True:
            try:
                _offer_all(writers, encoded, results)
            except Exception:
                member = members[len(results)]
                log.exception(
                    "group %r: writer of %r failed",
                    self.name,
                    member.handler,
                    extra=log_fields(member.handler, topic=self.name),
                )
                broken = [*broken, member] if broken else [member]
                results.append(SendResult.CLOSED)
                continue
            break
        delivered = results.count(_WRITTEN)
        dropped = 0
        gone: list[WebSocketHandler] | None = None
        queued_members: list[Membership] | None = None
        if delivered != total:
            for member, result in zip(members, results, strict=True):
                if result is _WRITTEN:
                    continue
                if result is _QUEUED:
                    delivered += 1
                    if queued_members is None:
                        queued_members = []
                    queued_members.append(member)
                elif result is _DROPPED:
                    dropped += 1
                    member._dropped_seen += 1
                else:
                    if gone is None:
                        gone = []
                    gone.append(member.handler)
        if queued_members is not None:
            # DROP_OLDEST: queuing this message may have pushed an older one out.
            for member in queued_members:
                dropped += member._sync_dropped()
        closed = 0
        if gone is not None:
            for handler in gone:
                if self._remove(handler, closed=True):
                    closed += 1
        if broken is not None:
            # A writer that raised is a bug, not a peer that left: close the connection
            # so that the client reconnects rather than silently missing messages.
            for member in broken:
                _close_member(member, int(CloseCode.INTERNAL_ERROR), "internal error")
        if delivered:
            self._delivered += delivered
            self._bytes += delivered * len(encoded.frame)
        self._dropped += dropped
        tally.delivered += delivered
        tally.dropped += dropped
        tally.closed += closed

    async def _resume(self, member: Membership) -> None:
        """Replay history after the member's cursor, then hand it over to the live stream.

        The decisions are the core's (:meth:`GroupCore.history`,
        :meth:`GroupCore.go_live`); this reads pages from the backend and writes
        them through the member's writer, awaiting its flow control.
        """
        handler = member.handler
        writer = member.writer
        assert writer is not None
        core = self._core
        try:
            while True:
                position = member.position
                assert position is not None
                result = await self._read_retrying(member, position)
                if result is None or _left(member):
                    return
                replay = core.history(handler, result, page_size=_RESUME_PAGE)
                resync = replay.resync
                if resync is not None:
                    assert member._resume is not None
                    member._resume.gap = result
                    if not self._resync(member, resync.policy, resync.head, resync.reason):
                        return
                for message in replay.messages:
                    await writer.send(self._encode_incoming(message))
                    assert member._resume is not None
                    member._resume.replayed += 1
                    if _left(member):
                        return
                if replay.more:
                    continue  # more history to read
                entries = core.go_live(handler)
                if entries is not None:
                    break
                if _left(member):
                    return
                # The buffer overflowed or does not join history: read history again.
            # Live from here on: no await, so nothing can slip in between.
            for _message, (encoded, excluded) in entries:
                if excluded is not None and handler in excluded:
                    continue
                if writer.send_nowait(encoded) is SendResult.CLOSED:
                    self._remove(handler, closed=True)
                    return
        except asyncio.CancelledError:
            raise
        except BackendError as exc:
            log.error(
                "group %r: resuming a member failed: %r",
                self.name,
                exc,
                extra=log_fields(handler, topic=self.name),
            )
            self._remove(handler, closed=False)
            if not _connection_gone(handler):
                handler.close(int(CloseCode.INTERNAL_ERROR), "backend unavailable")
        except LongConnError:
            self._remove(handler, closed=True)
        except Exception:
            log.exception(
                "group %r: resuming a member failed",
                self.name,
                extra=log_fields(handler, topic=self.name),
            )
            self._remove(handler, closed=False)
            if not _connection_gone(handler):
                handler.close(int(CloseCode.INTERNAL_ERROR), "resume failed")

    async def _read_retrying(self, member: Membership, position: Cursor) -> SinceResult | None:
        """Subscribe the group and read history after ``position`` for a resuming member.

        A :class:`~tornado_longconn.exceptions.BackendUnavailableError` is tried
        again (:data:`_RESUME_RETRIES` times, jittered backoff) while the member
        stays; then it is raised. None when the member left while waiting.
        """

        async def read() -> SinceResult | None:
            if backoff.attempt and _left(member):
                return None  # left while waiting to try again
            await self._ensure_subscribed()
            return await self._read(position)

        def retrying(exc: BackendUnavailableError, delay: float) -> None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "group %r: resume read unavailable (%r), attempt %d in %.2f s",
                    self.name,
                    exc,
                    backoff.attempt,
                    delay,
                    extra=log_fields(member.handler, topic=self.name),
                )

        backoff = ReconnectBackoff(_RESUME_RETRY_BASE, _RESUME_RETRY_CAP)
        return await retry_unavailable(
            read,
            retries=_RESUME_RETRIES,
            backoff=backoff,
            give_up=lambda: self._closed,
            on_retry=retrying,
        )

    def _resync(
        self, member: Membership, policy: GapPolicy, head: Cursor | None, reason: str
    ) -> bool:
        """Tell one member to resync as ``policy`` says; True when it stays a member."""
        self._resyncs += 1
        if policy is GapPolicy.NOTICE and member.writer is not None:
            build = self.options.notice or resync_notice
            notice = Encoded(OP_TEXT, build(self.name, head, reason).encode("utf-8"))
            if member.writer.send_nowait(notice) is not SendResult.CLOSED:
                return True
            self._remove(member.handler, closed=True)
            return False
        self._remove(member.handler, closed=False)
        _close_member(member, int(CloseCode.RESYNC_REQUIRED), f"resync required: {reason}"[:120])
        return False

    def on_gap(self, topic: str, reason: str) -> None:
        """Backend callback: messages may have been missed; members resync per ``gap_policy``.

        Members still replaying history re-read it (history covers the gap when
        it reaches back). Live members get the resync notice, or are closed with
        :attr:`CloseCode.RESYNC_REQUIRED` in jittered batches. Never raises.
        """
        try:
            self._gaps += 1
            resync = self._core.backend_gap(reason)
            live = list(resync.members)
            if not live:
                return
            if resync.keeps_members:
                for member in live:
                    self._resync(member, resync.policy, None, reason)
                return
            self._resyncs += len(live)
            for member in live:
                self._remove(member.handler, closed=False)
            self._spawn(
                _close_in_batches(
                    live,
                    int(CloseCode.RESYNC_REQUIRED),
                    f"resync required: {reason}"[:120],
                    self.close_batch,
                    self.close_spread,
                )
            )
        except Exception:
            log.exception(
                "group %r: handling a gap failed", self.name, extra=log_fields(topic=self.name)
            )

    # ------------------------------------------------------------------ stats, close

    def stats(self) -> BroadcastStats:
        """A snapshot of the group's counters (:class:`BroadcastStats`).

        ``max_buffered``/``peak_buffered`` walk the members' writers: cheap, but
        O(members), so do not call it per message.
        """
        max_buffered = peak = 0
        core = self._core
        for member in core.members():
            writer = member.writer
            if writer is None:
                continue
            buffered = writer.buffered
            if buffered > max_buffered:
                max_buffered = buffered
            writer_peak = _peak_buffered(writer)
            if writer_peak > peak:
                peak = writer_peak
        return BroadcastStats(
            groups=1,
            members=len(core),
            resuming=core.resuming,
            joined=self._joined,
            left=self._left,
            published=self._published,
            received=self._received,
            delivered=self._delivered,
            frames=self._delivered,
            bytes=self._bytes,
            dropped=self._dropped,
            closed=self._closed_members,
            closed_slow=self._closed_slow,
            resyncs=self._resyncs,
            gaps=self._gaps,
            max_buffered=max_buffered,
            peak_buffered=peak,
        )

    async def close(
        self,
        code: int = CloseCode.GOING_AWAY,
        reason: str = "going away",
        *,
        batch_size: int | None = None,
        spread: float | None = None,
        close_connections: bool = True,
    ) -> None:
        """Close every member's connection and stop the group (graceful shutdown).

        Members leave at once; their connections are closed with ``code``
        (default 1001, going away) and ``reason`` in batches of ``batch_size``
        (default ``close_batch``), with random pauses that spread the batches over
        about ``spread`` seconds (default ``close_spread``), so that thousands of
        clients do not reconnect in the same instant. Pending messages are
        flushed before each close frame. Later joins are refused (the connection
        is closed with the same code); :meth:`publish` still reaches other
        processes. Idempotent; returns when every close frame was sent.

        ``close_connections=False`` makes the members leave without closing their
        connections, for a caller that closes them itself (this is how
        :meth:`BroadcastHub.close` closes a connection that is in several groups
        once, batched across the hub).
        """
        if not self._closed:
            self._closed = True
            self._close_code = int(code)
            self._close_reason = reason
        members = self._core.members()
        for member in members:
            self._remove(member.handler, closed=False)
        if close_connections:
            await _close_in_batches(
                members,
                int(code),
                reason,
                self.close_batch if batch_size is None else batch_size,
                self.close_spread if spread is None else spread,
            )
        if self._subscribed:
            self._sync_subscription()
        # Let closes already under way (a backend gap) and the unsubscribe finish.
        current = _current_task()
        pending = [t for t in self._tasks if t is not current and not t.done()]
        if pending:
            await asyncio.wait(pending)


def _left(member: Membership) -> bool:
    # A function, not ``not member.active`` inline: mypy would keep that narrowed
    # across the awaits in between, where the member may leave.
    return not member.active


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _closed_as_slow(writer: BackpressureWriter) -> bool:
    try:
        return bool(writer.stats().closed_slow)
    except AttributeError:
        return False


def _peak_buffered(writer: BackpressureWriter) -> int:
    try:
        return int(writer.stats().peak_buffered)
    except AttributeError:
        return int(writer.buffered)


def _close_member(member: Membership, code: int, reason: str) -> None:
    handler = member.handler
    try:
        writer = member.writer
        if writer is not None:
            writer.close(code, reason)
        elif not _connection_gone(handler):
            handler.close(code, reason)
    except Exception:
        log.exception("closing %r failed", handler, extra=log_fields(handler))


async def _close_in_batches(
    members: list[Membership], code: int, reason: str, batch_size: int, spread: float
) -> None:
    """Close members ``batch_size`` at a time, pausing a random share of ``spread``."""
    if not members:
        return
    batch_size = max(1, batch_size)
    batches = [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    mean_pause = spread / len(batches) if spread > 0 else 0.0
    rng = random.Random()
    for index, batch in enumerate(batches):
        if index and mean_pause > 0:
            await asyncio.sleep(rng.uniform(0.0, 2.0 * mean_pause))
        for member in batch:
            _close_member(member, code, reason)


class BroadcastHub:
    """The registry of an application's groups, and the backend they share.

    Create one per application, hand it to handlers through ``initialize()``
    keyword arguments or the application setting :data:`SETTINGS_KEY`
    (``"longconn_hub"``, read back with :meth:`BroadcastHub.of`), and close it
    on shutdown::

        hub = BroadcastHub()                       # in-memory backend
        app = tornado.web.Application([(r"/ws", Chat, {"hub": hub})])
        ...
        await hub.close()                          # 1001 to every member, in batches

    ``backend`` defaults to a new :class:`~tornado_longconn.backends.MemoryBackend`
    (then :meth:`close` closes it too; a backend you pass in is yours to close).
    The other keyword arguments are the defaults of every group the hub makes
    (see :class:`BroadcastGroup`), resolved once into :attr:`defaults` (a
    :class:`GroupOptions`; ``ValueError`` when one is invalid).
    ``max_idle_groups`` (default 1,000) bounds how
    many groups without members the registry keeps: beyond it the longest-idle
    one is forgotten (objects still referenced keep working; :meth:`group` then
    makes a new one for that name).
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        history: int | HistoryLimit | None = None,
        policy: OverflowPolicy = OverflowPolicy.CLOSE,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        max_queue: int | None = None,
        gap_policy: GapPolicy = GapPolicy.CLOSE,
        envelope: Envelope | None = None,
        close_batch: int = DEFAULT_CLOSE_BATCH,
        close_spread: float = DEFAULT_CLOSE_SPREAD,
        max_idle_groups: int = 1000,
    ) -> None:
        #: The defaults of every group the hub makes, validated once (:class:`GroupOptions`).
        self.defaults = GroupOptions(
            history=_history_limit(history),
            policy=policy,
            high_water=high_water,
            low_water=low_water,
            max_queue=max_queue,
            gap_policy=gap_policy,
            envelope=envelope,
            close_batch=close_batch,
            close_spread=close_spread,
        )
        self._owns_backend = backend is None
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        if max_idle_groups < 0:
            raise ValueError(f"max_idle_groups must be >= 0, got {max_idle_groups}")
        self.max_idle_groups = max_idle_groups
        self._groups: dict[str, BroadcastGroup] = {}
        self._idle_groups: OrderedDict[str, None] = OrderedDict()
        self._retired = BroadcastStats()
        self._closed = False

    def __repr__(self) -> str:
        return f"<BroadcastHub groups={len(self._groups)} backend={self.backend!r}>"

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[BroadcastGroup]:
        return iter(list(self._groups.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._groups

    @property
    def history(self) -> HistoryLimit | None:
        """The groups' default history (``defaults.history``)."""
        return self.defaults.history

    @property
    def policy(self) -> OverflowPolicy:
        """The groups' default overflow policy (``defaults.policy``)."""
        return self.defaults.policy

    @property
    def high_water(self) -> int:
        """The groups' default writer high-water mark (``defaults.high_water``)."""
        return self.defaults.high_water

    @property
    def low_water(self) -> int | None:
        """The groups' default writer low-water mark (``defaults.low_water``)."""
        return self.defaults.low_water

    @property
    def max_queue(self) -> int | None:
        """The groups' default writer queue limit (``defaults.max_queue``)."""
        return self.defaults.max_queue

    @property
    def gap_policy(self) -> GapPolicy:
        """The groups' default gap policy (``defaults.gap_policy``)."""
        return self.defaults.gap_policy

    @property
    def envelope(self) -> Envelope | None:
        """The groups' default envelope (``defaults.envelope``)."""
        return self.defaults.envelope

    @property
    def close_batch(self) -> int:
        """Connections closed per batch by :meth:`close` (``defaults.close_batch``)."""
        return self.defaults.close_batch

    @property
    def close_spread(self) -> float:
        """Seconds over which :meth:`close` spreads its batches (``defaults.close_spread``)."""
        return self.defaults.close_spread

    @staticmethod
    def of(source: tornado.web.RequestHandler | tornado.web.Application) -> BroadcastHub:
        """The hub stored in application settings under :data:`SETTINGS_KEY`.

        ``source`` is a handler or an ``Application``. Raises ``LookupError`` when
        the setting is missing (add ``longconn_hub=BroadcastHub()`` to the
        ``Application``'s keyword arguments).
        """
        app = getattr(source, "application", source)
        hub = app.settings.get(SETTINGS_KEY)
        if not isinstance(hub, BroadcastHub):
            raise LookupError(
                f"no BroadcastHub in the application settings: pass {SETTINGS_KEY}=BroadcastHub() "
                "to tornado.web.Application"
            )
        return hub

    def group(self, name: str, **options: Any) -> BroadcastGroup:
        """The group called ``name``, created on first use with the hub's defaults.

        ``options`` (``history``, ``policy``, ``high_water``, ``low_water``,
        ``max_queue``, ``gap_policy``, ``envelope``, ``close_batch``,
        ``close_spread``, ``notice``) override the hub's defaults when the group is created;
        asking again for an existing group with an option that differs from it
        raises ``ValueError``, so two handlers cannot silently disagree.
        """
        group = self._groups.get(name)
        if group is None:
            return BroadcastGroup(name, hub=self, **options)
        if options:
            current = group.options
            for key, mine, asked in current.differences(current.merged(**options)):
                raise ValueError(f"group {name!r} exists with {key}={mine!r}, not {asked!r}")
        return group

    def get(self, name: str) -> BroadcastGroup | None:
        """The group called ``name`` if the hub has it, else None (never creates)."""
        return self._groups.get(name)

    def _register(self, group: BroadcastGroup) -> None:
        if group.name in self._groups:
            raise ValueError(f"the hub already has a group named {group.name!r}")
        self._groups[group.name] = group
        self._idle(group)

    def _idle(self, group: BroadcastGroup) -> None:
        """``group`` has no members now: remember it, forget the longest idle beyond the limit."""
        if self._groups.get(group.name) is not group:
            return
        idle = self._idle_groups
        idle[group.name] = None
        idle.move_to_end(group.name)
        while len(idle) > self.max_idle_groups:
            name, _ = idle.popitem(last=False)
            old = self._groups.get(name)
            if old is None:
                continue
            if len(old):
                continue  # busy again; it comes back here when it is idle
            del self._groups[name]
            self._retired = sum_stats([self._retired, counters_only(old.stats())])

    async def start(self) -> None:
        """Start the backend (connect to Redis, ...). Optional: groups start it on first join."""
        await self.backend.start()

    def stats(self) -> BroadcastStats:
        """Every group's snapshot added up (:func:`~tornado_longconn.stats.sum_stats`).

        Counters include the groups forgotten while idle; gauges and peaks describe
        the groups the hub holds now. O(members): do not call it per message.
        """
        return sum_stats((group.stats() for group in self._groups.values()), start=self._retired)

    async def close(
        self,
        code: int = CloseCode.GOING_AWAY,
        reason: str = "going away",
        *,
        batch_size: int | None = None,
        spread: float | None = None,
    ) -> None:
        """Close every group (see :meth:`BroadcastGroup.close`), then the backend if the hub made it.

        Connections that belong to several groups are closed once; batches and
        jitter (``batch_size``, ``spread``, defaulting to the hub's
        ``close_batch`` / ``close_spread``) apply across the whole hub.
        Idempotent.
        """
        self._closed = True
        members: dict[WebSocketHandler, Membership] = {}
        for group in list(self._groups.values()):
            # Collected right before the group closes: its close removes them at once.
            for handler in group:
                member = group.membership(handler)
                if member is not None:
                    members.setdefault(handler, member)
            await group.close(code, reason, close_connections=False)
        defaults = self.defaults
        await _close_in_batches(
            list(members.values()),
            int(code),
            reason,
            defaults.close_batch if batch_size is None else batch_size,
            defaults.close_spread if spread is None else spread,
        )
        if self._owns_backend:
            await self.backend.close()
