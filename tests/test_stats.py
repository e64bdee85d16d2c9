"""One stats shape: frozen snapshots, ``sum_stats``, ``counters_only``, ``stats_dict``."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tornado_longconn
from tornado_longconn import (
    AcceptStats,
    BackendStats,
    BroadcastHub,
    BroadcastStats,
    EarlyAnswer,
    EarlyAnswerStats,
    GCTuningStats,
    HeartbeatCounters,
    HeartbeatStats,
    LongPollStats,
    LongPollWaiter,
    MemoryBackend,
    ProtocolErrorCounters,
    ProtocolErrorStats,
    StatKind,
    UploadStats,
    UploadStore,
    WriterStats,
    counters_only,
    gc_tuning_stats,
    stats_dict,
    sum_stats,
)
from tornado_longconn.connections import ConnectionStats
from tornado_longconn.stats import COUNTER, FLAG, GAUGE, LABEL, PEAK, TALLY, stat_kinds

#: Every snapshot class of the library.
SNAPSHOT_CLASSES: list[type[Any]] = [
    AcceptStats,
    BackendStats,
    BroadcastStats,
    ConnectionStats,
    EarlyAnswerStats,
    GCTuningStats,
    HeartbeatStats,
    LongPollStats,
    ProtocolErrorStats,
    UploadStats,
    WriterStats,
]


@dataclass(frozen=True, slots=True)
class Sample:
    """One field of every kind."""

    label: str = field(metadata=LABEL)
    sent: int = field(metadata=COUNTER)
    level: int = field(metadata=GAUGE)
    rate: float | None = field(metadata=COUNTER)
    peak: int = field(metadata=PEAK)
    p99: float | None = field(metadata=PEAK)
    broken: bool = field(metadata=FLAG)
    by_code: tuple[tuple[int, int], ...] = field(metadata=TALLY)


counts = st.integers(min_value=0, max_value=10**12)
seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)
tallies = st.dictionaries(st.integers(1000, 1015), st.integers(1, 10**6), max_size=5).map(
    lambda d: tuple(sorted(d.items()))
)


def samples(label: str = "x") -> st.SearchStrategy[Sample]:
    return st.builds(
        Sample,
        label=st.just(label),
        sent=counts,
        level=counts,
        # Integral floats: their sums are exact whatever the order.
        rate=st.none() | st.integers(0, 2**40).map(float),
        peak=counts,
        p99=st.none() | seconds,
        broken=st.booleans(),
        by_code=tallies,
    )


sample_lists = st.lists(samples(), min_size=1, max_size=12)
#: No per-example deadline: the suite runs on loaded machines.
relaxed = settings(deadline=None)


# -- sum_stats ---------------------------------------------------------------------------


@relaxed
@given(samples())
def test_one_snapshot_sums_to_itself(s: Sample) -> None:
    assert sum_stats([s]) == s
    assert sum_stats([], start=s) == s


@relaxed
@given(sample_lists)
def test_each_kind_is_combined_by_its_rule(items: list[Sample]) -> None:
    total = sum_stats(items)
    assert type(total) is Sample
    assert total.label == "x"
    assert total.sent == sum(s.sent for s in items)
    assert total.level == sum(s.level for s in items)
    rates = [s.rate for s in items if s.rate is not None]
    assert total.rate == (sum(rates) if rates else None)
    assert total.peak == max(s.peak for s in items)
    p99s = [s.p99 for s in items if s.p99 is not None]
    assert total.p99 == (max(p99s) if p99s else None)
    assert total.broken == any(s.broken for s in items)
    tally: collections.Counter[int] = collections.Counter()
    for s in items:
        tally.update(dict(s.by_code))
    assert total.by_code == tuple(sorted(tally.items()))


@relaxed
@given(sample_lists, st.randoms(use_true_random=False))
def test_order_does_not_matter(items: list[Sample], rnd: Any) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert sum_stats(shuffled) == sum_stats(items)


@relaxed
@given(sample_lists, st.data())
def test_sums_of_parts_add_up_to_the_sum_of_all(items: list[Sample], data: st.DataObject) -> None:
    # Many writers -> per-group sums -> one hub sum; per-process sums -> one total.
    cut = data.draw(st.integers(1, len(items)))
    parts = [sum_stats(items[:cut])]
    if cut < len(items):
        parts.append(sum_stats(items[cut:]))
    assert sum_stats(parts) == sum_stats(items)


@relaxed
@given(sample_lists, samples())
def test_start_is_summed_first(items: list[Sample], start: Sample) -> None:
    assert sum_stats(items, start=start) == sum_stats([start, *items])
    assert sum_stats(iter(items)) == sum_stats(items)  # any iterable, read once


@relaxed
@given(samples("a"), samples("b"))
def test_labels_must_be_equal(a: Sample, b: Sample) -> None:
    with pytest.raises(ValueError, match="label differs"):
        sum_stats([a, b])


def test_nothing_to_sum_or_mixed_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="start="):
        sum_stats([])
    writer = WriterStats(1, 2, 0, 0, 2, False, 0, 0, 1)
    with pytest.raises(TypeError, match="one class"):
        sum_stats([writer, BroadcastStats()])
    with pytest.raises(TypeError, match="dataclass"):
        sum_stats([1, 2])


def test_undeclared_fields_are_combined_by_their_values() -> None:
    @dataclass(frozen=True)
    class Plain:
        name: str
        count: int
        up: bool

    total = sum_stats([Plain("p", 1, False), Plain("p", 2, True)])
    assert total == Plain("p", 3, True)
    with pytest.raises(ValueError, match="name differs"):
        sum_stats([Plain("p", 1, False), Plain("q", 1, False)])


def test_backends_of_different_kinds_do_not_add_up() -> None:
    memory = MemoryBackend().stats()
    redis = dataclasses.replace(memory, kind="redis", published=3, received=5, reconnects=1)
    with pytest.raises(ValueError, match="kind differs"):
        sum_stats([memory, redis])
    # "not counted" (None) is skipped: processes of one kind sum what they count.
    total = sum_stats([redis, dataclasses.replace(redis, published=None)])
    assert (total.published, total.received, total.reconnects) == (3, 10, 2)


# -- counters_only, stats_dict ---------------------------------------------------------


@relaxed
@given(samples(), samples())
def test_counters_only_keeps_what_accumulated(gone: Sample, live: Sample) -> None:
    retired = counters_only(gone)
    assert (retired.label, retired.sent, retired.rate, retired.by_code) == (
        gone.label,
        gone.sent,
        gone.rate,
        gone.by_code,
    )
    assert (retired.level, retired.peak, retired.broken) == (0, 0, False)
    assert retired.p99 == (None if gone.p99 is None else 0.0)
    total = sum_stats([retired, live])
    assert total.sent == gone.sent + live.sent  # counters never go backwards
    assert (total.level, total.peak, total.broken) == (live.level, live.peak, live.broken)


@relaxed
@given(samples())
def test_stats_dict_is_json_ready_in_field_order(s: Sample) -> None:
    d = stats_dict(s)
    assert list(d) == [f.name for f in dataclasses.fields(Sample)]
    assert d["by_code"] == dict(s.by_code) and d["sent"] == s.sent
    assert json.loads(json.dumps(d))["sent"] == s.sent
    with pytest.raises(TypeError):
        stats_dict({"sent": 1})


# -- the library's snapshot classes ---------------------------------------------------------


@pytest.mark.parametrize("cls", SNAPSHOT_CLASSES, ids=lambda c: c.__name__)
def test_every_snapshot_class_is_frozen_slotted_and_declares_kinds(cls: type[Any]) -> None:
    assert dataclasses.is_dataclass(cls)
    assert vars(cls)["__dataclass_params__"].frozen
    assert "__slots__" in vars(cls)  # instances have no __dict__: small, and cheap to build
    kinds = stat_kinds(cls)
    assert kinds and all(isinstance(kind, StatKind) for kind in kinds.values()), kinds
    assert cls.__doc__
    assert cls.__name__ in tornado_longconn.__all__


def _strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Instances of a library snapshot class, from each field's kind and annotation."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata["tornado_longconn.stat"]
        annotation = str(f.type)
        if kind is StatKind.LABEL:
            value: st.SearchStrategy[Any] = st.just("k")
        elif kind is StatKind.FLAG:
            value = st.booleans()
        elif kind is StatKind.TALLY:
            value = tallies
        elif "float" in annotation:
            value = seconds
        else:
            value = counts
        if "None" in annotation:
            value = st.none() | value
        fields[f.name] = value
    return st.fixed_dictionaries(fields).map(lambda kwargs: cls(**kwargs))


@pytest.mark.parametrize("cls", SNAPSHOT_CLASSES, ids=lambda c: c.__name__)
@relaxed
@given(data=st.data())
def test_library_snapshots_sum_field_by_field(cls: type[Any], data: st.DataObject) -> None:
    items = data.draw(st.lists(_strategy(cls), min_size=1, max_size=6))
    total = sum_stats(items)
    assert sum_stats(reversed(items)) == total
    for name, kind in stat_kinds(cls).items():
        values = [getattr(item, name) for item in items]
        present = [v for v in values if v is not None]
        got = getattr(total, name)
        if kind in (StatKind.COUNTER, StatKind.GAUGE) and present:
            assert got == pytest.approx(sum(present)), name
        elif kind is StatKind.PEAK and present:
            assert got == max(present), name
        elif kind is StatKind.FLAG:
            assert got == any(values), name
    hash(total)  # plain values only: a snapshot can be a dict key or a set member
    stats_dict(total)


def test_parts_return_frozen_snapshots(tmp_path: Path) -> None:
    cases: list[tuple[Any, type[Any]]] = [
        (MemoryBackend().stats(), BackendStats),
        (EarlyAnswer().stats(), EarlyAnswerStats),
        (HeartbeatCounters().stats(), HeartbeatStats),
        (ProtocolErrorCounters().stats(), ProtocolErrorStats),
        (UploadStore(os.fspath(tmp_path)).stats(), UploadStats),
        (gc_tuning_stats(), GCTuningStats),
    ]
    for snapshot, cls in cases:
        assert type(snapshot) is cls
        with pytest.raises(dataclasses.FrozenInstanceError):
            snapshot.__setattr__(dataclasses.fields(cls)[0].name, None)


async def test_waiter_stats_is_a_snapshot() -> None:
    waiter = LongPollWaiter(MemoryBackend(), topic="t")
    first = waiter.stats()
    assert type(first) is LongPollStats and first.waiting == 0
    assert sum_stats([first, first]).timeouts == 2 * first.timeouts


async def test_hub_stats_is_the_sum_of_its_groups_and_keeps_forgotten_counters() -> None:
    hub = BroadcastHub(max_idle_groups=2)
    try:
        rooms = [hub.group(f"room{i}") for i in range(2)]
        for i, room in enumerate(rooms):
            for _ in range(i + 1):
                await room.publish("m")
        assert hub.stats() == sum_stats(room.stats() for room in rooms)
        assert (hub.stats().groups, hub.stats().published) == (2, 3)
        hub.group("room2")  # a third idle group: the longest idle one is forgotten
        assert "room0" not in hub
        total = hub.stats()
        # The forgotten group's counters stay; its gauges leave with it.
        assert (total.groups, total.published) == (2, 3)
    finally:
        await hub.close()


def test_reference_page_lists_every_field_with_its_kind() -> None:
    page = (Path(__file__).parent.parent / "docs" / "reference" / "stats.md").read_text()
    for cls in SNAPSHOT_CLASSES:
        head = f"### {cls.__name__}\n"
        assert head in page, cls.__name__
        section = page.split(head, 1)[1].split("\n#", 1)[0]
        rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
        documented = {cells[1].strip().strip("`"): cells[2].strip() for cells in rows}
        declared = {name: kind.value for name, kind in stat_kinds(cls).items() if kind}
        assert documented == declared, cls.__name__
