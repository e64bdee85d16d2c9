"""The benchmark harness: its load client verifies delivery, servers report through
report lines, and run_all finds and runs the benchmark modules.

The load client runs in its own process (as in the benchmarks) against a Tornado
server in the test's event loop, on real 127.0.0.1 sockets.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.web
import tornado.websocket

from benchmarks import harness, run_all
from tornado_longconn.testing import AppServer

BENCH_DIR = harness.BENCH_DIR
SCALE = float(os.environ.get("LONGCONN_TEST_TIMEOUT_FACTOR", 1))

KIB = 1024


class Stream(tornado.websocket.WebSocketHandler):
    """Streams ``count`` payloads of ``size``; ``corrupt``/``skip``/``dup`` spoil one of them."""

    async def open(self) -> None:
        count = harness.query_int(self, "count")
        size = harness.query_int(self, "size")
        corrupt = harness.query_int(self, "corrupt", -1)
        skip = harness.query_int(self, "skip", -1)
        dup = harness.query_int(self, "dup", -1)
        text = harness.query_int(self, "text", 0)
        make = harness.PayloadMaker(size)
        try:
            for seq in range(count):
                if seq == skip:
                    continue
                payload = make(seq)
                if seq == corrupt:
                    payload = payload[:-1] + b"!"
                await self.write_message(payload.decode() if text else payload, binary=not text)
                if seq == dup:
                    await self.write_message(payload, binary=True)
                if seq % 10 == 0:
                    self.ping(b"p")
        except tornado.websocket.WebSocketClosedError:
            pass


@pytest.fixture
async def server() -> AsyncIterator[AppServer]:
    async with AppServer(tornado.web.Application([("/stream", Stream)])) as srv:
        yield srv


async def client(server: AppServer, **kwargs: Any) -> dict[str, Any]:
    cfg = harness.ClientConfig(port=server.port, timeout=30.0, **kwargs)
    return await asyncio.to_thread(harness.run_client, cfg)


@pytest.mark.parametrize("connections", [1, 3])
async def test_client_verifies_exact_delivery(server: AppServer, connections: int) -> None:
    report = await client(
        server, path="/stream?count=50&size=1024", connections=connections, expect=50, size=1024
    )
    assert report["ok"], report["errors"]
    assert report["connections"] == connections
    assert report["frames"] == 50 * connections
    assert report["payload_bytes"] == 50 * 1024 * connections
    assert report["pings"] == 5 * connections  # answered with pongs, not counted as data
    # 2-byte ping frames + 4-byte headers of 1 KiB frames
    assert report["bytes"] == (50 * (4 + 1024) + 5 * 3) * connections


async def test_client_accepts_text_frames(server: AppServer) -> None:
    report = await client(server, path="/stream?count=20&size=100&text=1", expect=20)
    assert report["ok"], report["errors"]
    assert report["frames"] == 20


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("corrupt=7", "frame 7: wrong payload"),
        ("skip=3", "frame 3: wrong payload"),
        ("dup=4", "frame 5: wrong payload"),
    ],
)
async def test_client_detects_wrong_delivery(server: AppServer, query: str, error: str) -> None:
    report = await client(server, path=f"/stream?count=20&size=64&{query}", expect=20)
    assert not report["ok"]
    assert any(error in e for e in report["errors"]), report["errors"]


async def test_stream_mode_verifies_bytes(server: AppServer) -> None:
    n = 300
    report = await client(
        server, path=f"/stream?count={n}&size=2000", expect=n, size=2000, verify="stream"
    )
    # The handler pings every 10 messages; in stream mode the client expects data frames only.
    assert not report["ok"]
    assert any("stream mismatch" in e and "(frame 1)" in e for e in report["errors"])


async def test_stream_mode_detects_corruption_and_passes_clean_streams() -> None:
    class Plain(Stream):
        def ping(self, data: Any = b"") -> None:
            pass

    async with AppServer(tornado.web.Application([("/stream", Plain)])) as srv:
        good = await client(
            srv, path="/stream?count=300&size=2000", expect=300, size=2000, verify="stream"
        )
        bad = await client(
            srv,
            path="/stream?count=300&size=2000&corrupt=123",
            expect=300,
            size=2000,
            verify="stream",
        )
    assert good["ok"], good["errors"]
    assert good["frames"] == 300 and good["bytes"] == 300 * (4 + 2000)
    assert not bad["ok"]
    assert any("(frame 123)" in e for e in bad["errors"]), bad["errors"]


async def test_wrong_count_and_size_fail(server: AppServer) -> None:
    short = await client(server, path="/stream?count=5&size=64", expect=10, duration=0.5)
    assert not short["ok"]
    assert any("received 5 of 10" in e for e in short["errors"]), short["errors"]
    size = await client(server, path="/stream?count=5&size=64", expect=5, size=65)
    assert not size["ok"]
    assert any("64 bytes, expected 65" in e for e in size["errors"]), size["errors"]


async def test_stopped_client_reads_nothing(server: AppServer) -> None:
    report = await client(
        server, path="/stream?count=2000&size=16384", stop_reading=True, duration=0.3
    )
    assert report["ok"], report["errors"]
    # Only what arrived in the same read as the handshake response (one read, <= 256 KiB)
    # is seen; 2,000 x 16 KiB were offered.
    assert report["bytes"] <= 256 * KIB
    assert report["frames"] * 16 * KIB <= report["bytes"]


async def test_slow_reader_is_bounded_by_its_rate(server: AppServer) -> None:
    rate = 512 * KIB
    report = await client(
        server,
        path="/stream?count=2000&size=16384",
        read_rate=rate,
        duration=0.5,
        rcvbuf=64 * KIB,
    )
    assert report["ok"], report["errors"]
    assert report["frames"] > 0
    # The token bucket lets one read (at most 256 KiB) through before it pauses.
    assert report["bytes"] <= rate * report["wall_seconds"] + 256 * KIB


def test_payloads() -> None:
    assert harness.make_payload(255, 20) == b"00000000000000ffqrst"
    assert harness.PayloadMaker(5000)(7) == harness.make_payload(7, 5000)
    assert harness.check_payload(7, harness.make_payload(7, 100))
    assert not harness.check_payload(8, harness.make_payload(7, 100))
    with pytest.raises(ValueError, match=">= 16"):
        harness.make_payload(0, 15)


def test_markdown_table_ratios() -> None:
    def result(variant: str, seconds: float, cpu: float) -> harness.Result:
        return harness.Result(variant, "s", True, "", 1000, 10**6, seconds, cpu, 30.0, 1.0)

    table = harness.markdown_table(
        [result("ours", 1.0, 0.5), result("peer", 2.0, 2.0)], ratios_vs=["peer"]
    )
    lines = table.splitlines()
    assert "msgs/s vs peer" in lines[0] and "CPU/msg vs peer" in lines[0]
    assert "| 2.00x | 0.25x |" in lines[2]
    assert "| 1.00x | 1.00x |" in lines[3]
    best = harness.best_of([result("ours", 2.0, 1.0), result("ours", 1.0, 1.0)])
    assert len(best) == 1 and best[0].seconds == 1.0


def test_run_all_discovers_and_reports(tmp_path: Path) -> None:
    assert BENCH_DIR / "bench_backpressure.py" in run_all.discover()
    pkg = tmp_path / "benches"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    # Run as a module of its package: a sibling module imports by its package name.
    (pkg / "common.py").write_text("FINE = 'fine'\n")
    (pkg / "bench_a.py").write_text(
        "import sys\nfrom benches.common import FINE\n"
        "assert sys.argv[1:] == ['--tiny'] and __name__ == '__main__'\nprint(FINE)\n"
    )
    (pkg / "bench_b.py").write_text("import sys\nsys.exit(3)\n")
    (pkg / "helper.py").write_text("raise SystemExit(1)\n")
    cmd = [sys.executable, str(BENCH_DIR / "run_all.py"), "--tiny", "--dir", str(pkg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("bench_a.py") and " ok " in lines[0]
    assert lines[1].startswith("bench_b.py") and "FAILED (exit 3)" in lines[1]
    assert lines[-1].startswith("1/2 benchmark scripts passed")
    (pkg / "bench_b.py").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_run_all_runs_modules_of_a_package_only(tmp_path: Path) -> None:
    assert run_all.command(BENCH_DIR / "bench_heartbeat.py", "--tiny")[1:] == [
        "-m",
        "benchmarks.bench_heartbeat",
        "--tiny",
    ]
    (tmp_path / "bench_x.py").write_text("")
    with pytest.raises(ValueError, match="not a package"):
        run_all.command(tmp_path / "bench_x.py")


def test_report_lines_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    harness.emit("STATS", {"cpu_s": 1.5, "runs": [1, 2]})
    harness.announce(8080)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ['STATS {"cpu_s": 1.5, "runs": [1, 2]}', "PORT 8080"]
    assert [harness.parse_report(line) for line in lines] == [
        ("STATS", {"cpu_s": 1.5, "runs": [1, 2]}),
        ("PORT", 8080),
    ]
    for not_a_report in ("hello", "stats {}", "STATS {not json", "STATS", ""):
        assert harness.parse_report(not_a_report) is None
    with pytest.raises(ValueError, match="upper-case word"):
        harness.emit("stats", 1)


def test_server_process_reads_reports_while_the_server_runs() -> None:
    script = (
        "import sys\n"
        "from benchmarks.harness import emit\n"
        "emit('PORT', 1)\n"
        "emit('RUN', {'n': 0})\n"
        "print('not a report', flush=True)\n"
        "emit('RUN', {'n': 1})\n"
        "sys.stdin.read()\n"  # until SIGTERM
    )
    with harness.ServerProcess([sys.executable, "-c", script]) as server:
        assert server.port == 1
        assert server.wait_report("RUN", after=1) == {"n": 1}
        assert server.reports("RUN") == [{"n": 0}, {"n": 1}]
        assert server.report("STATS", "none") == "none"
        assert "not a report" in server.output
        with pytest.raises(RuntimeError, match="no STATS report #0"):
            server.wait_report("STATS", timeout=0.01)


def test_request_report_asks_a_server_for_one() -> None:
    cmd = harness.server_command("longpoll_chatdemo")
    with harness.ServerProcess(cmd) as server:
        assert harness.request_report(server, "STATS") == {"waiting": 0}
        assert harness.request_report(server, "STATS") == {"waiting": 0}
        assert server.reports("STATS") == [{"waiting": 0}, {"waiting": 0}]
        with pytest.raises(RuntimeError, match="answered 404"):
            harness.request_report(server, "LAG")


class Pinged(tornado.websocket.WebSocketHandler):
    """Records its connection, the pongs it gets and the text messages it receives."""

    def initialize(self, state: dict[str, Any]) -> None:
        self.state = state
        self.pongs = 0
        self.messages: list[str] = []

    def open(self) -> None:
        conns = self.state["conns"]
        conns.append(self)
        if len(conns) == self.state["expected"]:
            self.state["opened"].set()

    def on_pong(self, data: bytes) -> None:
        self.pongs += 1
        self.state["pong"].set()

    def on_message(self, message: str | bytes) -> None:
        assert isinstance(message, str)
        if message == "go":  # the client's start message: all its connections are open
            self.state["go"].set()
        else:
            self.messages.append(message)


async def test_frozen_clients_stop_after_their_first_pong() -> None:
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {
        "conns": [],
        "expected": 3,
        "opened": asyncio.Event(),
        "go": asyncio.Event(),
        "pong": asyncio.Event(),
    }
    app = tornado.web.Application([("/", Pinged, {"state": state})])
    async with AppServer(app) as srv:
        cfg = harness.ClientConfig(
            port=srv.port,
            connections=3,
            freeze=1,
            verify="count",
            start_message="go",
            duration=2.0 * SCALE,
        )
        client = loop.run_in_executor(None, harness.run_client, cfg)
        await asyncio.wait_for(state["go"].wait(), 30)
        conns: list[Pinged] = state["conns"]

        async def ping_all(answers: int) -> None:
            for c in conns:
                c.ping(b"hb")
            while sum(c.pongs for c in conns) < answers:
                state["pong"].clear()
                await asyncio.wait_for(state["pong"].wait(), 10)

        await ping_all(3)  # every connection answers its first ping
        await ping_all(5)  # then only the two that did not freeze
        report = await client
    assert report["ok"], report["errors"]
    assert report["connections"] == 3 and report["pings"] == 5
    [frozen_at] = report["frozen_at"]
    frozen = [c for c in conns if c.messages]
    assert len(frozen) == 1 and frozen[0].messages == [f"frozen {frozen_at:.6f}"]
    assert sorted(c.pongs for c in conns) == [1, 2, 2]
    assert frozen[0].pongs == 1


def test_server_process_runs_a_variant() -> None:
    cfg = harness.ClientConfig(path="/stream?count=100&size=1024", expect=100, size=1024)
    script = harness.server_command("stream_server", "tornado-await")
    [result] = harness.run_scenarios(script, [("s", cfg)], variant="tornado-await")
    assert result.ok, result.error
    assert result.messages == 100 and result.bytes == 100 * (4 + 1024)
    assert result.rss_start_mb > 0 and result.server_cpu_s >= 0
    broken = harness.run_scenario([sys.executable, "-c", "print('hello')"], cfg)
    assert not broken.ok and "expected 'PORT <n>'" in broken.error


SIO_PATH = "/socket.io/?EIO=4&transport=websocket"


@pytest.fixture
async def sio_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[AppServer, Any]]:
    """python-socketio on Tornado: on ``go``, emits ``count`` payloads to every client.

    ``go`` takes ``{"count": n, "skip": k}``; after every 10th event the server also sends
    each client an Engine.IO ping. The pongs it receives are counted in ``sio.pongs``.
    """
    engineio = pytest.importorskip("engineio")
    socketio = pytest.importorskip("socketio")
    sio = socketio.AsyncServer(async_mode="tornado")
    sio.pongs = 0
    sio.pong_event = asyncio.Event()
    receive = engineio.async_socket.AsyncSocket.receive

    async def counting_receive(self: Any, pkt: Any) -> None:
        if pkt.packet_type == engineio.packet.PONG:
            sio.pongs += 1
            sio.pong_event.set()
        await receive(self, pkt)

    monkeypatch.setattr(engineio.async_socket.AsyncSocket, "receive", counting_receive)

    @sio.on("connect")  # type: ignore[untyped-decorator,unused-ignore]
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        await sio.enter_room(sid, "r")

    @sio.on("go")  # type: ignore[untyped-decorator,unused-ignore]
    async def go(sid: str, spec: dict[str, int]) -> None:
        make = harness.PayloadMaker(64)
        for seq in range(spec["count"]):
            if seq != spec.get("skip"):
                await sio.emit("m", make(seq).decode(), room="r")
            if seq % 10 == 0:
                for _, eio_sid in list(sio.manager.get_participants("/", "r")):
                    ping = engineio.packet.Packet(engineio.packet.PING)
                    await sio.eio.send_packet(eio_sid, ping)

    app = tornado.web.Application([(r"/socket.io/", socketio.get_tornado_handler(sio))])
    async with AppServer(app) as srv:
        yield srv, sio
    await sio.shutdown()


async def test_socketio_mode_verifies_events_and_answers_pings(
    sio_server: tuple[AppServer, Any],
) -> None:
    srv, sio = sio_server
    report = await client(
        srv,
        path=SIO_PATH,
        protocol="socketio",
        connections=3,
        expect=30,
        size=64,
        start_message='42["go",{"count":30}]',
    )
    assert report["ok"], report["errors"]
    assert report["connections"] == 3
    assert report["frames"] == 90  # events only: not the open, connect or ping packets
    assert report["payload_bytes"] == 90 * 64
    assert report["pings"] == 9
    while sio.pongs < 9:
        sio.pong_event.clear()
        await asyncio.wait_for(sio.pong_event.wait(), 10.0)


@pytest.mark.parametrize(
    ("spec", "kwargs", "error"),
    [
        ('{"count":20,"skip":3}', {"expect": 20}, "event 3: wrong payload"),
        ('{"count":20}', {"expect": 20, "size": 65}, "event 0: 64 bytes, expected 65"),
        ('{"count":5}', {"expect": 10, "duration": 0.5}, "received 5 of 10"),
    ],
)
async def test_socketio_mode_detects_wrong_delivery(
    sio_server: tuple[AppServer, Any], spec: str, kwargs: dict[str, Any], error: str
) -> None:
    srv, _ = sio_server
    report = await client(
        srv, path=SIO_PATH, protocol="socketio", start_message=f'42["go",{spec}]', **kwargs
    )
    assert not report["ok"]
    assert any(error in e for e in report["errors"]), report["errors"]


async def test_socketio_mode_needs_a_socketio_server(server: AppServer) -> None:
    report = await client(server, path="/stream?count=5&size=64", protocol="socketio", expect=5)
    assert not report["ok"]
    assert report["connections"] == 0 and report["connect_errors"] == 1
    assert any("Socket.IO: expected unfragmented text frames" in e for e in report["errors"])
