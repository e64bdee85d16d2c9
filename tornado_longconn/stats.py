"""One shape for every part's counters: ``stats()`` returns a frozen snapshot.

The convention, kept by every part of the library (writer, group, hub,
heartbeat, long-poll, server, early answers, strict WebSocket, upload store,
backend, GC tuning):

* a part keeps its live counters private and mutable, updated where the event
  happens (never more than an integer increment, never per member for
  observability);
* its ``stats()`` method (or a module function such as
  :func:`~tornado_longconn.heartbeat.heartbeat_stats` for an application-wide
  part) builds a **frozen, slotted dataclass** snapshot from them when it is
  called: plain numbers, strings, booleans, ``None`` and tuples only, safe to
  keep, compare, hash, and hand to another thread;
* every field declares its *kind* in its metadata (``field(metadata=COUNTER)``),
  which says how snapshots add up (:func:`sum_stats`) and which metric type it
  is (a counter only grows; the others are gauges).

The kinds and how :func:`sum_stats` combines a field across snapshots:

========== ======================================================= ==============================
kind       meaning                                                  combined by
========== ======================================================= ==============================
COUNTER    a total since the part was created; only grows           sum
GAUGE      a level right now (connections, bytes buffered)          sum
PEAK       a largest-of value (a high-water mark, a latency         max; ``None`` values are
           percentile, a setting that may differ)                   skipped (all ``None``: ``None``)
FLAG       a boolean                                                any
LABEL      a string or tuple naming what was counted                must be equal, else ``ValueError``
TALLY      counts per key: a tuple of ``(key, count)`` pairs         summed per key, sorted by key
           sorted by key
========== ======================================================= ==============================

``None`` in a COUNTER or GAUGE field means "not counted by this part" (for
example the in-memory backend does not count per message): it is skipped, and
the sum of only ``None`` values is ``None``. The maximum of several latency
percentiles is not the percentile of the pooled samples, but it is an upper
bound of it (the pooled q-quantile lies between the smallest and largest of
the parts' q-quantiles), so summed percentiles err on the safe side.

Example: the totals of many writers, and of two processes' hubs::

    from tornado_longconn import stats_dict, sum_stats

    total = sum_stats(writer.stats() for writer in writers)  # ValueError if there are none
    everywhere = sum_stats([hub.stats(), other_process_hub_stats])
    self.write(stats_dict(everywhere))  # JSON-ready

Fields of a dataclass with no declared kind are combined by their values:
booleans as FLAG, numbers as COUNTER, anything else as LABEL.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeVar

__all__ = [
    "COUNTER",
    "FLAG",
    "GAUGE",
    "LABEL",
    "PEAK",
    "TALLY",
    "StatKind",
    "Stats",
    "counters_only",
    "stat_kinds",
    "stats_dict",
    "sum_stats",
]


class StatKind(enum.Enum):
    """What a snapshot field measures, and so how :func:`sum_stats` combines it."""

    #: A total since the part was created; only grows. Summed.
    COUNTER = "counter"
    #: A level right now. Summed.
    GAUGE = "gauge"
    #: A largest-of value (high-water mark, percentile, setting). Maximum, ``None`` skipped.
    PEAK = "peak"
    #: A boolean. Any.
    FLAG = "flag"
    #: A name or setting that must be the same in every snapshot summed.
    LABEL = "label"
    #: Counts per key, as a tuple of ``(key, count)`` pairs sorted by key. Summed per key.
    TALLY = "tally"


#: The metadata key under which a field's :class:`StatKind` is stored.
KIND_KEY: Final = "tornado_longconn.stat"

#: ``field(metadata=COUNTER)``: the field is a :attr:`StatKind.COUNTER`.
COUNTER: Final[Mapping[str, StatKind]] = MappingProxyType({KIND_KEY: StatKind.COUNTER})
#: ``field(metadata=GAUGE)``: the field is a :attr:`StatKind.GAUGE`.
GAUGE: Final[Mapping[str, StatKind]] = MappingProxyType({KIND_KEY: StatKind.GAUGE})
#: ``field(metadata=PEAK)``: the field is a :attr:`StatKind.PEAK`.
PEAK: Final[Mapping[str, StatKind]] = MappingProxyType({KIND_KEY: StatKind.PEAK})
#: ``field(metadata=FLAG)``: the field is a :attr:`StatKind.FLAG`.
FLAG: Final[Mapping[str, StatKind]] = MappingProxyType({KIND_KEY: StatKind.FLAG})
#: ``field(metadata=LABEL)``: the field is a :attr:`StatKind.LABEL`.
LABEL: Final[Mapping[str, StatKind]] = MappingProxyType({KIND_KEY: StatKind.LABEL})
#: ``field(metadata=TALLY)``: the field is a :attr:`StatKind.TALLY`.
TALLY: Final[Mapping[str, StatKind]] = MappingProxyType({KIND_KEY: StatKind.TALLY})

S = TypeVar("S")


class Stats(Protocol):
    """A part that reports its counters: ``stats()`` returns a frozen dataclass snapshot."""

    def stats(self) -> Any:
        """A new snapshot of the part's counters, built now."""


_KINDS: dict[type, tuple[tuple[str, StatKind | None], ...]] = {}


