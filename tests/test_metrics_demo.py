"""The demo's /metrics and /api/inspect after a scripted run: families, values, log fields.

The demo app runs in this process (``make_app``) on a free port of 127.0.0.1, so
the test can compare what a scrape says with the parts' ``stats()`` directly.
The run: a healthy member that answers heartbeats, a member that stops reading
(closed as a slow consumer), a member that goes silent (aborted by the
heartbeat), chat published, an SSE stream held open, a long-poll that times
out, a tus upload completed and one segment refused by its checksum.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_until
from tests.test_demo import DEMO_APP
from tornado_longconn import heartbeat_stats, protocol_error_stats
from tornado_longconn.backends.memory import MemoryBackend
from tornado_longconn.connections import connection_stats
from tornado_longconn.heartbeat import HeartbeatCounters
from tornado_longconn.logfields import FIELDS
from tornado_longconn.metrics import FAMILIES
from tornado_longconn.subscriptions import subscription_stats
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled

HEARTBEAT = 0.5  # seconds, scaled: a dead peer is aborted after about 1 s


def tus_metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def answer_heartbeats(ws: WebSocketTestClient) -> None:
    """Read everything; answer the demo's application-level pings like longconn.js."""
    while True:
        message = await ws.recv()
        if message == '{"type":"ping"}':
            await ws.send('{"type":"pong"}')


async def page(server: AppServer, user: str, room: str, **options: Any) -> WebSocketTestClient:
    """A page's one WebSocket to the demo, asking for ``room:<room>`` (the answer is not awaited)."""
    ws = await WebSocketTestClient.connect(server.ws_url(f"/ws?user={user}"), **options)
    await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": f"room:{room}"}))
    return ws


