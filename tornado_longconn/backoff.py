"""Exponential backoff with full jitter, I/O-free.

One policy for everything that tries again after a failure: the Redis backend's
reconnects, and (through :func:`retry_unavailable`) a resuming member's history
reads and a subscribe's head read when the backend is briefly unavailable. Full jitter (a uniformly random delay up to the ceiling) spreads
the attempts of many clients or processes apart, so they do not retry in
lockstep.

>>> backoff = ReconnectBackoff(base=0.1, cap=1.0)
>>> [backoff.next_delay(lambda: 1.0) for _ in range(5)]
[0.1, 0.2, 0.4, 0.8, 1.0]
>>> backoff.reset(); backoff.ceiling()
0.1
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .exceptions import BackendUnavailableError

__all__ = ["ReconnectBackoff", "retry_unavailable"]

T = TypeVar("T")


@dataclass
class ReconnectBackoff:
    """Exponential backoff with full jitter (I/O-free).

    The n-th consecutive failure waits a uniformly random time in
    ``[0, min(cap, base * 2**n)]``; :meth:`reset` after a healthy connection.
    ``base`` defaults to 0.05 s and ``cap`` to 5 s, so reconnect attempts are
    spread out (no thundering herd after a Redis restart) and never more than
    ``cap`` apart.
    """

    base: float = 0.05
    cap: float = 5.0
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"need 0 < base <= cap, got base={self.base} cap={self.cap}")

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 60))

    def next_delay(self, rng: Callable[[], float] = random.random) -> float:
        """The delay before the next attempt (``rng`` returns floats in [0, 1)); counts it."""
        delay = self.ceiling() * rng()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Forget past failures (the connection is healthy again)."""
        self.attempt = 0


async def retry_unavailable(
    attempt: Callable[[], Awaitable[T]],
    *,
    retries: int,
    backoff: ReconnectBackoff,
    give_up: Callable[[], bool],
    on_retry: Callable[[BackendUnavailableError, float], None] | None = None,
) -> T:
    """Await ``attempt()`` until it does not fail as unavailable.

    A :class:`~tornado_longconn.exceptions.BackendUnavailableError` (a busy
    backend, its command pool taken by a reconnect storm) is tried again after
    ``backoff.next_delay()``, at most ``retries`` times and only while
    ``give_up()`` is false; then the error is raised. ``on_retry(error, delay)``
    is called before each wait (for logging). Any other exception is raised at
    once.
    """
    while True:
        try:
            return await attempt()
        except BackendUnavailableError as exc:
            if backoff.attempt >= retries or give_up():
                raise
            delay = backoff.next_delay()
            if on_retry is not None:
                on_retry(exc, delay)
        await asyncio.sleep(delay)  # a backoff: nothing to wait for but time
