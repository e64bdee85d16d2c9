"""The demo app (docs/demo/app.py) in a real browser: headless Chromium driven by Playwright.

The demo runs as its own process on a free port, exactly as a user starts it
(``python docs/demo/app.py --port N``); the pages load ``longconn.js`` from the
package. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import (
    REDIS_URL,
    ROOT,
    chromium,
    free_port,
    needs_chromium,
    require_redis,
)
from tornado_longconn.testing import scaled

DEMO = ROOT / "docs" / "demo" / "app.py"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [pytest.mark.slow]
F = TypeVar("F", bound=Callable[..., Any])


def browser_test(test: F) -> F:
    """Mark ``test`` as a browser test (it drives Chromium), skipped without Chromium."""
    marked: F = pytest.mark.browser(needs_chromium(test))
    return marked


#: Bounded wait for anything the page shows (milliseconds, for Playwright).
UI_WAIT = scaled(15) * 1000
HEARTBEAT = scaled(0.5)


class DemoServer:
    """``python docs/demo/app.py`` as a subprocess; start, stop and start again."""

    def __init__(self, storage: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.storage = storage
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._line = asyncio.Event()  # set on every line of output

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(DEMO),
            "--port",
            str(self.port),
            "--storage",
            str(self.storage),
            "--heartbeat",
            str(HEARTBEAT),
            *self.args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        ready = asyncio.get_running_loop().create_future()
        assert self.proc.stdout is not None
        self._reader = asyncio.ensure_future(self._read(self.proc.stdout, ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), scaled(20))
        except asyncio.TimeoutError:
            pytest.fail("the demo did not start:\n" + "".join(self.output))

    async def _read(self, stdout: asyncio.StreamReader, ready: asyncio.Future[None]) -> None:
        while line := (await stdout.readline()).decode(errors="replace"):
            self.output.append(line)
            self._line.set()
            # The demo logs where to point the browser once it listens.
            if f"open http://localhost:{self.port}/" in line and not ready.done():
                ready.set_result(None)
        if not ready.done():
            ready.set_exception(RuntimeError("the demo exited:\n" + "".join(self.output)))
            ready.exception()

    async def wait_output(self, needle: str, timeout: float) -> str:
        """The first line of output containing ``needle``, waiting (bounded) for it."""

        async def find() -> str:
            while True:
                for line in self.output:
                    if needle in line:
                        return line
                self._line.clear()
                await self._line.wait()

        return await asyncio.wait_for(find(), timeout)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), scaled(15))
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, scaled(5))
            self._reader = None


@contextlib.asynccontextmanager
async def demo_server(storage: Path, *args: str) -> AsyncIterator[DemoServer]:
    server = DemoServer(storage, *args)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


PageFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def open_page(browser: Any) -> AsyncIterator[PageFactory]:
    """Open a demo page; page errors and console errors fail the test."""
    errors: list[str] = []
    contexts: list[Any] = []

    async def open_(url: str, *, init_script: str | None = None) -> Any:
        context = await browser.new_context(viewport={"width": 1200, "height": 720})
        contexts.append(context)
        if init_script:
            await context.add_init_script(init_script)
        page = await context.new_page()
        page.set_default_timeout(UI_WAIT)
        page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
        await page.goto(url)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert not errors, errors


async def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


async def wait_open(page: Any, transport: str | None = None) -> None:
    """Wait until the page's connection is open (on ``transport`` when given)."""
    selector = "#status[data-state=open]"
    if transport:
        selector = f"#status[data-state=open][data-transport={transport}]"
    await page.wait_for_selector(selector)


