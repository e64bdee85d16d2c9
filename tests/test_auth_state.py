"""SessionExpiry: the I/O-free expiry rule, with plain unit tests and hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tornado_longconn.auth import Credentials, ExpiredError, SessionExpiry

times = st.floats(min_value=0, max_value=1e9, allow_nan=False)


def test_no_deadline_never_expires() -> None:
    rule = SessionExpiry()
    assert rule.next_deadline() is None and rule.remaining(5.0) is None
    assert not rule.expired(1e12)


def test_auth_deadline_then_expiry() -> None:
    rule = SessionExpiry(auth_deadline=10.0)
    assert rule.reason == "authentication timeout"
    assert not rule.expired(9.99) and rule.expired(10.0)
    rule.renew(50.0, now=9.0)
    assert rule.auth_deadline is None and rule.reason == "expired"
    assert rule.next_deadline() == 50.0 and rule.remaining(60.0) == 0.0
    assert rule.renewals == 1


def test_renew_refuses_an_expired_token_and_changes_nothing() -> None:
    rule = SessionExpiry(expires_at=20.0)
    with pytest.raises(ExpiredError):
        rule.renew(15.0, now=15.0)
    assert rule.expires_at == 20.0 and rule.renewals == 0


def test_renew_without_expiry_clears_the_deadline() -> None:
    rule = SessionExpiry(expires_at=20.0, auth_deadline=5.0)
    assert rule.next_deadline() == 5.0  # the earlier one
    rule.renew(None, now=1.0)
    assert rule.next_deadline() is None


def test_credentials_default_to_no_expiry() -> None:
    assert Credentials("ann").expires_at is None


@given(start=times, lifetime=st.floats(min_value=1e-3, max_value=1e6), steps=st.lists(times))
def test_expired_exactly_from_the_deadline_on(
    start: float, lifetime: float, steps: list[float]
) -> None:
    rule = SessionExpiry(expires_at=start + lifetime)
    for now in steps:
        assert rule.expired(now) == (now >= start + lifetime)
        assert rule.remaining(now) == max(0.0, (start + lifetime) - now)


@given(renewals=st.lists(st.tuples(times, st.floats(min_value=-10, max_value=1e6))))
def test_renewals_move_the_deadline_only_forward_of_now(
    renewals: list[tuple[float, float]],
) -> None:
    rule = SessionExpiry(auth_deadline=0.0)
    for now, lifetime in renewals:
        before = rule.next_deadline()
        try:
            rule.renew(now + lifetime, now=now)
        except ExpiredError:
            assert now + lifetime <= now
            assert rule.next_deadline() == before
        else:
            assert rule.next_deadline() == now + lifetime and not rule.expired(now)
