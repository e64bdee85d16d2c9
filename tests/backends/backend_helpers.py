"""Helpers shared by the backend tests and the multi-process tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.helpers import REDIS_URL, redis_reachable, require_redis, wait_until
from tornado_longconn.log import Message

__all__ = ["REDIS_URL", "Recorder", "redis_reachable", "require_redis"]


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
        await wait_until(predicate, timeout, changed=self._changed)

    async def wait_messages(self, count: int, timeout: float = 5.0) -> None:
        await self.wait_until(lambda: len(self.messages) >= count, timeout)

    async def wait_gaps(self, count: int, timeout: float = 5.0) -> None:
        await self.wait_until(lambda: len(self.gaps) >= count, timeout)
