"""The JavaScript client shipped in the package (``tornado_longconn/static/longconn.js``).

* :mod:`tornado_longconn.staticfiles` finds and serves it;
* its pure helpers (full-jitter backoff, cursor comparison, message decoding) run
  in headless Chromium; the connection logic is exercised end to end by
  ``tests/test_demo.py``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.web

from tests.helpers import chromium, needs_chromium
from tornado_longconn.staticfiles import static_path, static_url_spec
from tornado_longconn.testing import AppServer, scaled

CLIENT_SOURCE = Path(static_path("longconn.js")).read_bytes()
browser_only = needs_chromium


def test_static_path_names_the_shipped_client() -> None:
    directory = static_path()
    assert os.path.isdir(directory)
    path = static_path("longconn.js")
    assert path == os.path.join(directory, "longconn.js")
    with open(path, encoding="utf-8") as f:
        assert "LongConn" in f.read()


@pytest.mark.parametrize("name", ["../staticfiles.py", "/etc/passwd", "", ".", "..", "a/b.js"])
def test_static_path_refuses_anything_but_a_file_name(name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        static_path(name)


def test_static_path_unknown_file() -> None:
    with pytest.raises(FileNotFoundError):
        static_path("missing.js")


@pytest.mark.parametrize("prefix", ["longconn/", "/longconn", ""])
def test_static_url_spec_checks_the_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        static_url_spec(prefix)


async def test_static_url_spec_serves_the_client() -> None:
    app = tornado.web.Application([static_url_spec("/assets/lc/")])
    async with AppServer(app) as server, httpx.AsyncClient() as client:
        response = await client.get(server.url("/assets/lc/longconn.js"), timeout=scaled(5))
        assert response.status_code == 200
        assert "javascript" in response.headers["content-type"]
        assert response.content == CLIENT_SOURCE
        missing = await client.get(server.url("/assets/lc/../staticfiles.py"), timeout=scaled(5))
        assert missing.status_code in (403, 404)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    async with chromium() as browser:
        p = await browser.new_page()
        p.set_default_timeout(scaled(10) * 1000)
        await p.set_content("<!doctype html><title>longconn.js</title>")
        await p.add_script_tag(path=static_path("longconn.js"))
        yield p


@browser_only
async def test_backoff_is_full_jitter_capped(page: Any) -> None:
    result = await page.evaluate(
        """() => {
        const out = [];
        for (let attempt = 0; attempt < 12; attempt++) {
            const ceiling = Math.min(8000, 250 * 2 ** attempt);
            let lo = Infinity, hi = -Infinity;
            for (let i = 0; i < 2000; i++) {
                const d = LongConn.backoffDelay(attempt, 250, 8000);
                lo = Math.min(lo, d); hi = Math.max(hi, d);
            }
            out.push({attempt, ceiling, lo, hi,
                      top: LongConn.backoffDelay(attempt, 250, 8000, () => 0.999999),
                      bottom: LongConn.backoffDelay(attempt, 250, 8000, () => 0)});
        }
        return out;
    }"""
    )
    for row in result:
        # Uniform over [0, ceiling): never above the cap, spread over the whole range.
        assert row["lo"] >= 0 and row["hi"] < row["ceiling"], row
        assert row["bottom"] == 0
        assert row["ceiling"] - 1 <= row["top"] < row["ceiling"], row
        assert row["hi"] > 0.9 * row["ceiling"] and row["lo"] < 0.1 * row["ceiling"], row


@browser_only
async def test_cursor_comparison_drops_only_duplicates(page: Any) -> None:
    cases = [
        ("ab12-5", "ab12-4", True),
        ("ab12-4", "ab12-4", False),
        ("ab12-3", "ab12-4", False),
        ("ab12-10", "ab12-9", True),  # numeric, not string, order
        ("cd34-1", "ab12-900", True),  # a new epoch is never a duplicate
        ("not a cursor", "ab12-1", True),
    ]
    for cursor, last, after in cases:
        assert await page.evaluate("([c, l]) => LongConn.isAfter(c, l)", [cursor, last]) is after
    assert await page.evaluate("LongConn.parseCursor('ab12-7')") == {"epoch": "ab12", "offset": 7}
    assert await page.evaluate("LongConn.parseCursor('ab12-07')") is None


@browser_only
async def test_connection_needs_a_usable_transport(page: Any) -> None:
    message = await page.evaluate(
        """() => { try { LongConn.connect({}); return null; } catch (e) { return e.message; } }"""
    )
    assert "no usable transport" in message
    # Forcing a transport the browser lacks is refused the same way.
    message = await page.evaluate(
        """() => { const ES = window.EventSource; delete window.EventSource;
                   try { LongConn.connect({sseUrl: '/sse', transport: 'sse'}); return null; }
                   catch (e) { return e.message; } finally { window.EventSource = ES; } }"""
    )
    assert "no usable transport" in message
