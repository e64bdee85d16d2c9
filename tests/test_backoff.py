"""retry_unavailable: what is tried again, how often, and when it gives up."""

from __future__ import annotations

import pytest

from tornado_longconn.backoff import ReconnectBackoff, retry_unavailable
from tornado_longconn.exceptions import BackendUnavailableError


class Flaky:
    """Fails as unavailable ``failures`` times, then answers ``"ok"``."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.error = error

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error or BackendUnavailableError("busy")
        return "ok"


def tiny() -> ReconnectBackoff:
    return ReconnectBackoff(base=0.0001, cap=0.0001)


async def test_unavailable_is_tried_again_until_it_answers() -> None:
    attempt = Flaky(failures=3)
    delays: list[float] = []
    result = await retry_unavailable(
        attempt,
        retries=5,
        backoff=tiny(),
        give_up=lambda: False,
        on_retry=lambda exc, delay: delays.append(delay),
    )
    assert result == "ok"
    assert attempt.calls == 4
    assert len(delays) == 3


async def test_the_error_is_raised_after_the_last_retry() -> None:
    attempt = Flaky(failures=10)
    with pytest.raises(BackendUnavailableError):
        await retry_unavailable(attempt, retries=2, backoff=tiny(), give_up=lambda: False)
    assert attempt.calls == 3  # the first try and 2 retries


async def test_give_up_stops_retrying_at_once() -> None:
    attempt = Flaky(failures=10)
    with pytest.raises(BackendUnavailableError):
        await retry_unavailable(attempt, retries=5, backoff=tiny(), give_up=lambda: True)
    assert attempt.calls == 1


async def test_other_errors_are_not_retried() -> None:
    attempt = Flaky(failures=1, error=KeyError("x"))
    with pytest.raises(KeyError):
        await retry_unavailable(attempt, retries=5, backoff=tiny(), give_up=lambda: False)
    assert attempt.calls == 1