async def say(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")
    await page.wait_for_function(
        "text => [...document.querySelectorAll('#messages .text')].some(e => e.textContent === text)",
        arg=text,
    )


async def texts(page: Any) -> list[str]:
    result: list[str] = await page.eval_on_selector_all(
        "#messages .text", "els => els.map(e => e.textContent)"
    )
    return result


async def wait_texts(page: Any, expected: list[str]) -> None:
    """Wait until the page's chat lines end with ``expected`` (in order)."""
    await page.wait_for_function(
        """expected => {
            const got = [...document.querySelectorAll('#messages .text')].map(e => e.textContent);
            return expected.every(t => got.includes(t));
        }""",
        arg=expected,
    )
    got = await texts(page)
    assert [t for t in got if t in expected] == expected, got


# --------------------------------------------------------------------------- tests


@browser_test
async def test_two_pages_chat_in_one_room(tmp_path: Path, open_page: PageFactory) -> None:
    async with demo_server(tmp_path) as server:
        room = f"r{secrets.token_hex(3)}"
        alice = await open_page(f"{server.url}/?room={room}&user=alice")
        bob = await open_page(f"{server.url}/?room={room}&user=bob")
        await wait_open(alice, "websocket")
        await wait_open(bob, "websocket")

        await say(alice, "hello bob")
        await say(bob, "hi alice")
        await say(alice, "how are you?")
        expected = ["hello bob", "hi alice", "how are you?"]
        await wait_texts(alice, expected)
        await wait_texts(bob, expected)
        assert await texts(alice) == await texts(bob) == expected

        # Presence: both members, and each one's heartbeat latency once measured.
        for page in (alice, bob):
            await page.wait_for_function(
                "document.querySelector('#member-count').textContent === '2 members'"
            )
            await page.wait_for_function(
                """() => ['alice', 'bob'].every(u => {
                    const li = document.querySelector(`#members li[data-user="${u}"] .lat`);
                    return li && / ms$/.test(li.textContent);
                })"""
            )
        await page_room_count(alice, room, 2)

        # A page that joins later gets the history (and continues from its cursor).
        carol = await open_page(f"{server.url}/?room={room}&user=carol")
        await wait_open(carol)
        await wait_texts(carol, expected)
        assert await carol.locator("#messages li.history").count() == 3
        await screenshot(alice, "demo-chat-alice")
        await screenshot(bob, "demo-chat-bob")


async def page_room_count(page: Any, room: str, count: int) -> None:
    await page.wait_for_function(
        '([room, count]) => { const a = document.querySelector(`#rooms a[data-room="${room}"] .count`);'
        " return a && Number(a.textContent) === count; }",
        arg=[room, count],
    )


NO_WEBSOCKET = "delete window.WebSocket;"
NO_WEBSOCKET_NO_SSE = "delete window.WebSocket; delete window.EventSource;"
# A network that refuses WebSocket upgrades: every WebSocket goes to a closed port.
BLOCKED_WEBSOCKET = """
(() => {
  const Real = window.WebSocket;
  window.WebSocket = function (url, protocols) { return new Real('ws://127.0.0.1:9/', protocols); };
  window.WebSocket.prototype = Real.prototype;
})();
"""


@browser_test
@pytest.mark.parametrize(
    ("case", "query", "script", "transport"),
    [
        pytest.param("no-websocket", "", NO_WEBSOCKET, "sse", id="no-websocket"),
        pytest.param("websocket-blocked", "", BLOCKED_WEBSOCKET, "sse", id="websocket-blocked"),
        pytest.param(
            "no-websocket-no-sse", "", NO_WEBSOCKET_NO_SSE, "longpoll", id="no-websocket-no-sse"
        ),
        pytest.param("chosen-sse", "&transport=sse", None, "sse", id="chosen-sse"),
        pytest.param(
            "chosen-longpoll", "&transport=longpoll", None, "longpoll", id="chosen-longpoll"
        ),
    ],
)
async def test_fallback_transport_sees_every_message(
    tmp_path: Path,
    open_page: PageFactory,
    case: str,
    query: str,
    script: str | None,
    transport: str,
) -> None:
    async with demo_server(tmp_path) as server:
        room = f"f{secrets.token_hex(3)}"
        ws_page = await open_page(f"{server.url}/?room={room}&user=wsuser")
        fallback = await open_page(
            f"{server.url}/?room={room}&user=fbuser{query}", init_script=script
        )
        await wait_open(ws_page, "websocket")
        await wait_open(fallback, transport)
        assert await fallback.eval_on_selector("#status", "e => e.dataset.transport") == transport

        sent = [f"ws message {i}" for i in range(5)]
        for text in sent:
            await ws_page.fill("#text", text)
            await ws_page.click("#send")
        await say(fallback, f"reply over {transport}")
        expected = [*sent, f"reply over {transport}"]
        await wait_texts(fallback, expected)
        await wait_texts(ws_page, expected)
        assert await texts(fallback) == expected  # every message once, in order
        await fallback.wait_for_function(
            "document.querySelector('#member-count').textContent === '2 members'"
        )
        await screenshot(fallback, f"demo-fallback-{case}")


@browser_test
async def test_switching_transport_by_hand_loses_nothing(
    tmp_path: Path, open_page: PageFactory
) -> None:
    async with demo_server(tmp_path) as server:
        room = f"s{secrets.token_hex(3)}"
        switcher = await open_page(f"{server.url}/?room={room}&user=switcher")
        sender = await open_page(f"{server.url}/?room={room}&user=sender")
        await wait_open(switcher, "websocket")
        await wait_open(sender, "websocket")
        expected: list[str] = []
        for transport in ("sse", "longpoll", "websocket"):
            await switcher.select_option("#transport", transport)
            await wait_open(switcher, transport)
            for i in range(3):
                expected.append(f"{transport} {i}")
                await say(sender, expected[-1])
            await wait_texts(switcher, expected)
        assert await texts(switcher) == expected  # resumed from its cursor at every switch
        assert await switcher.inner_text("#resyncs") == "0"
        assert "transport=websocket" in switcher.url


# Records the URL of every WebSocket the page opens.
RECORD_SOCKETS = """
(() => {
  const Real = window.WebSocket;
  window.socketUrls = [];
  window.WebSocket = function (url, protocols) {
    window.socketUrls.push(String(url));
    return new Real(url, protocols);
  };
  window.WebSocket.prototype = Real.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();
"""


async def active_topics(page: Any, count: int) -> list[str]:
    """The page connection's topics, once ``count`` of them are active."""
    await page.wait_for_function(
        "n => window.demo.conn.subscriptions().filter(s => s.state === 'active').length === n",
        arg=count,
    )
    topics: list[str] = await page.evaluate(
        "window.demo.conn.subscriptions().map(s => s.topic).sort()"
    )
    return topics


async def send_dm(page: Any, to: str, text: str) -> None:
    await page.fill("#dm-to", to)
    await page.fill("#dm-text", text)
    await page.click("#dm-send")


async def dms(page: Any, count: int) -> list[str]:
    """The page's direct messages ("who: text"), once there are ``count``."""
    await page.wait_for_function("n => document.querySelectorAll('#dms li').length >= n", arg=count)
    result: list[str] = await page.eval_on_selector_all(
        "#dms li",
        "els => els.map(e => e.querySelector('.who').textContent + ': '"
        " + e.querySelector('.dm-text').textContent)",
    )
    return result


@browser_test
@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
async def test_rooms_direct_messages_and_notifications_on_one_connection(
    tmp_path: Path, open_page: PageFactory, transport: str
) -> None:
    async with demo_server(tmp_path / "uploads") as server:
        room = f"d{secrets.token_hex(3)}"
        query = "" if transport == "websocket" else f"&transport={transport}"
        ann = await open_page(
            f"{server.url}/?room={room}&user=ann{query}", init_script=RECORD_SOCKETS
        )
        bob = await open_page(f"{server.url}/?room={room}&user=bob")
        await wait_open(ann, transport)
        await wait_open(bob, "websocket")
        assert await active_topics(ann, 3) == ["dm:ann", "notify", f"room:{room}"]
        await active_topics(bob, 3)

        # Direct messages both ways; the sender sees its own copy.
        await send_dm(ann, "bob", "psst bob")
        assert await dms(bob, 1) == ["ann: psst bob"]
        await send_dm(bob, "ann", "hi ann")
        assert await dms(ann, 2) == ["to bob: psst bob", "bob: hi ann"]
        # The room on the same connection.
        await say(ann, "in the room")
        await wait_texts(bob, ["in the room"])

        # Another room: the room topic changes, the direct messages go on.
        await ann.fill("#room-name", f"{room}x")
        await ann.press("#room-name", "Enter")
        await ann.wait_for_function(
            "r => window.demo.conn.subscriptions().some(s => s.topic === 'room:' + r"
            " && s.state === 'active')",
            arg=f"{room}x",
        )
        assert await active_topics(ann, 3) == ["dm:ann", "notify", f"room:{room}x"]
        await send_dm(bob, "ann", "still there?")
        assert await dms(ann, 3) == ["to bob: psst bob", "bob: hi ann", "bob: still there?"]

        # A finished upload is a notification on every page.
        await bob.set_input_files(
            "#file",
            files=[{"name": "note.txt", "mimeType": "text/plain", "buffer": b"hello"}],
        )
        await bob.click("#upload")
        notice = ann.locator("#notifications li", has_text="bob uploaded note.txt")
        await notice.wait_for()
        assert await notice.locator("a").get_attribute("href") is not None

        if transport == "websocket":  # one socket for everything (uploads have their own)
            urls = await ann.evaluate("window.socketUrls")
            assert [u for u in urls if "/ws-upload" not in u] == [
                f"ws://127.0.0.1:{server.port}/ws?user=ann"
            ]
        assert await ann.inner_text("#resyncs") == "0"
        await screenshot(ann, f"demo-one-connection-{transport}")


@browser_test
@pytest.mark.parametrize("protocol", ["tus", "websocket"])
async def test_upload_shows_progress_and_stores_exact_bytes(
    tmp_path: Path, open_page: PageFactory, protocol: str
) -> None:
    payload = secrets.token_bytes(3 * 1024 * 1024 + 123)
    digest = hashlib.sha256(payload).hexdigest()
    storage = tmp_path / "uploads"
    async with demo_server(storage) as server:
        room = f"u{secrets.token_hex(3)}"
        page = await open_page(f"{server.url}/?room={room}&user=uploader")
        watcher = await open_page(f"{server.url}/?room={room}&user=watcher")
        await wait_open(page)
        await wait_open(watcher)
        await page.set_input_files(
            "#file",
            files=[
                {"name": "big file.bin", "mimeType": "application/octet-stream", "buffer": payload}
            ],
        )
        await page.select_option("#upload-protocol", protocol)
        held, release = asyncio.Event(), asyncio.Event()
        if protocol == "tus":
            # Hold the third PATCH until the half-done page has been looked at.
            patches = 0

            async def hold(route: Any) -> None:
                nonlocal patches
                if route.request.method == "PATCH":
                    patches += 1
                    if patches == 3:
                        held.set()
                        await release.wait()
                await route.continue_()

            await page.route("**/files/*", hold)
        await page.click("#upload")
        if protocol == "tus":
            await asyncio.wait_for(held.wait(), scaled(15))
            bar = await page.eval_on_selector("#upload-progress", "e => e.value")
            assert 0 < bar < 1
            assert "uploading big file.bin" in await page.inner_text("#upload-status")
            await screenshot(page, "demo-upload-tus-progress")
            release.set()
        link = page.locator("#upload-link")
        await link.wait_for()
        await screenshot(page, f"demo-upload-{protocol}-done")

        progress = await page.evaluate("window.demo.state.progress")
        total = len(payload)
        assert progress[-1] == [total, total]
        assert any(0 < sent < total for sent, _ in progress), progress  # shown while uploading
        assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)
        assert await page.eval_on_selector("#upload-progress", "e => e.value") == 1

        # The sha256 shown, the stored file and the downloaded file all match.
        assert await page.inner_text("#upload-sha") == f"sha256 {digest}"
        stored = [p for p in storage.iterdir() if re.fullmatch(r"[0-9a-f]{32}", p.name)]
        assert len(stored) == 1
        assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == digest
        href = await link.get_attribute("href")
        assert href is not None
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.get(href, timeout=scaled(10))
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == digest
        assert response.headers["content-disposition"].startswith("attachment;")
        assert "big%20file.bin" in response.headers["content-disposition"]
        assert response.headers["x-content-type-options"] == "nosniff"

        # The other member sees the file announced in the room, with its link.
        announced = watcher.locator("#messages li.file a")
        await announced.wait_for()
        assert await announced.inner_text() == "big file.bin"
        assert await announced.get_attribute("href") == href
        await screenshot(watcher, f"demo-upload-{protocol}-announced")


