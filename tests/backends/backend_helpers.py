"""Helpers shared by the backend tests and the multi-process tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from tornado_longconn.log import Message
from tornado_longconn.testing import scaled

__all__ = ["REDIS_URL", "Recorder", "redis_reachable", "require_redis"]

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


async def redis_reachable(url: str = REDIS_URL) -> bool:
    """Whether something accepts TCP connections where ``url`` points."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            opening = asyncio.open_unix_connection(parts.path)
        else:
            opening = asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379)
        _reader, writer = await asyncio.wait_for(opening, 2)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def require_redis() -> None:
    """Skip the calling test when Redis or the redis package is missing."""
    pytest.importorskip("redis.asyncio", reason="the redis package is not installed")
    if not await redis_reachable():
        pytest.skip(f"no Redis server at {REDIS_URL} (set REDIS_URL to point at one)")


class Recorder:
    """A subscriber that records messages and gaps and lets a test await them."""

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.messages: list[Message] = []
        self.gaps: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Recorder {self.name}>"

    def on_message(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    def on_gap(self, topic: str, reason: str) -> None:
        self.gaps.append((topic, reason))
        self._changed.set()

    @property
    def data(self) -> list[str | bytes]:
        return [m.data for m in self.messages]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), scaled(timeout))

    async def wait_messages(self, count: int, timeout: float = 5.0) -> None:
        await self.wait_until(lambda: len(self.messages) >= count, timeout)

    async def wait_gaps(self, count: int, timeout: float = 5.0) -> None:
        await self.wait_until(lambda: len(self.gaps) >= count, timeout)
