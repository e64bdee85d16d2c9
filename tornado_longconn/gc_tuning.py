"""Process-level garbage-collector tuning for servers holding many connections.

Python's cyclic garbage collector rescans every long-lived object on each full
collection. A server holding 10,000+ idle connections keeps a few objects per
connection alive for hours, and those rescans become the largest part of its
idle CPU (``benchmarks/results/heartbeat.md``: 3.4 s of 7.8 s). Freezing
(:func:`gc.freeze`) moves the objects alive at that moment out of the
collector's sight, so full collections only look at what is new.

The trade-off: an object caught in a reference cycle after it was frozen is not
reclaimed until it is unfrozen. Objects freed by reference counting (a closed
connection whose cycles Tornado and this library break) are freed at once
either way. To bound what frozen cycles can hold, the tuning runs one full
collection every ``collect_interval`` seconds (``gc.unfreeze(); gc.collect();
gc.freeze()``), whose pause grows with the number of live objects. Measure
before turning it on.

Call :func:`tune_gc` once at start-up, in the process that serves connections
(after forking, if you fork)::

    tornado_longconn.tune_gc()       # freeze after heartbeat ticks (1/s), collect every 60 s
    ...
    tornado_longconn.untune_gc()     # hand frozen objects back to the collector

The freezing runs after a tick of the heartbeat scheduler
(:class:`~tornado_longconn.heartbeat.HeartbeatScheduler`), at most once a
second (each freeze counts the frozen objects, a walk of them all): with no
heartbeat connections, nothing is frozen. The tuning never undoes a freeze it did not
make: if anything else froze objects (before :func:`tune_gc` or in between),
it stops unfreezing -- no periodic collection and no unfreeze in
:func:`untune_gc` -- and :func:`gc_tuning_stats` says so.
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
    #: Seconds between periodic full collections (None when not active; a peak).
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

    def __init__(self, collect_interval: float, now: float) -> None:
        self.collect_interval = collect_interval
        self.next_at = now + collect_interval
        self.freeze_at = now
        self.freezes = 0
        self.collections = 0
        # Objects frozen before we start are someone else's: never unfreeze them.
        self.last_count = gc.get_freeze_count()
        self.foreign = self.last_count > 0

    def after_tick(self, now: float) -> None:
        # gc.get_freeze_count() walks every frozen object (24 ms for a million on
        # CPython 3.11): called on every tick (20 a second) it took the whole loop
        # at 10,000 connections. Freeze (and count) at most once per _FREEZE_EVERY.
        if now < self.freeze_at:
            return
        self.freeze_at = now + _FREEZE_EVERY
        if gc.get_freeze_count() > self.last_count:
            self.foreign = True  # someone froze objects since our last freeze
        if not self.foreign and now >= self.next_at:
            self.next_at = now + self.collect_interval
            gc.unfreeze()
            gc.collect()
            self.collections += 1
        gc.freeze()
        self.freezes += 1
        self.last_count = gc.get_freeze_count()


_tuner: _Tuner | None = None


def tune_gc(*, collect_interval: float = 60.0) -> None:
    """Turn on GC tuning for this PROCESS (see the module docs for the trade-off).

    After a heartbeat scheduler tick, at most once a second, ``gc.freeze()``; every
    ``collect_interval`` seconds (default 60), one full collection of frozen
    objects too. Calling it again only changes ``collect_interval``. Raises
    ``ValueError`` for a non-positive or non-finite interval. Undo with
    :func:`untune_gc`.
    """
    global _tuner
    if (
        isinstance(collect_interval, bool)
        or not isinstance(collect_interval, (int, float))
        or not math.isfinite(collect_interval)
        or collect_interval <= 0
    ):
        raise ValueError(f"collect_interval must be > 0 seconds, got {collect_interval!r}")
    if _tuner is None:
        _tuner = _Tuner(float(collect_interval), time.monotonic())
    else:
        _tuner.collect_interval = float(collect_interval)


def untune_gc() -> None:
    """Turn GC tuning off and hand the objects it froze back to the collector.

    When something else also froze objects (``foreign_freeze``), nothing is
    unfrozen: ``gc.unfreeze()`` cannot tell their objects from ours. A no-op
    when the tuning is off.
    """
    global _tuner
    tuner, _tuner = _tuner, None
    if tuner is not None and not tuner.foreign and gc.get_freeze_count() <= tuner.last_count:
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
        tuner.foreign or gc.get_freeze_count() > tuner.last_count,
    )


def after_tick() -> None:
    """Called by the heartbeat scheduler after each tick; a no-op when the tuning is off."""
    tuner = _tuner
    if tuner is not None:
        tuner.after_tick(time.monotonic())