@browser_test
async def test_tus_upload_resumes_after_a_failed_request(
    tmp_path: Path, open_page: PageFactory
) -> None:
    """A PATCH lost on the way: the client asks the offset (HEAD) and continues."""
    payload = secrets.token_bytes(2 * 1024 * 1024 + 7)
    storage = tmp_path / "uploads"
    async with demo_server(storage) as server:
        page = await open_page(f"{server.url}/?room=resume&user=uploader")
        await wait_open(page)
        seen: list[str] = []

        async def flaky(route: Any) -> None:
            seen.append(route.request.method)
            if route.request.method == "PATCH" and seen.count("PATCH") == 3:
                await route.abort("connectionreset")
            else:
                await route.continue_()

        await page.route("**/files/*", flaky)
        await page.set_input_files(
            "#file",
            files=[
                {"name": "resumed.bin", "mimeType": "application/octet-stream", "buffer": payload}
            ],
        )
        await page.click("#upload")
        await page.locator("#upload-link").wait_for()
        assert "HEAD" in seen[seen.index("PATCH") :]  # asked for the offset after the failure
        shown = await page.inner_text("#upload-sha")
        assert shown == f"sha256 {hashlib.sha256(payload).hexdigest()}"


# Cuts the page's first upload socket after its 4th chunk, as a network change would.
CUT_UPLOAD_SOCKET = """
(() => {
  const Real = window.WebSocket;
  window.uploadControls = [];
  let cut = false;
  window.WebSocket = function (url, protocols) {
    const ws = new Real(url, protocols);
    if (String(url).includes('/ws-upload')) {
      let chunks = 0;
      const send = ws.send.bind(ws);
      ws.send = (data) => {
        if (typeof data === 'string') window.uploadControls.push(JSON.parse(data));
        else if (!cut && ++chunks === 4) { cut = true; ws.close(3000, 'cut'); return; }
        send(data);
      };
    }
    return ws;
  };
  window.WebSocket.prototype = Real.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();
"""


