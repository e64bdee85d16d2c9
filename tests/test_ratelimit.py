"""The rate-limit rule objects, without I/O: token buckets, limiters, caps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tornado_longconn.ratelimit import (
    ConnectionCap,
    ConnectionRateLimiter,
    KeyedBuckets,
    RateLimits,
    TokenBucket,
)

rates = st.floats(min_value=0.01, max_value=1000, allow_nan=False)
bursts = st.integers(min_value=1, max_value=100)
# (time step, tokens asked) pairs: the clock only moves forward.
steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=5, allow_nan=False),
        st.integers(min_value=1, max_value=10),
    ),
    max_size=60,
)


def _run(rate: float, burst: int, plan: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Play ``plan`` on a bucket; the (time, tokens) of every grant."""
    bucket = TokenBucket(rate, burst)
    now = 0.0
    granted = []
    for step, n in plan:
        now += step
        if bucket.try_take(now, n):
            granted.append((now, n))
        assert bucket.tokens(now) >= 0
    return granted


@given(rates, bursts, steps)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, plan: list[tuple[float, int]]
) -> None:
    granted = _run(rate, burst, plan)
    for i in range(len(granted)):
        for j in range(i, len(granted)):
            window = granted[j][0] - granted[i][0]
            total = sum(n for _, n in granted[i : j + 1])
            assert total <= burst + rate * window + 1e-6 * max(1.0, total)


@given(rates, bursts, steps)
def test_tokens_never_negative_nor_above_burst(
    rate: float, burst: int, plan: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = 0.0
    for step, n in plan:
        now += step
        bucket.try_take(now, n)
        assert 0 <= bucket.tokens(now) <= burst


@given(rates, bursts, st.integers(min_value=1, max_value=100))
def test_refills_after_wait_time(rate: float, burst: int, n: int) -> None:
    bucket = TokenBucket(rate, burst)
    while bucket.try_take(0.0):
        pass
    wait = bucket.wait_time(0.0, n)
    if n > burst:
        assert math.isinf(wait)
        assert not bucket.try_take(1e9, n)
    else:
        assert wait > 0
        assert bucket.try_take(wait * (1 + 1e-9) + 1e-12, n)


def test_a_clock_going_back_grants_nothing() -> None:
    bucket = TokenBucket(1.0, 1)
    assert bucket.try_take(10.0)
    assert not bucket.try_take(5.0)
    assert not bucket.try_take(10.0)
    assert bucket.try_take(11.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0.5)])
def test_bad_settings_raise(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        TokenBucket(rate, burst)


def test_limiter_messages_then_breaches_exhaust() -> None:
    limiter = ConnectionRateLimiter(RateLimits(messages_per_second=2, max_breaches=2))
    assert [limiter.check_message(0.0, 1) for _ in range(5)] == [
        None,
        None,
        "messages",
        "messages",
        "messages",
    ]
    assert limiter.breaches == 3 and limiter.exhausted
    assert limiter.check_message(1.0, 1) is None  # refilled


def test_limiter_bytes_refusal_takes_no_message_token() -> None:
    limiter = ConnectionRateLimiter(
        RateLimits(messages_per_second=1, bytes_per_second=10, byte_burst=10)
    )
    assert limiter.check_message(0.0, 11) == "bytes"
    assert limiter.check_message(0.0, 10) is None
    assert limiter.check_message(0.0, 1) == "messages"


def test_limiter_publishes_per_topic() -> None:
    limiter = ConnectionRateLimiter(RateLimits(publishes_per_second=1))
    assert limiter.check_publish(0.0, "a") is None
    assert limiter.check_publish(0.0, "a") == "publishes"
    assert limiter.check_publish(0.0, "b") is None  # another topic, its own bucket
    assert limiter.check_publish(1.0, "a") is None


def test_limiter_publish_table_is_bounded() -> None:
    limiter = ConnectionRateLimiter(RateLimits(publishes_per_second=1))
    for i in range(256):
        assert limiter.check_publish(0.0, f"t{i}") is None
    assert limiter.check_publish(0.0, "one-more") == "publishes"
    # once the buckets are idle (full again) they are dropped for new topics
    assert limiter.check_publish(5.0, "one-more") is None


def test_no_limits_allow_everything() -> None:
    limiter = ConnectionRateLimiter(RateLimits())
    assert all(limiter.check_message(0.0, 10**9) is None for _ in range(1000))
    assert all(limiter.check_publish(0.0, "t") is None for _ in range(1000))


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abc")), max_size=100))
def test_cap_never_exceeds_limit(ops: list[tuple[bool, str]]) -> None:
    cap = ConnectionCap(3)
    model: dict[str, int] = {}
    for acquire, key in ops:
        if acquire:
            ok = cap.acquire(key)
            assert ok == (model.get(key, 0) < 3)
            if ok:
                model[key] = model.get(key, 0) + 1
        elif model.get(key, 0) > 0:
            cap.release(key)
            model[key] -= 1
        assert cap.count(key) == model.get(key, 0) <= 3


@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 1, allow_nan=False)), max_size=200))
def test_keyed_buckets_stay_bounded(ops: list[tuple[int, float]]) -> None:
    buckets = KeyedBuckets(rate=1, burst=2, max_keys=5)
    now = 0.0
    for key, step in ops:
        now += step
        buckets.try_take(key, now)
        assert len(buckets) <= 5


def test_keyed_buckets_limit_each_key() -> None:
    buckets = KeyedBuckets(rate=1, burst=2)
    assert [buckets.try_take("a", 0.0) for _ in range(3)] == [True, True, False]
    assert buckets.try_take("b", 0.0)
    assert buckets.try_take("a", 1.0)
