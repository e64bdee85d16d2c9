"""Process-level garbage-collector tuning for servers holding many connections.

Python's cyclic garbage collector rescans every long-lived object on each full
collection. A server holding 10,000+ idle connections keeps a few objects per
connection alive for hours, and those rescans become the largest part of its
idle CPU (``benchmarks/results/heartbeat.md``: 3.4 s of 7.8 s). Freezing
(:func:`gc.freeze`) moves the objects alive at that moment out of the
collector's sight, so full collections only look at what is new.

The trade-off: an object caught in a reference cycle after it was frozen is not
reclaimed until it is unfrozen. Objects freed by reference counting are freed
at once either way, and a closed connection is: neither Tornado's objects nor
this library's are left in a cycle (the test suite checks it with the collector
off). So by default nothing is ever collected among frozen objects, and there is
no pause that grows with the number of connections. An application that makes
reference cycles of its own can bound what they hold with ``collect_interval``:
one full collection every that many seconds (``gc.unfreeze(); gc.collect();
gc.freeze()``), a pause of about 0.07 s per 1,000 connections held on CPython 3.11
(0.35 s at 5,000 in ``benchmarks/results/broadcast.md``).

Call :func:`tune_gc` once at start-up, in the process that serves connections
(after forking, if you fork)::

    tornado_longconn.tune_gc()       # freeze after heartbeat ticks (1/s); never collect them
    tornado_longconn.tune_gc(collect_interval=600)   # ... and a full collection every 10 min
    ...
    tornado_longconn.untune_gc()     # hand frozen objects back to the collector

The freezing runs after a tick of the heartbeat scheduler
(:class:`~tornado_longconn.heartbeat.HeartbeatScheduler`), at most once a
second: with no heartbeat connections, nothing is frozen. The tuning never
undoes a freeze it did not make: if anything else froze objects before
:func:`tune_gc`, it never unfreezes -- no periodic collection and no unfreeze in
:func:`untune_gc` -- and :func:`gc_tuning_stats` says so. With
``collect_interval`` it also notices a freeze made in between (each of its
freezes then counts the frozen objects, a walk of them all); without one it does
not count, and :func:`untune_gc` unfreezes everything unless a freeze came first.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

from .stats import COUNTER, FLAG, GAUGE, PEAK

__all__ = ["GCTuningStats", "gc_tuning_stats", "tune_gc", "untune_gc"]


@dataclass(frozen=True, slots=True)
class GCTuningStats:
    """A snapshot of the process's GC tuning (see :func:`gc_tuning_stats`).

    Several processes' snapshots add up with :func:`~tornado_longconn.stats.sum_stats`
    (``collect_interval`` then is the longest).
    """

    #: Whether :func:`tune_gc` is in effect (flag).
    active: bool = field(metadata=FLAG)
    #: Seconds between periodic full collections (None when not active or when it
    #: never collects, the default; a peak).
    collect_interval: float | None = field(metadata=PEAK)
    #: ``gc.freeze()`` calls made by the tuning since it was turned on (counter).
    freezes: int = field(metadata=COUNTER)
    #: Periodic full collections run by the tuning (counter).
    collections: int = field(metadata=COUNTER)
    #: Objects in the permanent generation now (``gc.get_freeze_count()``; gauge).
    frozen_objects: int = field(metadata=GAUGE)
    #: True once something else froze objects: the tuning then never unfreezes (flag).
    foreign_freeze: bool = field(metadata=FLAG)


#: Seconds between two freezes (each counts the frozen objects, an O(n) walk).
_FREEZE_EVERY = 1.0


class _Tuner:
    """The process's tuning state; one instance while :func:`tune_gc` is in effect."""

    __slots__ = (
        "collect_interval",
        "collections",
        "foreign",
        "freeze_at",
        "freezes",
        "last_count",
        "next_at",
    )

    def __init__(self, collect_interval: float | None, now: float) -> None:
        self.collect_interval = collect_interval
        self.next_at = math.inf if collect_interval is None else now + collect_interval
        self.freeze_at = now
        self.freezes = 0
        self.collections = 0
        # Objects frozen before we start are someone else's: never unfreeze them.
        self.last_count = gc.get_freeze_count()
        self.foreign = self.last_count > 0

    def set_interval(self, collect_interval: float | None, now: float) -> None:
        self.collect_interval = collect_interval
        self.next_at = math.inf if collect_interval is None else now + collect_interval

    def after_tick(self, now: float) -> None:
        # gc.get_freeze_count() walks every frozen object (24 ms for a million on
        # CPython 3.11): called on every tick (20 a second) it took the whole loop
        # at 10,000 connections. Freeze (and count) at most once per _FREEZE_EVERY.
        if now < self.freeze_at:
            return
        self.freeze_at = now + _FREEZE_EVERY
        if self.collect_interval is None:
            # Nothing to unfreeze before untune_gc(): no counting (two walks of every
            # frozen object, about 50 ms a second at 10,000 connections).
            gc.freeze()
            self.freezes += 1
            return
        if gc.get_freeze_count() > self.last_count:
            self.foreign = True  # someone froze objects since our last freeze
        if not self.foreign and now >= self.next_at:
            assert self.collect_interval is not None  # next_at is inf without one
            self.next_at = now + self.collect_interval
            gc.unfreeze()
            gc.collect()
            self.collections += 1
        gc.freeze()
        self.freezes += 1
        self.last_count = gc.get_freeze_count()


