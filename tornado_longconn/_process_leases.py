"""A process's lease in Redis: the deadline machinery of stores shared by many processes.

A store that keeps per-process state in Redis (connection caps, presence)
gives each process a deadline (Redis ``TIME`` + ``ttl``) in a sorted set,
sets it again every ``refresh_interval`` (default ``ttl / 3``) and, between
refreshes, every ``reap_interval`` removes what processes whose deadline
passed left behind. When Redis cannot be reached the store fails open: it
keeps working on what this process holds, marks itself *dirty*, and the next
refresh that succeeds writes this process's state to Redis again.

:class:`ProcessLease` holds that shared part: the checked settings, the
refresh task, the dirty flag, the fail-open logging and the background tasks.
A store supplies its scripts and the two steps, :meth:`ProcessLease._lease_refresh`
and :meth:`ProcessLease._lease_reap`. :class:`Script`, :data:`UNAVAILABLE`,
:data:`NOW_MS_LUA` and :func:`redis_errors` are the Redis pieces they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
from collections.abc import Coroutine, Iterator
from typing import Any, ClassVar, Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backends.redis import RedisBackend
from .exceptions import BackendError, BackendUnavailableError

__all__ = ["NOW_MS_LUA", "UNAVAILABLE", "ProcessLease", "Script", "redis_errors", "text"]

#: Errors of an unreachable Redis (a refused or broken connection, a timeout).
UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)

#: Lua lines that set ``now`` to Redis's clock in milliseconds (one clock for every process).
NOW_MS_LUA: Final = r"""local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


class Script:
    """A Lua script and its SHA-1, for ``EVALSHA`` (and ``EVAL``/``SCRIPT LOAD`` when missing)."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()


def text(value: Any) -> str:
    """A Redis reply (bytes or not) as ``str``."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def redis_errors(refused: str) -> Iterator[None]:
    """Turn redis-py errors into ours: ``BackendUnavailableError``, else ``BackendError``.

    ``refused`` names what Redis refused in the ``BackendError`` message
    (``"Redis refused <refused>: <error>"``).
    """
    try:
        yield
    except UNAVAILABLE as exc:
        raise BackendUnavailableError(f"Redis is unavailable: {exc}") from exc
    except RedisError as exc:
        raise BackendError(f"Redis refused {refused}: {exc}") from exc


class ProcessLease:
    """The per-process deadline of a store on ``backend``'s Redis (see the module docs).

    ``ttl`` (seconds, > 0): how long this process's state outlives its last
    refresh; ``refresh_interval`` (default ``ttl / 3``, below ``ttl``);
    ``reap_interval`` (default ``refresh_interval`` or ``reap_default`` when
    smaller; at most ``refresh_interval``): how often the refresh task reaps
    between refreshes; ``process`` (default: random) this process's id.
    Raises ``ValueError`` for settings out of range.

    A subclass sets :attr:`_log` and :attr:`_lease_name` (for the log lines),
    implements :meth:`_lease_refresh` and :meth:`_lease_reap`, starts the
    refresh task with :meth:`_start_refresher` and stops it with
    :meth:`_stop_refresher`.
    """

    #: The logger of the store's failures.
    _log: ClassVar[logging.Logger]
    #: The store's name in log lines (``"<name> refresh failed"``).
    _lease_name: ClassVar[str]

    def __init__(
        self,
        backend: RedisBackend,
        *,
        ttl: float,
        refresh_interval: float | None = None,
        reap_interval: float | None = None,
        process: str | None = None,
        reap_default: float = math.inf,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl}")
        self.backend = backend
        self.ttl = ttl
        self.refresh_interval = refresh_interval if refresh_interval is not None else ttl / 3
        if not 0 < self.refresh_interval < ttl:
            raise ValueError("refresh_interval must be > 0 and < ttl")
        self.reap_interval = (
            reap_interval if reap_interval is not None else min(reap_default, self.refresh_interval)
        )
        if not 0 < self.reap_interval <= self.refresh_interval:
            raise ValueError("reap_interval must be > 0 and <= refresh_interval")
        self.process = process or secrets.token_hex(8)
        self.prefix = backend.prefix
        # What Redis holds for this process may differ from what it holds
        # itself (a write failed or was let through): the next refresh rewrites.
        self._dirty = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def _ttl_ms(self) -> int:
        """``ttl`` in milliseconds, as the scripts take it."""
        return round(self.ttl * 1000)

    # -- what a store supplies ---------------------------------------------------

    async def _lease_refresh(self) -> None:
        """Set this process's deadline (and rewrite its state when needed)."""
        raise NotImplementedError

    async def _lease_reap(self) -> None:
        """Remove what processes whose deadline passed left behind (default: the refresh does)."""

    # -- the shared part -----------------------------------------------------------

    def _take_dirty(self, lost: bool = False) -> bool:
        """True (and no longer dirty) when this process's state must be written again.

        ``lost``: the caller found Redis holding other than this process holds.
        """
        if lost or self._dirty:
            self._dirty = False
            return True
        return False

    @contextlib.contextmanager
    def _failing_open(self, step: str) -> Iterator[None]:
        """Log a failure of ``step`` and mark this process dirty instead of raising.

        A Redis error is a warning; any other exception is logged with its
        traceback (a bug must not stop the task that runs the step).
        """
        try:
            yield
        except (BackendError, RedisError, *UNAVAILABLE) as exc:
            self._dirty = True
            self._log.warning("%s %s failed: %s", self._lease_name, step, exc)
        except Exception:
            self._dirty = True
            self._log.exception("%s %s failed", self._lease_name, step)

    def _start_refresher(self) -> None:
        """Start the refresh task (the caller refreshed just before)."""
        self._refresher = asyncio.create_task(self._lease_loop(), name=f"{self!r} refresh")

    async def _stop_refresher(self) -> None:
        """Cancel the refresh task and wait for it to end."""
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher

    async def _lease_loop(self) -> None:
        """Refresh every ``refresh_interval``; reap every ``reap_interval`` in between."""
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            await asyncio.sleep(self.reap_interval)  # a deadline timer, not a poll
            if loop.time() - refreshed >= self.refresh_interval - self.reap_interval / 2:
                with self._failing_open("refresh"):
                    await self._lease_refresh()
                refreshed = loop.time()
            else:
                with self._failing_open("reap"):
                    await self._lease_reap()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task kept until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
