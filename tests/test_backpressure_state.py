"""FlowState: the I/O-free water-mark, queue and policy bookkeeping of BackpressureWriter."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tornado_longconn.backpressure import (
    DEFAULT_HIGH_WATER,
    DEFAULT_MAX_QUEUE,
    FlowState,
    Lifecycle,
    OverflowPolicy,
    SendResult,
    WriterStats,
)


def test_defaults() -> None:
    state: FlowState[str] = FlowState()
    assert state.high_water == DEFAULT_HIGH_WATER == 1 << 20
    assert state.low_water == DEFAULT_HIGH_WATER // 4
    assert state.policy is OverflowPolicy.CLOSE
    assert state.max_queue == DEFAULT_MAX_QUEUE == 1000
    assert state.buffered == 0
    assert state.is_drained()
    assert not state.must_wait()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"high_water": 0},
        {"high_water": -5},
        {"high_water": 10, "low_water": 0},
        {"high_water": 10, "low_water": -1},
        {"high_water": 10, "low_water": 11},
        {"max_queue": 0},
    ],
)
def test_bad_marks_raise_value_error(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        FlowState(**kwargs)


def test_bad_policy_raises_type_error() -> None:
    with pytest.raises(TypeError):
        FlowState(policy="close")  # type: ignore[arg-type]


def test_default_low_water_is_at_least_one() -> None:
    assert FlowState[str](high_water=3).low_water == 1


def test_low_equal_high_is_allowed() -> None:
    state: FlowState[str] = FlowState(high_water=10, low_water=10)
    assert state.low_water == state.high_water == 10


def test_commit_flush_and_drain() -> None:
    state: FlowState[str] = FlowState(high_water=100, low_water=40)
    state.commit(60)
    state.commit(50)
    assert (state.corked, state.pending, state.buffered) == (110, 0, 110)
    assert state.must_wait()
    state.flushed(pending=70)  # the kernel took 40 of 110 bytes at once
    assert (state.corked, state.pending) == (0, 70)
    assert not state.must_wait()
    assert not state.is_drained()
    state.set_pending(40)
    assert state.is_drained()
    stats = state.stats()
    assert stats == WriterStats(
        messages_sent=2,
        bytes_sent=110,
        dropped=0,
        waits=0,
        peak_buffered=110,
        closed_slow=False,
        queued=0,
        buffered=40,
        writes=1,
    )


def test_at_high_water_is_not_over_it() -> None:
    state: FlowState[str] = FlowState(high_water=100, policy=OverflowPolicy.DROP_NEWEST)
    state.commit(100)
    assert not state.must_wait()
    assert state.offer("a", 10) is SendResult.WRITTEN
    state.commit(10)
    assert state.offer("b", 10) is SendResult.DROPPED


def test_drop_newest() -> None:
    state: FlowState[str] = FlowState(high_water=10, policy=OverflowPolicy.DROP_NEWEST)
    state.commit(11)
    assert [state.offer(str(i), 5) for i in range(3)] == [SendResult.DROPPED] * 3
    assert state.dropped == 3
    assert state.buffered == 11


def test_drop_oldest_queue_is_bounded_and_ordered() -> None:
    state: FlowState[str] = FlowState(
        high_water=10, low_water=5, policy=OverflowPolicy.DROP_OLDEST, max_queue=3
    )
    state.commit(11)
    results = [state.offer(str(i), 2) for i in range(5)]
    assert results == [SendResult.QUEUED] * 5
    assert state.dropped == 2
    assert state.stats().queued == 3
    assert state.queued_bytes == 6
    assert state.buffered == 17
    assert state.take_queued() is None  # still over high water
    state.flushed(pending=0)
    taken = []
    while (item := state.take_queued()) is not None:
        taken.append(item)
        state.commit(2)
    assert taken == ["2", "3", "4"]
    assert state.queued_bytes == 0


def test_queue_keeps_order_below_high_water() -> None:
    """While messages are queued, a new one queues behind them even below high water."""
    state: FlowState[str] = FlowState(high_water=10, policy=OverflowPolicy.DROP_OLDEST)
    state.commit(11)
    assert state.offer("a", 1) is SendResult.QUEUED
    state.flushed(pending=0)
    assert state.must_wait()
    assert state.offer("b", 1) is SendResult.QUEUED
    assert [state.take_queued(), state.take_queued(), state.take_queued()] == ["a", "b", None]


def test_close_policy() -> None:
    state: FlowState[str] = FlowState(high_water=10)
    state.commit(11)
    assert state.offer("x", 1) is SendResult.CLOSED
    assert state.closed and state.closed_slow
    assert state.dropped == 0
    assert state.offer("y", 1) is SendResult.CLOSED


def test_close_returns_queued_items() -> None:
    state: FlowState[str] = FlowState(high_water=10, policy=OverflowPolicy.DROP_OLDEST)
    state.commit(11)
    state.offer("a", 1)
    state.offer("b", 1)
    assert state.close() == ["a", "b"]
    assert state.closed and not state.closed_slow
    assert state.queued_bytes == 0
    assert state.offer("c", 1) is SendResult.CLOSED


# -- properties ---------------------------------------------------------------------------

sizes = st.integers(min_value=1, max_value=3000)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), sizes),
        st.tuples(st.just("send"), sizes),
        st.tuples(st.just("flush"), st.integers(min_value=0, max_value=5000)),
        st.tuples(st.just("drain"), st.integers(min_value=0, max_value=5000)),
        st.tuples(st.just("foreign"), st.integers(min_value=0, max_value=500)),
        st.tuples(st.just("pump"), st.just(0)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    high=st.integers(min_value=1, max_value=8000),
    low_fraction=st.floats(min_value=0.0, max_value=1.0),
    policy=st.sampled_from(list(OverflowPolicy)),
    max_queue=st.integers(min_value=1, max_value=20),
)
def test_bookkeeping_invariants(
    ops: list[tuple[str, int]],
    high: int,
    low_fraction: float,
    policy: OverflowPolicy,
    max_queue: int,
) -> None:
    low = max(1, int(high * low_fraction))
    state: FlowState[int] = FlowState(
        high_water=high, low_water=low, policy=policy, max_queue=max_queue
    )
    # A reference model of the queue, to check drop counts and order exactly.
    model_queue: deque[int] = deque()
    expected_dropped = 0
    committed_ids: list[int] = []
    next_id = 0

    def commit(ident: int, size: int) -> None:
        state.commit(size)
        committed_ids.append(ident)

    for op, n in ops:
        if state.closed:
            assert state.offer(next_id, 1) is SendResult.CLOSED
            break
        if op == "offer":
            over = state.must_wait()
            result = state.offer(next_id, n)
            if not over:
                assert result is SendResult.WRITTEN
                commit(next_id, n)
            elif policy is OverflowPolicy.DROP_NEWEST:
                assert result is SendResult.DROPPED
                expected_dropped += 1
            elif policy is OverflowPolicy.DROP_OLDEST:
                assert result is SendResult.QUEUED
                model_queue.append(next_id)
                if len(model_queue) > max_queue:
                    model_queue.popleft()
                    expected_dropped += 1
            else:
                assert result is SendResult.CLOSED
                assert state.closed_slow
                model_queue.clear()
            next_id += 1
        elif op == "send":
            # An awaited send: the shell waits (the transport drains, the queue
            # is pumped) until must_wait() is false, then commits.
            if state.must_wait():
                state.waits += 1
                state.flushed(pending=0)
                while (item := state.take_queued()) is not None:
                    assert item == model_queue.popleft()
                    commit(item, 1)
                    state.flushed(pending=0)
            assert not state.must_wait()
            commit(next_id, n)
            next_id += 1
            # The awaited-send bound: at most high water + this one message.
            assert state.buffered <= high + n
        elif op == "flush":
            state.flushed(pending=min(state.pending + state.corked, n))
        elif op == "drain":
            state.set_pending(max(0, state.pending - n))
        elif op == "foreign":
            state.set_pending(state.pending + n)
        elif op == "pump":
            while (item := state.take_queued()) is not None:
                assert item == model_queue.popleft()
                commit(item, 1)
        for value in (state.corked, state.pending, state.queued_bytes, state.buffered):
            assert value >= 0
        assert state.buffered == state.corked + state.pending + state.queued_bytes
        assert [item for item, _ in state.queue] == list(model_queue)
        assert len(state.queue) <= max_queue
        assert state.dropped == expected_dropped
        assert state.stats().peak_buffered >= state.buffered
    assert state.messages_sent == len(committed_ids)
    # Committed messages keep the order they were offered or sent in.
    assert committed_ids == sorted(committed_ids)


# -- the flush rule and the lifecycle -------------------------------------------

COUNTERS = (
    "corked",
    "pending",
    "queued_bytes",
    "messages_sent",
    "bytes_sent",
    "dropped",
    "waits",
    "writes",
    "peak_buffered",
    "closed_slow",
    "lifecycle",
)


def counters(state: FlowState[Any]) -> dict[str, object]:
    return {name: getattr(state, name) for name in COUNTERS} | {"queue": list(state.queue)}


def test_commit_says_when_to_flush() -> None:
    state: FlowState[int] = FlowState(high_water=1 << 20)
    assert state.commit(100) is False  # small: corked until the end of the iteration
    assert state.commit(64 * 1024) is True  # a large frame is written at once
    state.flushed(pending=0)
    for _ in range(4):
        assert state.commit(60_000) is False
    assert state.commit(60_000) is True  # the cork reached 256 KiB
    small: FlowState[int] = FlowState(high_water=1000, low_water=10)
    assert small.commit(1000) is False  # at high water is not over it
    assert small.commit(1) is True  # over high water: flush now


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "flush", "drain", "queue"]),
            st.integers(min_value=1, max_value=100_000),
        ),
        max_size=60,
    ),
    high=st.integers(min_value=1, max_value=600_000),
)
def test_admit_is_must_wait_then_commit(ops: list[tuple[str, int]], high: int) -> None:
    """The fan-out's one-call rule (admit) and the two-call rule agree on every counter."""
    one: FlowState[int] = FlowState(high_water=high, policy=OverflowPolicy.DROP_OLDEST)
    two: FlowState[int] = FlowState(high_water=high, policy=OverflowPolicy.DROP_OLDEST)
    for op, n in ops:
        if op == "admit":
            verdict = one.admit(n)
            expected = 0 if two.must_wait() else 2 if two.commit(n) else 1
            assert verdict == expected
        elif op == "flush":
            for state in (one, two):
                state.flushed(pending=min(state.pending + state.corked, n))
        elif op == "drain":
            for state in (one, two):
                state.set_pending(max(0, state.pending - n))
        else:  # a message queued by the policy, then pumped when there is room
            for state in (one, two):
                state.offer(n, n)
                state.take_queued()
        assert counters(one) == counters(two)


def test_lifecycle() -> None:
    state: FlowState[int] = FlowState()
    assert state.lifecycle is Lifecycle.OPEN and not state.closed
    state.closing()
    assert state.lifecycle is Lifecycle.CLOSING and state.closed
    assert state.offer(1, 1) is SendResult.CLOSED
    state.close()
    assert state.lifecycle is Lifecycle.CLOSED_BY_US
    state.closing()  # settled: no way back
    assert state.lifecycle is Lifecycle.CLOSED_BY_US
    gone: FlowState[int] = FlowState()
    gone.close(gone=True)
    assert gone.lifecycle is Lifecycle.GONE and not gone.closed_slow
    slow: FlowState[int] = FlowState(high_water=1, low_water=1)
    slow.commit(2)
    assert slow.offer(1, 1) is SendResult.CLOSED
    assert slow.lifecycle is Lifecycle.GONE and slow.closed_slow