_tuner: _Tuner | None = None


def tune_gc(*, collect_interval: float | None = None) -> None:
    """Turn on GC tuning for this PROCESS (see the module docs for the trade-off).

    After a heartbeat scheduler tick, at most once a second, ``gc.freeze()``. With
    ``collect_interval`` (seconds), one full collection of frozen objects too, that
    often; by default (``None``) never: closed connections are freed by reference
    counting, and a full collection pauses the loop for a time that grows with the
    connections held. Calling it again only changes ``collect_interval``. Raises
    ``ValueError`` for a non-positive or non-finite interval. Undo with
    :func:`untune_gc`.
    """
    global _tuner
    if collect_interval is not None and (
        isinstance(collect_interval, bool)
        or not isinstance(collect_interval, (int, float))
        or not math.isfinite(collect_interval)
        or collect_interval <= 0
    ):
        raise ValueError(f"collect_interval must be None or > 0 seconds, got {collect_interval!r}")
    interval = None if collect_interval is None else float(collect_interval)
    if _tuner is None:
        _tuner = _Tuner(interval, time.monotonic())
    else:
        _tuner.set_interval(interval, time.monotonic())


def untune_gc() -> None:
    """Turn GC tuning off and hand the objects it froze back to the collector.

    When something else also froze objects (``foreign_freeze``), nothing is
    unfrozen: ``gc.unfreeze()`` cannot tell their objects from ours. A no-op
    when the tuning is off.
    """
    global _tuner
    tuner, _tuner = _tuner, None
    if tuner is None or tuner.foreign:
        return
    if tuner.collect_interval is None or gc.get_freeze_count() <= tuner.last_count:
        gc.unfreeze()


def _tuning_active() -> bool:
    """True while :func:`tune_gc` is in effect (without counting frozen objects)."""
    return _tuner is not None


def gc_tuning_stats() -> GCTuningStats:
    """The tuning's counters now (a frozen snapshot)."""
    tuner = _tuner
    if tuner is None:
        return GCTuningStats(False, None, 0, 0, gc.get_freeze_count(), False)
    return GCTuningStats(
        True,
        tuner.collect_interval,
        tuner.freezes,
        tuner.collections,
        gc.get_freeze_count(),
        tuner.foreign
        or (tuner.collect_interval is not None and gc.get_freeze_count() > tuner.last_count),
    )


def after_tick() -> None:
    """Called by the heartbeat scheduler after each tick; a no-op when the tuning is off."""
    tuner = _tuner
    if tuner is not None:
        tuner.after_tick(time.monotonic())