@browser_test
async def test_websocket_upload_resumes_after_the_connection_breaks(
    tmp_path: Path, open_page: PageFactory
) -> None:
    """The upload socket breaks after a few chunks: the client resumes from the durable offset."""
    payload = secrets.token_bytes(2 * 1024 * 1024 + 11)
    async with demo_server(tmp_path / "uploads") as server:
        page = await open_page(
            f"{server.url}/?room=resume&user=uploader", init_script=CUT_UPLOAD_SOCKET
        )
        await wait_open(page)
        await page.select_option("#upload-protocol", "websocket")
        await page.set_input_files(
            "#file",
            files=[{"name": "cut.bin", "mimeType": "application/octet-stream", "buffer": payload}],
        )
        await page.click("#upload")
        await page.locator("#upload-link").wait_for()
        controls = await page.evaluate("window.uploadControls")
        assert controls[0]["type"] == "start"
        assert {c["type"] for c in controls[1:]} == {"resume"}  # never started over
        sent = [p[0] for p in await page.evaluate("window.demo.state.progress")]
        assert sent == sorted(sent) and sent[-1] == len(payload)  # progress never went back
        shown = await page.inner_text("#upload-sha")
        assert shown == f"sha256 {hashlib.sha256(payload).hexdigest()}"


@browser_test
async def test_restart_memory_backend_shows_explicit_resync(
    tmp_path: Path, open_page: PageFactory
) -> None:
    server = DemoServer(tmp_path)
    await server.start()
    try:
        room = f"m{secrets.token_hex(3)}"
        page = await open_page(f"{server.url}/?room={room}&user=resumer&backoff_max=500")
        await wait_open(page, "websocket")
        await say(page, "before the restart")

        await server.stop()
        await page.wait_for_selector("#status[data-state=waiting]")
        await server.start()  # same port; the in-memory history is gone (new epoch)

        await page.wait_for_selector("#notice.resync")
        await wait_open(page, "websocket")
        assert int(await page.inner_text("#resyncs")) >= 1
        assert int(await page.inner_text("#reconnects")) >= 1
        assert "Resync" in await page.inner_text("#notice")
        await screenshot(page, "demo-restart-memory-resync")
        # The page is live again on the new server.
        await say(page, "after the restart")
    finally:
        await server.stop()


