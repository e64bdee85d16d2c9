"""LongConnCollector without a server: families from snapshots, topic labels, shared files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import tornado.web

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tornado_longconn import BroadcastHub, OverflowPolicy
from tornado_longconn.histogram import LatencyHistogram
from tornado_longconn.metrics import LongConnCollector, read_shared_families


def scrape(collector: LongConnCollector) -> dict[str, Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


async def test_topic_labels_are_opt_in_and_capped() -> None:
    hub = BroadcastHub()
    try:
        for name in ("a", "b", "c"):
            await hub.group(name).publish("m")
        assert "longconn_topic_members" not in scrape(LongConnCollector(hubs=[hub]))
        families = scrape(LongConnCollector(hubs=[hub], topic_labels=2))
        published = samples(families["longconn_topic_published"])
        assert published == {(("topic", "a"),): 1.0, (("topic", "b"),): 1.0}
    finally:
        await hub.close()
    with pytest.raises(ValueError, match="topic_labels"):
        LongConnCollector(topic_labels=-1)


async def test_parts_not_given_export_no_family() -> None:
    families = scrape(LongConnCollector())
    assert families == {}
    app = tornado.web.Application()
    names = set(scrape(LongConnCollector(application=app)))
    assert {"longconn_connections", "longconn_heartbeat_rtt_seconds"} <= names
    assert "longconn_groups" not in names


async def test_drops_are_labelled_with_each_groups_policy() -> None:
    hub = BroadcastHub()
    try:
        hub.group("default")
        hub.group("lossy", policy=OverflowPolicy.DROP_NEWEST)
        families = scrape(LongConnCollector(hubs=[hub]))
        dropped = samples(families["longconn_messages_dropped"])
        assert set(dropped) == {(("policy", "close"),)}  # no drops yet: only the default
    finally:
        await hub.close()


def test_histogram_snapshots_of_processes_add_up_per_bucket() -> None:
    a, b = LatencyHistogram((0.1, 1.0)), LatencyHistogram((0.1, 1.0))
    a.observe(0.05)
    b.observe(0.5)
    b.observe(5.0)
    from tornado_longconn import sum_stats

    total = sum_stats([a.stats(), b.stats()])
    assert total.cumulative() == ((0.1, 1), (1.0, 2), (float("inf"), 3))
    assert total.count == 3 and total.sum == pytest.approx(5.55)
    with pytest.raises(ValueError, match="increasing"):
        LatencyHistogram((1.0, 0.5))


def test_shared_files_sum_counters_of_all_and_gauges_of_the_living(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    while True:
        try:
            os.kill(dead, 0)
        except ProcessLookupError:
            break
        dead += 1
    rtt = [[0.1, 1], [float("inf"), 2]]
    for pid, groups, published in ((os.getpid(), 2, 10), (dead, 5, 7)):
        families = [
            ["longconn_groups", [[[], groups]]],
            ["longconn_messages_published", [[[], published]]],
            ["longconn_member_buffer_max_bytes", [[[], 100 * groups]]],
            ["longconn_heartbeat_rtt_seconds", [[[], rtt, 0.3]]],
            ["not_ours", [[[], 1]]],
        ]
        (tmp_path / f"longconn_{pid}.json").write_text(json.dumps(families))
    (tmp_path / "longconn_1.json.tmp").write_text("{")  # not a snapshot file
    (tmp_path / f"longconn_{os.getpid() + 1}.json").write_text("{broken")  # skipped
    metrics = {m.name: m for m in read_shared_families(str(tmp_path))}
    assert set(metrics) == {
        "longconn_groups",
        "longconn_messages_published",
        "longconn_heartbeat_rtt_seconds",
        "longconn_member_buffer_max_bytes",
    }
    assert [s.value for s in metrics["longconn_groups"].samples] == [2]  # the living only
    assert [s.value for s in metrics["longconn_messages_published"].samples] == [17]
    assert [s.value for s in metrics["longconn_member_buffer_max_bytes"].samples] == [200]
    hist = {
        s.name: s.value
        for s in metrics["longconn_heartbeat_rtt_seconds"].samples
        if s.name.endswith(("_count", "_sum"))
    }
    assert hist == {
        "longconn_heartbeat_rtt_seconds_count": 4,
        "longconn_heartbeat_rtt_seconds_sum": pytest.approx(0.6),
    }


async def test_handler_serves_the_default_registry_or_the_multiprocess_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from tornado_longconn.metrics import MetricsHandler
    from tornado_longconn.testing import AppServer, scaled

    hub = BroadcastHub()
    hub.group("room")
    collector = LongConnCollector(hubs=[hub])
    app = tornado.web.Application([(r"/metrics", MetricsHandler, {"collector": collector})])
    try:
        async with AppServer(app) as server, httpx.AsyncClient(timeout=scaled(10)) as http:
            plain = (await http.get(server.url("/metrics"))).text
            monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
            multi = (await http.get(server.url("/metrics"))).text
    finally:
        await hub.close()
    assert "python_info" in plain and "longconn_groups 1.0" in plain
    # In multiprocess mode the one-process default registry is not served.
    assert "python_info" not in multi and "longconn_groups 1.0" in multi
    assert collector.application is app  # filled in by the handler


async def test_accept_loop_families_count_accepted_connections() -> None:
    import httpx

    from tests.helpers import free_port
    from tornado_longconn import start_server
    from tornado_longconn.testing import scaled

    app = tornado.web.Application([(r"/", _Ok)])
    port = free_port()
    server = start_server(app, port, "127.0.0.1")
    try:
        async with httpx.AsyncClient(timeout=scaled(10)) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/")).status_code == 200
        families = scrape(LongConnCollector(servers=[server]))
    finally:
        server.stop()
    assert samples(families["longconn_accepted_connections"]) == {(): server.stats().accepted}
    assert server.stats().accepted >= 1
    assert samples(families["longconn_accept_paused"]) == {(): 0.0}


class _Ok(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("ok")
