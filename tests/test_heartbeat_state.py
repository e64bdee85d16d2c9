"""HeartbeatState, HeartbeatConfig and HeartbeatCounters: I/O-free, no event loop, no sleeps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tornado_longconn.heartbeat import (
    COALESCE_FRACTION,
    DEFAULT_INTERVAL,
    HeartbeatAction,
    HeartbeatConfig,
    HeartbeatCounters,
    HeartbeatScheduler,
    HeartbeatState,
    HeartbeatStats,
)

WAIT, PING, CLOSE = HeartbeatAction.WAIT, HeartbeatAction.PING, HeartbeatAction.CLOSE


# -- HeartbeatConfig ---------------------------------------------------------------------


def test_config_defaults() -> None:
    config = HeartbeatConfig()
    assert config.interval == DEFAULT_INTERVAL
    assert config.timeout is None
    assert config.effective_timeout == DEFAULT_INTERVAL
    assert config.mode == "protocol"


def test_config_json_message_is_compact() -> None:
    config = HeartbeatConfig(mode="application", message={"op": "hb"}, reply=["ok"])
    assert config.message == '{"op":"hb"}'
    assert config.reply == '["ok"]'


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interval": -1.0}, r"heartbeat_interval must be > 0 seconds.*-1\.0"),
        ({"interval": 0}, r"heartbeat_interval must be > 0"),
        ({"interval": math.inf}, r"heartbeat_interval must be > 0"),
        ({"interval": math.nan}, r"heartbeat_interval must be > 0"),
        ({"interval": "20"}, r"heartbeat_interval must be a number of seconds or None"),
        ({"interval": True}, r"heartbeat_interval must be a number"),
        ({"timeout": -5}, r"heartbeat_timeout must be > 0"),
        ({"interval": None, "timeout": 5.0}, r"timeout needs an interval"),
        ({"mode": "tcp"}, r"heartbeat_mode must be 'protocol' or 'application', not 'tcp'"),
        ({"message": ""}, r"heartbeat_message must be a non-empty str"),
        ({"reply": b"pong"}, r"heartbeat_reply must be a non-empty str"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HeartbeatConfig(**kwargs)  # type: ignore[arg-type]


def test_config_interval_none_turns_off() -> None:
    assert HeartbeatConfig(interval=None).effective_timeout is None


def test_config_settings_override_class_attributes() -> None:
    class Handler:
        heartbeat_interval = 5.0
        heartbeat_mode = "application"

    config = HeartbeatConfig._resolve(Handler, {"heartbeat_interval": 2.0})
    assert (config.interval, config.mode) == (2.0, "application")
    # A setting present with value None counts: it turns heartbeats off.
    assert HeartbeatConfig._resolve(Handler, {"heartbeat_interval": None}).interval is None


# -- HeartbeatState: examples --------------------------------------------------------------


def test_state_rejects_non_positive_values() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        HeartbeatState(0, 1, now=0.0)


def test_first_ping_never_later_than_one_interval() -> None:
    assert HeartbeatState(10, 5, now=100.0, first_ping=1e9).next_ping == 110.0
    assert HeartbeatState(10, 5, now=100.0, first_ping=103.0).next_ping == 103.0


def test_ping_then_answer_measures_latency() -> None:
    s = HeartbeatState(10, 5, now=0.0)
    assert s.latency is None
    assert s.next_action(9.99) is WAIT
    assert s.next_action(10.0) is PING
    assert s.ping_sent_at == 10.0
    assert s.next_ping == 20.0
    assert s.answer(10.5) == pytest.approx(0.5)
    assert s.latency == pytest.approx(0.5)
    assert s.answer(10.6) is None  # duplicate answer: activity only
    assert s.last_activity == 10.6


def test_a_late_check_keeps_the_ping_schedule() -> None:
    s = HeartbeatState(10, 50, now=0.0)
    assert s.next_action(10.3) is PING  # checked 0.3 s late (a busy loop)
    assert s.ping_sent_at == 10.3  # the round trip is timed from the send
    assert s.next_ping == 20.0  # one interval after the ping was due
    s.answer(10.4)
    assert s.next_action(45.0) is PING  # more than an interval late: start again from now
    assert s.next_ping == 55.0


def test_silent_peer_is_closed_exactly_at_interval_plus_timeout() -> None:
    s = HeartbeatState(10, 5, now=0.0)
    assert s.next_action(10.0) is PING
    assert s.deadline == 15.0
    assert s.next_action(14.999) is WAIT
    assert s.next_action(15.0) is CLOSE
    assert s.timed_out


def test_late_answer_within_timeout_keeps_the_peer() -> None:
    s = HeartbeatState(10, 5, now=0.0)
    assert s.next_action(10.0) is PING
    s.answer(14.9)
    assert s.next_action(15.0) is WAIT
    assert s.deadline == 20.0
    assert s.next_action(20.0) is PING
    assert s.next_action(29.8) is WAIT
    assert s.next_action(29.9) is CLOSE


def test_progress_change_counts_as_activity() -> None:
    s = HeartbeatState(1, 1, now=0.0)
    assert s.next_action(1.0, progress=100) is PING  # first sample is only a baseline
    assert s.last_activity == 0.0
    assert s.next_action(1.9, progress=5000) is WAIT  # bytes moved
    assert s.last_activity == 1.9
    assert s.next_action(3.8, progress=5000) is PING  # nothing moved since
    assert s.next_action(3.9, progress=5000) is CLOSE


def test_a_peer_silent_after_its_pong_is_dead_at_pong_plus_interval_plus_timeout() -> None:
    # The pong's bytes are dated with the pong: the next check must not take them
    # as new activity (which would make the bound 2 x interval + timeout).
    s = HeartbeatState(2, 1, now=0.0)
    assert s.next_action(2.0, progress=100) is PING
    s.answer(2.001, progress=120)  # the pong; the counters include its bytes
    assert s.next_action(4.0, progress=120) is PING  # nothing moved since the pong
    assert s.last_activity == 2.001
    assert s.deadline == pytest.approx(5.001)
    assert s.next_action(5.0, progress=120) is WAIT
    assert s.next_action(5.001, progress=120) is CLOSE


def test_only_writes_with_bytes_waiting_are_activity() -> None:
    s = HeartbeatState(1, 1, now=0.0)
    s.writes(0.2, total=100, done=100)  # all sent at once: a dead peer's kernel takes it too
    s.writes(0.9, total=300, done=300)
    assert s.last_activity == 0.0
    s.writes(1.0, total=5000, done=1000)  # 700 bytes sent, 4,000 wait for the peer
    assert s.last_activity == 1.0
    s.writes(1.5, total=5000, done=3000)  # it read some
    assert s.last_activity == 1.5
    s.writes(2.5, total=5000, done=3000)  # and stopped
    assert s.dead_at == 3.5
    assert s.next_action(3.5) is CLOSE


def test_activity_with_progress_dates_the_bytes_at_that_time() -> None:
    s = HeartbeatState(1, 1, now=0.0)
    s.next_action(0.5, progress=10)
    s.activity(0.7, progress=50)  # a message arrived
    assert s.next_action(1.0, progress=50) is PING
    assert s.last_activity == 0.7
    assert s.next_action(2.7, progress=50) is CLOSE


def test_progress_none_means_not_sampled() -> None:
    s = HeartbeatState(1, 1, now=0.0)
    s.next_action(0.5, progress=7)
    assert s.next_action(1.5, progress=None) is PING
    assert s.progress == 7


# -- HeartbeatState: properties --------------------------------------------------------------

durations = st.floats(min_value=0.01, max_value=100.0, allow_nan=False, allow_infinity=False)
events = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=50.0, allow_nan=False, allow_infinity=False),
        st.sampled_from(["check", "activity", "answer", "progress"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(interval=durations, timeout=durations, steps=events)
def test_never_dead_before_interval_plus_timeout_after_last_activity(
    interval: float, timeout: float, steps: list[tuple[float, str]]
) -> None:
    s = HeartbeatState(interval, timeout, now=0.0)
    now = 0.0
    last_activity = 0.0
    counter = 0
    for gap, kind in steps:
        now += gap
        if kind == "activity":
            s.activity(now)
            last_activity = now
        elif kind == "answer":
            s.answer(now)
            last_activity = now
        else:
            progress = None
            if kind == "progress":
                counter += 1  # bytes moved some time in (previous check, now]
                progress = counter
            action = s.next_action(now, progress)
            if progress is not None and counter > 1:
                last_activity = now
            if action is CLOSE:
                assert now >= last_activity + interval + timeout
                return
            assert now < last_activity + interval + timeout


@settings(max_examples=300, deadline=None)
@given(
    interval=durations,
    timeout=durations,
    tick=st.floats(min_value=0.001, max_value=5.0),
    activities=st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=10),
)
def test_always_dead_by_interval_plus_timeout_plus_one_tick(
    interval: float, timeout: float, tick: float, activities: list[float]
) -> None:
    """Driven the way the scheduler drives it: at each deadline rounded up to a tick."""
    s = HeartbeatState(interval, timeout, now=0.0)
    last_activity = 0.0
    pending = sorted(activities)
    now = 0.0

    def rounded_up(deadline: float) -> float:  # what HeartbeatScheduler._schedule does
        key = math.ceil(deadline / tick)
        return (key + 1) * tick if key * tick < deadline else key * tick

    # at most (30 + 100 + 100) / 0.01 pings before the peer is dead
    for _ in range(100_000):
        due = rounded_up(s.deadline)
        while pending and pending[0] <= due:
            at = pending.pop(0)
            if at >= now:
                s.activity(at)
                last_activity = max(last_activity, at)
        now = max(now, due)
        if s.next_action(now) is CLOSE:
            break
    else:
        pytest.fail("never declared dead")
    # activities still pending came after the close and were never seen
    assert last_activity + interval + timeout <= now
    assert now <= last_activity + interval + timeout + tick * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(interval=durations, timeout=durations, rtt=st.floats(min_value=0.0, max_value=1.0))
def test_a_peer_answering_within_the_timeout_lives_forever(
    interval: float, timeout: float, rtt: float
) -> None:
    rtt = min(rtt, timeout * 0.99)
    s = HeartbeatState(interval, timeout, now=0.0)
    now = 0.0
    for _ in range(50):
        now = max(now, s.deadline)  # time never runs backwards
        action = s.next_action(now)
        assert action is not CLOSE
        if action is PING:
            now += rtt
            s.answer(now)


# -- HeartbeatCounters / HeartbeatStats ------------------------------------------------------


def test_stats_percentiles_and_bound() -> None:
    counters = HeartbeatCounters(max_samples=100)
    empty = counters.stats()
    assert empty == HeartbeatStats() and empty.p50 is None and empty.p99 is None
    for i in range(1, 201):
        counters.record_latency(i / 1000)
    stats = counters.stats()
    assert stats.count == 200
    # only the last 100 samples (0.101 .. 0.200) are kept
    assert stats.p50 == pytest.approx(0.150)
    assert stats.p99 == pytest.approx(0.199)
    assert counters.percentile(0) == pytest.approx(0.101)
    assert counters.percentile(1) == pytest.approx(0.200)
    # a snapshot is frozen and does not follow the live counters
    counters.record_latency(1.0)
    assert stats.count == 200 and counters.stats().count == 201
    with pytest.raises(AttributeError):
        stats.count = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        counters.percentile(1.5)
    with pytest.raises(ValueError, match="max_samples"):
        HeartbeatCounters(max_samples=0)


# -- HeartbeatScheduler buckets -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    interval=st.sampled_from([0.5, 1.0, 5.0, 9.99, 10.0, 20.0, 25.0, 60.0, 3600.0]),
    deadline=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
)
def test_a_deadline_is_rounded_up_by_at_most_one_step(interval: float, deadline: float) -> None:
    resolution = 0.05
    state = HeartbeatState(interval=interval, timeout=interval, now=0.0)
    state.next_ping = deadline  # due before it is dead
    state.last_activity = deadline
    key = HeartbeatScheduler(resolution=resolution).bucket_key(state)
    step = max(resolution, resolution * int(interval * COALESCE_FRACTION / resolution + 1e-9))
    assert key * resolution >= deadline  # never early
    assert key * resolution <= deadline + step + 1e-6  # at most one step late
    assert key % round(step / resolution) == 0  # on the step's grid: fuller buckets


def test_long_intervals_share_fewer_buckets() -> None:
    scheduler = HeartbeatScheduler(resolution=0.05)
    keys: dict[float, set[int]] = {}
    for interval in (1.0, 25.0):
        for i in range(2_500):  # deadlines spread evenly over 25 s
            state = HeartbeatState(interval=interval, timeout=interval, now=0.0)
            state.next_ping = state.last_activity = (i + 0.5) / 100
            keys.setdefault(interval, set()).add(scheduler.bucket_key(state))
    assert len(keys[1.0]) == 500  # one tick (0.05 s)
    assert len(keys[25.0]) == 100  # 1% of the interval (0.25 s)
