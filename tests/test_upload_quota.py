"""Upload quotas per user: the I/O-free ledger (hypothesis), then tus and WebSocket uploads."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import tornado.web
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_upload_ws import closed_with
from tornado_longconn.codes import CloseCode
from tornado_longconn.testing import AppServer, scaled
from tornado_longconn.upload import UploadStore
from tornado_longconn.upload_quota import (
    QuotaTicket,
    UploadQuota,
    UploadQuotaExceeded,
    UploadQuotaLedger,
)
from tornado_longconn.upload_tus import TusUploadHandler
from tornado_longconn.upload_ws import WebSocketUploadHandler

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}

# -- the ledger --------------------------------------------------------------------------

KEYS = ("ann", "bob")
ops = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.sampled_from(KEYS), st.integers(0, 600)),
        st.tuples(st.just("remove"), st.integers(0, 20)),
        st.tuples(st.just("begin"), st.sampled_from(KEYS), st.integers(0, 150)),
        st.tuples(st.just("end"), st.integers(0, 20)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    max_in_flight=st.none() | st.integers(0, 300),
    max_total=st.none() | st.integers(0, 1500),
)
def test_ledger_matches_a_model(
    ops: list[tuple[Any, ...]], max_in_flight: int | None, max_total: int | None
) -> None:
    """Usage is the sum of live uploads and open tickets; a request is refused exactly
    when it would pass a limit (413 / 429 as documented), and then changes nothing."""
    ledger = UploadQuotaLedger(UploadQuota(max_in_flight=max_in_flight, max_total=max_total))
    uploads: list[tuple[str, str, int]] = []  # (id, key, size)
    tickets: list[QuotaTicket] = []
    for n, op in enumerate(ops):
        if op[0] == "create":
            _, key, size = op
            total = sum(s for _, k, s in uploads if k == key)
            over = max_total is not None and total + size > max_total
            try:
                ledger.add_total(key, f"u{n}", size)
            except UploadQuotaExceeded as exc:
                assert over and exc.status == 413
            else:
                assert not over
                uploads.append((f"u{n}", key, size))
        elif op[0] == "remove" and uploads:
            upload_id, _, _ = uploads.pop(op[1] % len(uploads))
            ledger.remove(upload_id)
        elif op[0] == "begin":
            _, key, nbytes = op
            flying = sum(t.nbytes for t in tickets if t.key == key and t.open)
            try:
                tickets.append(ledger.begin(key, nbytes))
            except UploadQuotaExceeded as exc:
                assert max_in_flight is not None
                if nbytes > max_in_flight:
                    assert exc.status == 413
                else:
                    assert flying + nbytes > max_in_flight
                    assert exc.status == 429 and exc.retry_after == 1.0
            else:
                assert max_in_flight is None or flying + nbytes <= max_in_flight
        elif op[0] == "end" and tickets:
            ledger.end(tickets[op[1] % len(tickets)])  # again: idempotent
        for key in KEYS:
            usage = ledger.usage(key)
            assert usage.total == sum(s for _, k, s in uploads if k == key)
            assert usage.in_flight == sum(t.nbytes for t in tickets if t.key == key and t.open)
            if max_in_flight is not None:
                assert usage.in_flight <= max_in_flight
            if max_total is not None:
                assert usage.total <= max_total


def test_quota_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_total"):
        UploadQuota(max_total=-1)
    with pytest.raises(ValueError, match="retry_after"):
        UploadQuota(retry_after=0)


# -- tus --------------------------------------------------------------------------------


class UserTus(TusUploadHandler):
    def get_current_user(self) -> str | None:
        return self.request.headers.get("X-User")


async def tus_server(store: UploadStore, ledger: UploadQuotaLedger) -> AppServer:
    app = tornado.web.Application(UserTus.routes("/files", store=store, quotas=ledger))
    return AppServer(app)


@pytest.fixture
async def tus(tmp_path: Path) -> AsyncIterator[tuple[str, UploadStore, UploadQuotaLedger]]:
    store = UploadStore(tmp_path / "uploads", max_size=1 << 20)
    ledger = UploadQuotaLedger(UploadQuota(max_in_flight=1000, max_total=2000, retry_after=2))
    async with await tus_server(store, ledger) as server:
        yield server.url("/files/"), store, ledger
    await store.drain_tasks()
    store.close()


async def test_tus_total_quota_is_413_before_anything_is_created(
    tus: tuple[str, UploadStore, UploadQuotaLedger],
) -> None:
    base, store, ledger = tus
    ann = {**TUS, "X-User": "ann"}
    async with httpx.AsyncClient() as http:
        first = await http.post(base, headers={**ann, "Upload-Length": "1500"})
        assert first.status_code == 201
        over = await http.post(base, headers={**ann, "Upload-Length": "600"})
        assert over.status_code == 413 and "quota" in over.text
        assert store.stats().created == 1
        # Another user, and no user at all, are not limited by ann's usage.
        bob = await http.post(base, headers={**TUS, "X-User": "bob", "Upload-Length": "1500"})
        anonymous = await http.post(base, headers={**TUS, "Upload-Length": "100000"})
        assert (bob.status_code, anonymous.status_code) == (201, 201)
        # A deferred length counts once declared.
        deferred = await http.post(base, headers={**ann, "Upload-Defer-Length": "1"})
        assert deferred.status_code == 201
        url = urljoin(base, deferred.headers["Location"])
        declared = await http.patch(
            url, headers={**ann, **OCTETS, "Upload-Offset": "0", "Upload-Length": "600"}
        )
        assert declared.status_code == 413
        # Terminating an upload gives its bytes back.
        gone = await http.delete(urljoin(base, first.headers["Location"]), headers=ann)
        assert gone.status_code == 204
        again = await http.post(base, headers={**ann, "Upload-Length": "600"})
        assert again.status_code == 201
    assert ledger.usage("ann").total == 600
    stats = store.stats()
    assert stats.quota_refusals == 2 and dict(stats.refused)["413"] == 2


async def test_tus_bytes_in_flight_is_429_with_retry_after(
    tus: tuple[str, UploadStore, UploadQuotaLedger],
) -> None:
    base, store, ledger = tus
    ann = {**TUS, "X-User": "ann"}
    port = int(base.split(":")[2].split("/")[0])
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient() as http:
        urls = []
        for size in (800, 1200):
            resp = await http.post(base, headers={**ann, "Upload-Length": str(size)})
            urls.append(urljoin(base, resp.headers["Location"]))
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        try:
            path = urls[0].split(str(port), 1)[1]
            await loop.sock_sendall(
                sock,
                (
                    f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nX-User: ann\r\n"
                    "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                    "Expect: 100-continue\r\nContent-Length: 800\r\n\r\n"
                ).encode(),
            )
            interim = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
            assert interim.startswith(b"HTTP/1.1 100"), interim  # 800 bytes in flight
            assert ledger.usage("ann").in_flight == 800
            busy = await http.patch(
                urls[1], headers={**ann, **OCTETS, "Upload-Offset": "0"}, content=b"b" * 300
            )
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "2"
            assert busy.headers["Upload-Offset"] == "0"
            too_big = await http.patch(
                urls[1], headers={**ann, **OCTETS, "Upload-Offset": "0"}, content=b"b" * 1001
            )
            assert too_big.status_code == 413 and "quota" in too_big.text
            # Creation with a body is refused before the upload is created.
            created = store.stats().created
            with_body = await http.post(
                base, headers={**ann, **OCTETS, "Upload-Length": "300"}, content=b"c" * 300
            )
            assert with_body.status_code == 429 and store.stats().created == created
            await loop.sock_sendall(sock, b"a" * 800)
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 204"), reply
        finally:
            sock.close()
        assert ledger.usage("ann").in_flight == 0
        resp = await http.patch(
            urls[1], headers={**ann, **OCTETS, "Upload-Offset": "0"}, content=b"b" * 300
        )
        assert resp.status_code == 204
    stats = store.stats()
    assert stats.quota_refusals == 3
    assert dict(stats.refused)["429"] == 2


async def test_tus_in_flight_is_given_back_when_the_client_vanishes(
    tus: tuple[str, UploadStore, UploadQuotaLedger],
) -> None:
    base, store, ledger = tus
    port = int(base.split(":")[2].split("/")[0])
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient() as http:
        resp = await http.post(base, headers={**TUS, "X-User": "ann", "Upload-Length": "900"})
        path = urljoin(base, resp.headers["Location"]).split(str(port), 1)[1]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    try:
        await loop.sock_sendall(
            sock,
            (
                f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nX-User: ann\r\n"
                "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                "Expect: 100-continue\r\nContent-Length: 900\r\n\r\n"
            ).encode(),
        )
        interim = await asyncio.wait_for(loop.sock_recv(sock, 4096), scaled(10))
        assert interim.startswith(b"HTTP/1.1 100"), interim
        await loop.sock_sendall(sock, b"a" * 100)
    finally:
        sock.close()
    await store.drain_tasks()
    async with httpx.AsyncClient() as http:
        head = await http.head(urljoin(base, path), headers=TUS)
    assert ledger.usage("ann").in_flight == 0
    assert int(head.headers["Upload-Offset"]) <= 100


# -- WebSocket uploads ---------------------------------------------------------------------


class UserWs(WebSocketUploadHandler):
    def get_current_user(self) -> str | None:
        return self.get_query_argument("user", None)


async def test_websocket_quotas_close_4413_and_4429(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads", max_size=1 << 20)
    ledger = UploadQuotaLedger(UploadQuota(max_in_flight=3000, max_total=5000))
    app = tornado.web.Application(
        [(r"/up", UserWs, {"store": store, "window": 2, "chunk_size": 1000, "quotas": ledger})]
    )
    async with AppServer(app) as server:
        url = server.ws_url("/up?user=ann")
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "size": 6000}))
            assert await closed_with(ws) == CloseCode.UPLOAD_TOO_LARGE
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            await first.send(json.dumps({"type": "start", "size": 2000}))
            ready = json.loads(await asyncio.wait_for(first.recv(), scaled(5)))
            assert ready["type"] == "ready"
            assert ledger.usage("ann").in_flight == 2000  # the window: 2 x 1000
            await second.send(json.dumps({"type": "start", "size": 2000}))
            assert await closed_with(second) == CloseCode.RATE_LIMITED
        async with websockets.connect(server.ws_url("/up?user=bob")) as bob:
            await bob.send(json.dumps({"type": "start", "size": 2000}))
            ready = json.loads(await asyncio.wait_for(bob.recv(), scaled(5)))
            assert ready["type"] == "ready"
    await store.drain_tasks()
    store.close()
    assert ledger.usage("ann") == ledger.usage("ann").__class__(in_flight=0, total=2000)
    assert store.stats().quota_refusals == 2
