"""Cursors and bounded history (I/O-free)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tornado_longconn.exceptions import CursorError
from tornado_longconn.log import Cursor, HistoryLimit, TopicLog, parse_cursor


def test_cursor_round_trip() -> None:
    c = Cursor("abc123", 42)
    assert str(c) == "abc123-42"
    assert parse_cursor(str(c)) == c
    assert c.next() == Cursor("abc123", 43)


@pytest.mark.parametrize(
    "bad", ["", "-", "abc", "abc-", "-1", "abc--1", "abc-01", "a b-1", "abc-1-2", "x" * 40 + "-1"]
)
def test_malformed_cursor_is_a_clear_error(bad: str) -> None:
    with pytest.raises(CursorError, match="cursor"):
        parse_cursor(bad)


def test_cursor_rejects_non_strings() -> None:
    with pytest.raises(CursorError):
        parse_cursor(12)  # type: ignore[arg-type]


def test_since_reports_gap_for_other_epoch_future_and_evicted() -> None:
    log = TopicLog("t", HistoryLimit(max_messages=3), epoch="e1")
    for i in range(5):
        log.append(str(i), now=0.0)
    assert log.since(Cursor("e2", 4), now=0).reason == "epoch"
    assert log.since(Cursor("e1", 9), now=0).reason == "future"
    evicted = log.since(Cursor("e1", 1), now=0)
    assert evicted.gap and evicted.reason == "evicted" and evicted.cursor == log.head
    ok = log.since(Cursor("e1", 2), now=0)
    assert not ok.gap
    assert [m.data for m in ok.messages] == ["2", "3", "4"]
    assert ok.cursor == Cursor("e1", 5)


def test_max_bytes_and_max_age_evict_oldest() -> None:
    log = TopicLog("t", HistoryLimit(max_messages=100, max_bytes=10, max_age=5.0), epoch="e")
    for i in range(6):
        log.append("ab", now=float(i))
    assert len(log) == 5 and log.nbytes == 10
    assert log.since(Cursor("e", 1), now=5.0).messages[0].data == "ab"
    assert log.since(Cursor("e", 1), now=20.0).gap


@pytest.mark.parametrize(
    "kwargs", [{"max_messages": 0}, {"max_bytes": 0}, {"max_age": 0.0}, {"max_age": -1.0}]
)
def test_bad_history_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        HistoryLimit(**kwargs)  # type: ignore[arg-type]


@given(
    limit=st.integers(1, 20),
    count=st.integers(0, 60),
    start=st.integers(0, 70),
)
def test_since_is_exactly_the_kept_suffix_or_a_gap(limit: int, count: int, start: int) -> None:
    log = TopicLog("t", HistoryLimit(max_messages=limit), epoch="e")
    for i in range(count):
        log.append(str(i + 1), now=0.0)
    result = log.since(Cursor("e", start), now=0.0)
    oldest_kept = max(1, count - limit + 1)
    if start > count or start + 1 < oldest_kept:
        assert result.gap and not result.messages and result.cursor == Cursor("e", count)
    else:
        assert not result.gap
        assert [m.data for m in result.messages] == [str(i) for i in range(start + 1, count + 1)]
        assert result.cursor == Cursor("e", max(start, count))