def _kinds(cls: type) -> tuple[tuple[str, StatKind | None], ...]:
    kinds = _KINDS.get(cls)
    if kinds is None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"a stats snapshot must be a dataclass instance, not a {cls.__name__}")
        fields = dataclasses.fields(cls)
        kinds = _KINDS[cls] = tuple((f.name, f.metadata.get(KIND_KEY)) for f in fields if f.init)
    return kinds


def stat_kinds(snapshot_or_class: object) -> dict[str, StatKind | None]:
    """The declared :class:`StatKind` of each field of a snapshot class (``None``: undeclared).

    Raises :class:`TypeError` for something that is not a dataclass or an instance of one.
    """
    cls = snapshot_or_class if isinstance(snapshot_or_class, type) else type(snapshot_or_class)
    return dict(_kinds(cls))


def _infer(value: object) -> StatKind:
    if isinstance(value, bool):
        return StatKind.FLAG
    if isinstance(value, (int, float)):
        return StatKind.COUNTER
    return StatKind.LABEL


def _combine(cls: type, name: str, kind: StatKind | None, values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if kind is None:
        kind = _infer(present[0]) if present else StatKind.LABEL
    if kind is StatKind.LABEL:
        first = values[0]
        for value in values[1:]:
            if value != first:
                raise ValueError(
                    f"cannot sum {cls.__name__} snapshots: {name} differs ({first!r} != {value!r})"
                )
        return first
    if not present:
        return None
    if kind is StatKind.COUNTER or kind is StatKind.GAUGE:
        return sum(present[1:], present[0])
    if kind is StatKind.PEAK:
        return max(present)
    if kind is StatKind.FLAG:
        return any(present)
    totals: dict[Any, int] = {}
    for pairs in present:
        for key, count in pairs:
            totals[key] = totals.get(key, 0) + count
    return tuple(sorted(totals.items()))


def sum_stats(snapshots: Iterable[S], *, start: S | None = None) -> S:
    """Add up snapshots of ONE stats class (many writers, many groups, several processes).

    Each field is combined by its :class:`StatKind` (see the module docs):
    counters and gauges are summed, peaks take the maximum, flags any, tallies
    add per key, labels must be equal. ``None`` is "not counted" and skipped.
    ``start`` (if given) is summed first, and is the answer when ``snapshots``
    is empty. Returns a new snapshot of the same class; a single snapshot comes
    back equal to itself.

    Raises :class:`ValueError` when there is nothing to sum (no snapshots and
    no ``start``) or a LABEL field differs, and :class:`TypeError` when the
    snapshots are not all instances of one dataclass.

    >>> from tornado_longconn import WriterStats
    >>> a = WriterStats(3, 30, 0, 1, 64, False, 0, 0, 2)
    >>> b = WriterStats(5, 50, 1, 0, 96, True, 1, 16, 4)
    >>> total = sum_stats([a, b])
    >>> total.messages_sent, total.peak_buffered, total.closed_slow, total.buffered
    (8, 96, True, 16)
    """
    items = list(snapshots)
    if start is not None:
        items.insert(0, start)
    if not items:
        raise ValueError("sum_stats() of no snapshots: pass start= for an empty sum")
    cls = type(items[0])
    kinds = _kinds(cls)
    for item in items:
        if type(item) is not cls:
            raise TypeError(
                f"sum_stats() needs snapshots of one class: {cls.__name__} and {type(item).__name__}"
            )
    if len(items) == 1:
        return items[0]
    values = {
        name: _combine(cls, name, kind, [getattr(item, name) for item in items])
        for name, kind in kinds
    }
    result: S = cls(**values)
    return result


def counters_only(snapshot: S) -> S:
    """A copy of ``snapshot`` that keeps only what has accumulated: the totals of a part that is gone.

    COUNTER, TALLY and LABEL fields are kept; GAUGE and PEAK fields become 0
    (``None`` stays ``None``, a float becomes 0.0) and FLAG fields ``False``. A
    parent that forgets a child (a hub dropping an idle group) adds this to its
    own totals with :func:`sum_stats`, so its counters never go backwards while
    its levels describe only the children still there. Raises
    :class:`TypeError` for something that is not a dataclass instance.
    """
    cls = type(snapshot)
    changes: dict[str, Any] = {}
    for name, kind in _kinds(cls):
        value = getattr(snapshot, name)
        if kind is None:
            kind = _infer(value) if value is not None else StatKind.LABEL
        if value is None:
            continue
        if kind is StatKind.GAUGE or kind is StatKind.PEAK:
            changes[name] = type(value)(0)
        elif kind is StatKind.FLAG:
            changes[name] = False
    result: S = dataclasses.replace(snapshot, **changes)  # type: ignore[type-var]
    return result


def stats_dict(snapshot: object) -> dict[str, Any]:
    """``snapshot`` as a plain dict for a JSON endpoint: one key per field, in field order.

    TALLY fields become dicts (``{key: count}``); other values are kept as they
    are (``json.dumps`` writes tuples as lists). Raises :class:`TypeError` for
    something that is not a dataclass instance.

    >>> from tornado_longconn import WriterStats
    >>> stats_dict(WriterStats(3, 30, 0, 1, 64, False, 0, 0, 2))["messages_sent"]
    3
    """
    kinds = _kinds(type(snapshot))
    return {
        name: dict(getattr(snapshot, name)) if kind is StatKind.TALLY else getattr(snapshot, name)
        for name, kind in kinds
    }
