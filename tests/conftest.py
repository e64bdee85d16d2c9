"""Shared test configuration.

* Event loop: the suite runs on the default asyncio loop, or on uvloop when the
  environment variable ``LONGCONN_EVENT_LOOP=uvloop`` is set (``.ci/run`` runs
  both), so nothing depends on one loop's internals.
* Timing: timing-dependent tests scale every interval by one factor, taken from
  ``LONGCONN_TEST_TIMEOUT_FACTOR`` (default 1); raise it on a slow or busy
  machine instead of editing tests. ``tornado_longconn.testing.scaled()`` and
  ``tornado_longconn.testing.MS`` apply it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import pytest

from tests.helpers import LOOP, new_event_loop

# --doctest-modules (pyproject) imports every module here to look for doctests;
# conftest files are plugins, already loaded, and two share the name "conftest".
collect_ignore_glob = ["conftest.py", "*/conftest.py"]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if LOOP not in ("asyncio", "uvloop"):
        raise pytest.UsageError(f"LONGCONN_EVENT_LOOP must be 'asyncio' or 'uvloop', not {LOOP!r}")
    return {LOOP: new_event_loop}


def pytest_report_header(config: pytest.Config) -> str:
    factor = os.environ.get("LONGCONN_TEST_TIMEOUT_FACTOR", "1")
    return f"tornado-longconn: event loop {LOOP}, timing factor {factor}"


@pytest.fixture
def event_loop_name() -> str:
    """Which event loop implementation this run uses ("asyncio" or "uvloop")."""
    return LOOP