@browser_test
async def test_page_drops_a_silent_server_and_resumes(
    tmp_path: Path, open_page: PageFactory
) -> None:
    """The server stops answering (SIGSTOP, like a dead NAT entry): the page notices from
    the missing heartbeats, reconnects, and resumes once the server is back."""
    async with demo_server(tmp_path) as server:
        room = f"h{secrets.token_hex(3)}"
        page = await open_page(f"{server.url}/?room={room}&user=patient&backoff_max=500")
        await wait_open(page, "websocket")
        await say(page, "before the silence")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            await page.wait_for_function(
                "window.demo.state.closes.some(c => c.reason === 'idle timeout')"
            )
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await wait_open(page, "websocket")
        await say(page, "after the silence")
        assert await texts(page) == ["before the silence", "after the silence"]
        assert await page.inner_text("#resyncs") == "0"  # same server: resumed, no gap


@browser_test
@pytest.mark.redis
async def test_restart_redis_backend_resumes_without_loss(
    tmp_path: Path, open_page: PageFactory
) -> None:
    await require_redis()
    prefix = f"longconn-test-{secrets.token_hex(4)}:"
    redis_args = ("--redis", REDIS_URL, "--redis-prefix", prefix)
    server = DemoServer(tmp_path, *redis_args)
    await server.start()
    try:
        room = f"x{secrets.token_hex(3)}"
        page = await open_page(f"{server.url}/?room={room}&user=resumer&backoff_max=500")
        await wait_open(page, "websocket")
        await say(page, "before the restart")

        await server.stop()
        await page.wait_for_selector("#status[data-state=waiting]")
        # While the page's server is down, another process on the same Redis takes
        # messages for the room; the page must get them when it resumes.
        async with (
            demo_server(tmp_path, *redis_args) as other,
            httpx.AsyncClient(base_url=other.url) as client,
        ):
            for i in range(3):
                r = await client.post(
                    f"/api/send/{room}?user=other",
                    json={"type": "chat", "text": f"while you were away {i}"},
                    timeout=scaled(10),
                )
                assert r.status_code == 204
        await server.start()

        expected = ["before the restart"] + [f"while you were away {i}" for i in range(3)]
        await wait_texts(page, expected)
        await wait_open(page, "websocket")
        assert await texts(page) == expected  # nothing lost, nothing twice
        assert await page.inner_text("#resyncs") == "0"
        assert int(await page.inner_text("#reconnects")) >= 1
        await say(page, "after the restart")
        await screenshot(page, "demo-restart-redis-resumed")
    finally:
        await server.stop()
        redis = pytest.importorskip("redis.asyncio")
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


