"""Fixed-bucket latency histograms: one list increment per observation.

A part that times something once per heartbeat answer or once per backend
publish (never once per member delivery) keeps a :class:`LatencyHistogram`:
:meth:`~LatencyHistogram.observe` finds the bucket with :func:`bisect.bisect_left`
and adds one to it, plus the value to a running sum. Its
:meth:`~LatencyHistogram.stats` snapshot (:class:`HistogramStats`) follows the
:mod:`tornado_longconn.stats` convention, so snapshots of several processes add
up with :func:`~tornado_longconn.stats.sum_stats`, and
:mod:`tornado_longconn.metrics` turns one into a Prometheus histogram
(cumulative ``_bucket``, ``_sum``, ``_count``).

>>> h = LatencyHistogram((0.01, 0.1, 1.0))
>>> for seconds in (0.005, 0.01, 0.05, 2.0):
...     h.observe(seconds)
>>> h.stats().buckets
((0.01, 2), (0.1, 1), (1.0, 0), (inf, 1))
>>> h.stats().cumulative()
((0.01, 2), (0.1, 3), (1.0, 3), (inf, 4))
>>> h.stats().count
4
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Final

from .stats import COUNTER, TALLY

__all__ = ["DEFAULT_LATENCY_BUCKETS", "HistogramStats", "LatencyHistogram"]

#: Upper bounds in seconds (``le``) of the default buckets: 0.5 ms to 10 s, roughly
#: 1-2.5-5 per decade, the range of a round trip on a LAN up to a stalled peer.
DEFAULT_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True, slots=True)
class HistogramStats:
    """A snapshot of a :class:`LatencyHistogram`.

    ``buckets`` holds ``(upper_bound, count)`` pairs sorted by bound, the last
    bound being ``inf``; each count is of the observations in that bucket only
    (not cumulative: :meth:`cumulative` gives Prometheus' ``le`` counts). ``sum``
    is the total of the observed values in seconds, ``count`` the number of
    observations. Summed with :func:`~tornado_longconn.stats.sum_stats`, buckets
    add per bound.
    """

    #: ``(upper_bound_seconds, count)`` per bucket, the last bound ``inf`` (tally).
    buckets: tuple[tuple[float, int], ...] = field(default=(), metadata=TALLY)
    #: Sum of the observed values in seconds (counter).
    sum: float = field(default=0.0, metadata=COUNTER)
    #: Observations (counter).
    count: int = field(default=0, metadata=COUNTER)

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """``(upper_bound, observations <= upper_bound)`` per bucket, as Prometheus reports them."""
        total = 0
        out = []
        for bound, count in self.buckets:
            total += count
            out.append((bound, total))
        return tuple(out)


class LatencyHistogram:
    """Counts of observations (seconds) in fixed buckets; bounded memory, O(log buckets).

    ``bounds`` are the buckets' upper bounds in seconds, strictly increasing and
    finite (default :data:`DEFAULT_LATENCY_BUCKETS`); one more bucket, ``inf``,
    takes what is larger. Raises ``ValueError`` for empty, unsorted or
    non-finite bounds. Not thread-safe: observe from the event loop.
    """

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: Iterable[float] = DEFAULT_LATENCY_BUCKETS) -> None:
        upper = tuple(float(b) for b in bounds)
        if not upper:
            raise ValueError("a histogram needs at least one bucket bound")
        if any(not math.isfinite(b) for b in upper):
            raise ValueError(f"bucket bounds must be finite (inf is implied): {upper!r}")
        if any(a >= b for a, b in pairwise(upper)):
            raise ValueError(f"bucket bounds must be strictly increasing: {upper!r}")
        self._bounds = upper
        self._counts = [0] * (len(upper) + 1)
        self._sum = 0.0

    @property
    def bounds(self) -> tuple[float, ...]:
        """The finite upper bounds (seconds); the ``inf`` bucket is implied."""
        return self._bounds

    def observe(self, seconds: float) -> None:
        """Count one observation of ``seconds``."""
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def stats(self) -> HistogramStats:
        """A snapshot of the counts (:class:`HistogramStats`)."""
        counts = self._counts
        return HistogramStats(
            buckets=(*zip(self._bounds, counts[:-1], strict=True), (math.inf, counts[-1])),
            sum=self._sum,
            count=sum(counts),
        )