def parse(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The one sample ``name`` with exactly ``labels`` (counters: the ``_total`` sample)."""
    family = families[name]
    sample_name = name + "_total" if family.type == "counter" else name
    found = [s.value for s in family.samples if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return float(found[0])


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[tuple[Any, AppServer]]:
    backend = MemoryBackend()
    demo = DEMO_APP.Demo(backend, str(tmp_path / "uploads"), scaled(HEARTBEAT))
    app = DEMO_APP.make_app(demo)
    async with AppServer(app) as server:
        yield demo, server
    await demo.hub.close()
    await demo.waiter.close()
    demo.store.close()


async def test_scrape_after_a_scripted_run_matches_the_parts_stats(
    demo: tuple[Any, AppServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tornado_longconn")
    app_demo, server = demo
    app = server.app
    base = server.url("/").rstrip("/")

    # Members (one connection per page, subscribed to a room): one healthy (answers
    # heartbeats), one slow (stops reading), one silent (reads, never answers).
    healthy = await page(server, "ann", "lobby")
    reader = asyncio.ensure_future(answer_heartbeats(healthy))
    slow = await page(server, "bob", "slow", rcvbuf=4096, reading=False)
    silent = await page(server, "cat", "quiet")
    for room in ("lobby", "slow", "quiet"):
        await wait_until(lambda room=room: len(app_demo.hub.get(f"room:{room}") or ()) == 1)
    await healthy.send(json.dumps({"type": "call", "id": 2, "method": "no.such", "params": {}}))
    await wait_until(lambda: dict(subscription_stats(app).errors).get("not_found") == 1)
    counters = HeartbeatCounters.for_application(app)
    try:
        # Publish: chat over HTTP, and enough to the slow room to overflow its member.
        async with httpx.AsyncClient(base_url=base, timeout=scaled(10)) as http:
            reply = await http.post(
                "/api/send/lobby",
                content=json.dumps({"type": "chat", "text": "hello", "user": "ann"}),
                headers={"Content-Type": "application/json", "Origin": base},
            )
            assert reply.status_code < 300, reply.text
            slow_room = app_demo.rooms["slow"]
            text = "x" * 60_000  # a few of these overflow the slow member at once
            for i in range(1000):
                await app_demo.publish(slow_room, {"type": "chat", "user": "z", "text": text})
                if app_demo.hub.stats().closed_slow:
                    break
                if i % 4 == 3:
                    await asyncio.sleep(0)  # let the writers flush, as live traffic would
            assert app_demo.hub.stats().closed_slow == 1
            slow.resume_reading()  # the close is behind what it had not read
            await slow.wait_closed()

            # The silent member is aborted by its heartbeat; the healthy one gets round trips.
            await silent.wait_closed(scaled(10))
            await wait_until(lambda: counters.stats().count >= 1)

            # Uploads: one completed, one segment refused by its checksum.
            data = b"metrics upload\n" * 100
            created = await http.post(
                "/files",
                headers={
                    "Tus-Resumable": "1.0.0",
                    "Upload-Length": str(len(data)),
                    "Upload-Metadata": tus_metadata(filename="a.txt", room="lobby", user="ann"),
                },
            )
            assert created.status_code == 201, created.text
            location = created.headers["Location"]
            bad = await http.patch(
                location,
                content=data,
                headers={
                    "Tus-Resumable": "1.0.0",
                    "Upload-Offset": "0",
                    "Content-Type": "application/offset+octet-stream",
                    "Upload-Checksum": "sha1 "
                    + base64.b64encode(hashlib.sha1(b"other").digest()).decode(),
                },
            )
            assert bad.status_code == 460, bad.text
            good = await http.patch(
                location,
                content=data,
                headers={
                    "Tus-Resumable": "1.0.0",
                    "Upload-Offset": "0",
                    "Content-Type": "application/offset+octet-stream",
                },
            )
            assert good.status_code == 204, good.text

            # Long-poll that times out; an SSE stream held open during the scrape.
            poll = await http.get("/poll", params={"topics": "room:lobby", "timeout": "0.05"})
            assert poll.status_code == 200
            async with http.stream("GET", "/sse", params={"topics": "room:lobby"}) as events:
                lines = events.aiter_lines()
                while (await lines.__anext__()) != "":
                    pass  # the first event (ready) has arrived: the stream is counted
                # The demo may still be publishing (a leave of a closed member, an
                # upload's notice) and the healthy member answers heartbeats: scrape
                # until nothing moved between the scrape and the parts' own counters.
                for _ in range(50):
                    scrape = await http.get("/metrics")
                    hub, beat = app_demo.hub.stats(), heartbeat_stats(app)
                    hist = counters.latency_histogram()
                    scraped = parse(scrape.text)
                    if (
                        value(scraped, "longconn_messages_published"),
                        value(scraped, "longconn_messages_delivered"),
                        value(scraped, "longconn_written_bytes"),
                        value(scraped, "longconn_heartbeat_pings"),
                        [
                            x.value
                            for x in scraped["longconn_heartbeat_rtt_seconds"].samples
                            if x.name.endswith("_count")
                        ],
                    ) == (hub.published, hub.delivered, hub.bytes, beat.pings_sent, [hist.count]):
                        break
                inspect = await http.get("/api/inspect")
                waits, uploads = (
                    app_demo.waiter.stats(),
                    app_demo.store.stats(),
                )
                conns = connection_stats(app)
                backend = app_demo.backend.stats()
                latency = app_demo.backend.publish_latency()
                errors = protocol_error_stats(app)
                subs = subscription_stats(app)
    finally:
        reader.cancel()
        for client in (healthy, slow, silent):
            client.vanish()

    assert scrape.status_code == 200
    assert scrape.headers["Content-Type"].startswith("text/plain;")
    families = parse(scrape.text)
    for name, (kind, labels, _help) in FAMILIES.items():
        if name.startswith(("longconn_topic_", "longconn_accept")):
            continue  # opt-in (topic labels), and no server handed to the collector here
        assert name in families, name
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == set(labels), (name, sample)
            assert math.isfinite(sample.value) and sample.value >= 0, (name, sample)

    # Connections by transport (the slow and silent members are gone).
    assert conns.websocket == 1 and conns.sse == 1
    for transport in ("websocket", "sse", "longpoll"):
        assert value(families, "longconn_connections", transport=transport) == conns.open(transport)
        assert value(families, "longconn_connections_opened", transport=transport) == conns.opened(
            transport
        )
    assert conns.websocket_opened >= 3 and conns.longpoll_opened >= 1

    # Groups and messages.
    assert value(families, "longconn_groups") == hub.groups
    assert value(families, "longconn_group_members") == hub.members
    assert value(families, "longconn_messages_published") == hub.published > 0
    assert value(families, "longconn_messages_delivered") == hub.delivered > 0
    assert value(families, "longconn_messages_dropped", policy="close") == hub.dropped
    assert value(families, "longconn_written_bytes") == hub.bytes > 0
    assert value(families, "longconn_slow_consumers_closed") == hub.closed_slow == 1
    assert value(families, "longconn_backend_subscriptions", backend="memory") == (
        backend.subscribers
    )

    # The subscriptions protocol: three subscribes, one unknown call refused.
    assert subs.subscribed == 3 and dict(subs.errors) == {"not_found": 1}
    assert value(families, "longconn_subscription_connections") == subs.connections == 1
    assert value(families, "longconn_subscriptions") == subs.subscriptions == 1
    assert value(families, "longconn_subscription_requests", type="subscribe") == 3
    assert value(families, "longconn_subscription_requests", type="call") == subs.calls
    assert value(families, "longconn_subscription_errors", code="not_found") == 1
    assert value(families, "longconn_subscription_errors", code="forbidden") == 0
    assert value(families, "longconn_subscription_closes", code="1008") == 0

    # Heartbeats: the round-trip histogram and the dead peer.
    assert value(families, "longconn_heartbeat_dead_peers") == beat.timeouts >= 1
    assert value(families, "longconn_heartbeat_pings") == beat.pings_sent
    rtt = families["longconn_heartbeat_rtt_seconds"]
    buckets = {s.labels["le"]: s.value for s in rtt.samples if s.name.endswith("_bucket")}
    assert buckets["+Inf"] == hist.count == beat.count >= 1
    assert [buckets[str(float(b)) if not math.isinf(b) else "+Inf"] for b, _ in hist.buckets] == [
        c for _, c in hist.cumulative()
    ]
    counts = [s.value for s in rtt.samples if s.name.endswith("_count")]
    sums = [s.value for s in rtt.samples if s.name.endswith("_sum")]
    assert counts == [hist.count] and sums == [pytest.approx(hist.sum)]
    assert value(families, "longconn_protocol_errors", code="1002") == dict(errors.by_code).get(
        1002, 0
    )

    # Long-poll and SSE.
    assert value(families, "longconn_sse_streams") == waits.streams == 1
    assert value(families, "longconn_longpoll_waiting") == waits.waiting
    assert value(families, "longconn_longpoll_timeouts") == waits.timeouts >= 1

    # Uploads.
    assert value(families, "longconn_uploads_completed") == uploads.completed == 1
    # The refused segment was received and written too (then truncated away).
    assert (
        value(families, "longconn_upload_received_bytes") == uploads.bytes_stored == 2 * len(data)
    )
    assert value(families, "longconn_uploads_active") == uploads.active == 0
    assert (
        value(families, "longconn_uploads_failed", reason="checksum_mismatch")
        == uploads.checksum_mismatches
        == 1
    )

    # Backend publish latency: one observation per publish.
    publish = families["longconn_backend_publish_latency_seconds"]
    inf = [
        s.value
        for s in publish.samples
        if s.name.endswith("_bucket") and s.labels == {"backend": "memory", "le": "+Inf"}
    ]
    assert inf == [latency.count] and latency.count >= hub.published
    assert value(families, "longconn_backend_gaps", backend="memory") == backend.gaps
    assert value(families, "longconn_backend_reconnects", backend="memory") == 0

    # The inspection endpoint (the test client is local: allowed).
    assert inspect.status_code == 200
    doc = inspect.json()
    rooms = {g["name"]: g["members"] for g in doc["groups"]}
    assert rooms["room:lobby"] == 1
    assert doc["presence"] == {"scope": "process", "members": rooms, "cluster": None}
    assert [w["user"] for w in doc["writers"]] == ["ann"]
    assert doc["heartbeat"]["p50"] is not None and doc["heartbeat"]["timeouts"] >= 1
    assert doc["backends"][0]["kind"] == "memory"
    assert doc["uploads"]["completed"] == 1

    # Log records of the run carry the fields.
    ours = [r for r in caplog.records if r.name.startswith("tornado_longconn")]
    assert ours and all(all(hasattr(r, f) for f in FIELDS) for r in ours)
    slow_close = [r for r in ours if "slow consumer" in r.getMessage()]
    assert len(slow_close) == 1
    assert slow_close[0].longconn_user == "bob"
    assert slow_close[0].longconn_remote == "127.0.0.1"
    assert slow_close[0].longconn_conn.startswith("c")
    timeout = [r for r in ours if "heartbeat timeout" in r.getMessage()]
    assert timeout and timeout[0].longconn_user == "cat"
    assert timeout[0].longconn_conn != slow_close[0].longconn_conn
    sse = [r for r in ours if r.getMessage().startswith("SSE stream on")]
    assert sse and sse[0].longconn_topic == "room:lobby" and sse[0].longconn_remote == "127.0.0.1"
    assert sse[0].longconn_conn.startswith("c")


async def test_inspection_is_refused_without_the_hook_saying_yes(tmp_path: Path) -> None:
    from tornado_longconn.inspection import InspectionHandler

    calls: list[str] = []

    async def never(request: Any) -> bool:
        calls.append(request.path)
        return False

    import tornado.web

    app = tornado.web.Application(
        [
            (r"/none", InspectionHandler),
            (r"/never", InspectionHandler, {"authorize": never}),
            (r"/yes", InspectionHandler, {"authorize": lambda request: True}),
        ]
    )
    async with AppServer(app) as server, httpx.AsyncClient(timeout=scaled(10)) as http:
        none = await http.get(server.url("/none"))
        refused = await http.get(server.url("/never"))
        allowed = await http.get(server.url("/yes"))
    assert (none.status_code, refused.status_code, allowed.status_code) == (403, 403, 200)
    assert calls == ["/never"]
    assert none.json() == {"error": "forbidden"}
    assert allowed.json()["presence"]["cluster"] is None


def test_reference_page_lists_every_family() -> None:
    page = (Path(__file__).parent.parent / "docs" / "reference" / "metrics.md").read_text()
    for name, (kind, _labels, _help) in FAMILIES.items():
        shown = name + "_total" if kind == "counter" else name
        assert f"| `{shown}` | {kind} |" in page, name