# --------------------------------------------------------------------------- hardening
# Real server, real clients (httpx, websockets): no browser needed.

JSON = {"Content-Type": "application/json"}


def chat_body(text: str) -> str:
    return json.dumps({"type": "chat", "text": text})


def dm_body(text: str) -> str:
    return json.dumps({"type": "dm", "text": text})


class RoomClient:
    """A page's WebSocket (subscriptions protocol) that answers heartbeats like longconn.js."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = 0
        self.unread: list[Any] = []  # read while waiting for something else

    async def request(self, frame: dict[str, Any]) -> int:
        self.ids += 1
        await self.ws.send(json.dumps({**frame, "id": self.ids}))
        return self.ids

    async def call(self, method: str, params: Any) -> Any:
        """Send a call; the next reply to it (``result`` or ``error``)."""
        rid = await self.request({"type": "call", "method": method, "params": params})
        return await self.next(lambda m: isinstance(m, dict) and m.get("id") == rid)

    async def next(self, match: Callable[[Any], bool]) -> Any:
        """The next message (a topic message's data, or a bare frame) for which ``match`` holds.

        Frames that do not match are kept for later calls.
        """
        for i, value in enumerate(self.unread):
            if match(value):
                return self.unread.pop(i)

        async def read() -> Any:
            while True:
                value = json.loads(await self.ws.recv())
                if isinstance(value, dict) and value.get("type") == "ping":
                    await self.ws.send('{"type":"pong"}')
                    continue
                if isinstance(value, dict) and "type" not in value and "topic" in value:
                    value = value["data"]
                if match(value):
                    return value
                self.unread.append(value)

        return await asyncio.wait_for(read(), scaled(10))


@contextlib.asynccontextmanager
async def room_socket(server: DemoServer, room: str) -> AsyncIterator[RoomClient]:
    """A page's connection to the demo, subscribed to ``room:<room>``."""
    ws_client = pytest.importorskip("websockets.asyncio.client")
    url = f"ws://127.0.0.1:{server.port}/ws?user=tester"
    async with ws_client.connect(url, open_timeout=scaled(10)) as ws:
        member = RoomClient(ws)
        await member.next(lambda m: m.get("type") == "welcome")
        rid = await member.request({"type": "subscribe", "topic": f"room:{room}"})
        await member.next(lambda m: m.get("type") == "subscribed" and m["id"] == rid)
        yield member


def is_chat(text: str) -> Callable[[Any], bool]:
    return lambda m: isinstance(m, dict) and m.get("type") == "chat" and m.get("text") == text


def is_error(code: str) -> Callable[[Any], bool]:
    return lambda m: isinstance(m, dict) and m.get("type") == "error" and m.get("code") == code


async def test_send_refuses_bad_input_with_4xx_never_500(tmp_path: Path) -> None:
    deep = "[" * 30_000 + "]" * 30_000  # the 60 KB message that raised RecursionError
    async with (
        demo_server(tmp_path) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        send = "/api/send/lobby"
        # A cross-site form or no-cors fetch can only send text/plain: refused.
        r = await client.post(send, content=chat_body("x"), headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = await client.post(
            send, content=chat_body("x"), headers={**JSON, "Origin": "http://evil.example"}
        )
        assert r.status_code == 403 and "cross-site" in r.json()["reason"]
        r = await client.post(
            send, content=chat_body("x"), headers={**JSON, "Sec-Fetch-Site": "cross-site"}
        )
        assert r.status_code == 403
        r = await client.post(send, content=deep, headers=JSON)
        assert r.status_code == 413 and "larger than" in r.json()["reason"]
        r = await client.post(send, content="[" * 5000 + "]" * 5000, headers=JSON)
        assert r.status_code == 400 and "deeper" in r.json()["reason"]
        for body in ("not json", '{"type": "chat"}', '{"type": "chat", "text": "  "}', "[]"):
            r = await client.post(send, content=body, headers=JSON)
            assert r.status_code == 400, (body, r.text)
        # Same-origin browser requests and non-browser clients are served.
        origin = {**JSON, "Origin": server.url, "Sec-Fetch-Site": "same-origin"}
        assert (
            await client.post(send, content=chat_body("same site"), headers=origin)
        ).status_code == 204
        assert (
            await client.post(send, content=chat_body("hello"), headers=JSON)
        ).status_code == 204
        history = (await client.get("/api/history/lobby")).json()
        assert [m["data"]["text"] for m in history["messages"]] == ["same site", "hello"]
    assert "Traceback" not in "".join(server.output)


async def test_websocket_answers_bad_messages_with_an_error_reply(tmp_path: Path) -> None:
    async with demo_server(tmp_path) as server, room_socket(server, "lobby") as member:
        # Frames are refused before they are parsed (size) or while (depth).
        await member.ws.send("[" * 30_000 + "]" * 30_000)
        assert (await member.next(is_error("too_large")))["status"] == 413
        await member.ws.send("[" * 5000 + "]" * 5000)
        assert "deep" in (await member.next(is_error("bad_request")))["reason"]
        await member.ws.send('{"type": "nonsense"}')
        await member.next(is_error("bad_request"))
        # Calls that are not messages, and topics that are not the page's.
        for params in ({"room": "lobby", "text": "  "}, {"room": "no room!", "text": "x"}, [1]):
            reply = await member.call("chat.send", params)
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        assert (await member.call("dm.send", {"to": "a b", "text": "x"}))["code"] == "bad_request"
        assert (await member.call("rm -rf", {}))["code"] == "not_found"
        for topic in ("dm:someone-else", "secret", "room:bad name"):
            rid = await member.request({"type": "subscribe", "topic": topic})
            reply = await member.next(lambda m, rid=rid: m.get("id") == rid)
            assert reply["type"] == "error" and reply["code"] in ("forbidden", "bad_request")
        rid = await member.request({"type": "publish", "topic": "room:lobby", "data": "x"})
        assert (await member.next(lambda m: m.get("id") == rid))["code"] == "forbidden"
        # Still connected, and chat still works.
        reply = await member.call("chat.send", {"room": "lobby", "text": "after the junk"})
        assert reply == {"type": "result", "id": reply["id"], "result": {"sent": True}}
        await member.next(is_chat("after the junk"))
    assert "Traceback" not in "".join(server.output)


async def test_junk_rooms_are_freed_and_cannot_exhaust_the_limit(tmp_path: Path) -> None:
    async with (
        demo_server(tmp_path) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        for i in range(120):  # more than MAX_ROOMS (100)
            assert (await client.get(f"/api/history/junk{i}")).status_code == 200
        rooms = (await client.get("/api/rooms")).json()["rooms"]
        assert not [r for r in rooms if r["name"].startswith("junk")], rooms
        r = await client.post("/api/send/junk999", content=chat_body("still room"), headers=JSON)
        assert r.status_code == 204
        async with room_socket(server, "fresh") as member:
            rooms = (await client.get("/api/rooms")).json()["rooms"]
            assert "fresh" in [r["name"] for r in rooms]
            await member.call("chat.send", {"room": "fresh", "text": "in a fresh room"})
            await member.next(is_chat("in a fresh room"))


async def test_one_connection_cannot_hold_many_rooms(tmp_path: Path) -> None:
    async with (
        demo_server(tmp_path) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
        room_socket(server, "lobby") as member,
    ):
        codes = []
        for i in range(9):  # it holds room:lobby already; 8 topics at most
            rid = await member.request({"type": "subscribe", "topic": f"room:many{i}"})
            reply = await member.next(lambda m, rid=rid: m.get("id") == rid)
            codes.append(reply.get("code", reply["type"]))
        assert codes == ["subscribed"] * 7 + ["limit"] * 2
        topics = ",".join(f"room:poll{i}" for i in range(9))
        r = await client.get("/poll", params={"topics": topics, "timeout": "0"})
        assert r.status_code == 429 and r.json()["code"] == "limit"
        rooms = (await client.get("/api/rooms")).json()["rooms"]
        assert not [r for r in rooms if r["name"].startswith("poll")]


async def test_host_allow_list(tmp_path: Path) -> None:
    async with (
        demo_server(tmp_path) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.2"):
            r = await client.get("/api/config", headers={"Host": host})
            assert r.status_code == 421, host
        for host in (
            f"localhost:{server.port}",
            f"127.0.0.1:{server.port}",
            f"[::1]:{server.port}",
        ):
            assert (await client.get("/api/config", headers={"Host": host})).status_code == 200
    async with (
        demo_server(tmp_path, "--allowed-hosts", "chat.example,127.0.0.1") as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        assert (
            await client.get("/api/config", headers={"Host": "chat.example"})
        ).status_code == 200
        assert (await client.get("/api/config", headers={"Host": "localhost"})).status_code == 421


async def test_expired_uploads_are_swept_on_a_timer(tmp_path: Path) -> None:
    expiry = scaled(0.5)
    args = ("--upload-expiry", str(expiry), "--sweep-interval", str(expiry))
    async with (
        demo_server(tmp_path, *args) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        tus = {"Tus-Resumable": "1.0.0"}
        created = await client.post("/files", headers={**tus, "Upload-Length": "1000"})
        assert created.status_code == 201
        path = httpx.URL(created.headers["Location"]).path
        await client.patch(
            path,
            content=b"x" * 100,
            headers={
                **tus,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            },
        )
        assert len(list(tmp_path.iterdir())) > 0
        await server.wait_output("swept 1 expired uploads", scaled(10))
        head = await client.head(path, headers=tus)
        assert head.status_code in (404, 410)


async def test_upload_location_never_reflects_the_client_host(tmp_path: Path) -> None:
    tus = {"Tus-Resumable": "1.0.0", "Upload-Length": "10"}
    async with (
        demo_server(tmp_path) as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        created = await client.post("/files", headers={**tus, "Host": "localhost"})
        assert created.status_code == 201
        assert re.fullmatch(r"/files/[0-9a-f]{32}", created.headers["Location"])
    async with (
        demo_server(tmp_path, "--base-url", "https://chat.example/") as server,
        httpx.AsyncClient(base_url=server.url, timeout=scaled(10)) as client,
    ):
        created = await client.post("/files", headers=tus)
        assert created.status_code == 201
        assert re.fullmatch(
            r"https://chat\.example/files/[0-9a-f]{32}", created.headers["Location"]
        )


@pytest.mark.redis
async def test_redis_outage_is_never_acknowledged(tmp_path: Path) -> None:
    from tests.backends.redisproc import REDIS_SERVER, RedisProcess

    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed")
    redis = RedisProcess()
    await redis.start()
    try:
        async with (
            demo_server(tmp_path, "--redis", redis.url) as server,
            httpx.AsyncClient(base_url=server.url, timeout=scaled(15)) as client,
            room_socket(server, "lobby") as member,
        ):
            r = await client.post("/api/send/lobby", content=chat_body("before"), headers=JSON)
            assert r.status_code == 204
            await member.next(is_chat("before"))

            await redis.stop()
            for i in range(3):
                r = await client.post(
                    "/api/send/lobby", content=chat_body(f"lost {i}"), headers=JSON
                )
                assert r.status_code == 503, r.text
                assert "not sent" in r.json()["reason"]
            reply = await member.call("chat.send", {"room": "lobby", "text": "over the socket"})
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            assert reply["status"] == 503 and "backend unavailable" in reply["reason"]
            r = await client.post("/api/dm/bob", content=dm_body("lost"), headers=JSON)
            assert r.status_code == 503 and "not sent" in r.json()["reason"]
    finally:
        await redis.close()


@browser_test
@pytest.mark.redis
async def test_page_shows_a_message_the_server_could_not_send(
    tmp_path: Path, open_page: PageFactory
) -> None:
    from tests.backends.redisproc import REDIS_SERVER, RedisProcess

    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed")
    redis = RedisProcess()
    await redis.start()
    try:
        async with demo_server(tmp_path, "--redis", redis.url) as server:
            page = await open_page(f"{server.url}/?room=outage&user=alice")
            await wait_open(page, "websocket")
            await say(page, "before the outage")
            await redis.stop()
            await page.fill("#text", "during the outage")
            await page.click("#send")
            notice = page.locator("#notice.error")
            await notice.wait_for()
            assert "backend unavailable" in await notice.text_content()
            # Not shown as sent, and given back to the user to try again.
            await page.wait_for_function(
                "document.querySelector('#text').value === 'during the outage'"
            )
            assert "during the outage" not in await texts(page)
            await screenshot(page, "demo-not-sent")
    finally:
        await redis.close()


def _demo_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("longconn_demo_app", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function: Hypothesis checks that `extend` uses its argument by reading
    # its source, which it cannot do for a lambda spread over several lines.
    return st.lists(children, max_size=3) | st.dictionaries(
        st.text(alphabet='k"\\[{', max_size=3), children, max_size=3
    )


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\[]{}\u00e9 '),
    _containers,
    max_leaves=20,
)


@given(_json_values)
def test_json_depth_is_counted_without_parsing(value: Any) -> None:
    # Brackets inside strings (escaped quotes included) do not count.
    assert DEMO_APP.json_depth(json.dumps(value)) == _depth(value)
    assert DEMO_APP.json_depth(json.dumps(value, ensure_ascii=False)) == _depth(value)


DEMO_APP = _demo_module()
