"""Keepalive cost: HeartbeatMixin vs Tornado's websocket_ping_interval vs websockets.

Run: ``python -m benchmarks.bench_heartbeat [--tiny] [--only idle|dead-peer]`` from the
repository root.

Idle scenario (full size; ``--tiny`` runs 200 connections for 2 s): 10,000 idle
WebSocket connections (``--connections N`` for another count), a ping every second,
held for 10 s.
Every variant runs in the same invocation, one after the other, each server in its
own process (CPU 0) and the harness load client in another (CPU 1); the client
answers every ping.

Measured by the server itself over the hold window only (connection setup
excluded): CPU seconds, and RSS per connection against the RSS before the first
connection. ``none`` (no keepalive at all) is the baseline: "added RSS/conn" is a
variant's RSS per connection minus that of ``none``.

Verified: every connection opened, none closed by the server during the hold, the
clients received about one ping per connection per second (none for ``none``).
Results: ``benchmarks/results/heartbeat.md``.

Dead-peer scenario (``ours`` only): 20,000 connections (``--dead-connections``;
``--tiny``: 200) with ``heartbeat_interval`` 10 s and ``heartbeat_timeout`` 5 s
(``--dead-interval`` / ``--dead-timeout``; ``--tiny``: 1 s and 0.5 s). A quarter of
the clients freeze right after answering their first ping once every connection is
open (the server is then done with handshakes): they neither read nor
write again and do not close (a peer gone without a FIN). Reported: the time from
each freeze to the server closing that connection (p50, p99, max) next to the
documented bound ``interval + timeout`` + the scheduler's resolution (0.05 s).
Verified: every frozen connection was closed by the heartbeat before the client's
end, no live connection was closed, and no detection took longer than ``2 x interval
+ timeout`` + resolution (the bound before detection was exact). Whether the maximum
is within the documented bound is a column of the table, not a failure: a busy
machine adds its event-loop lag. Each process raises its open-files soft limit to the
hard one; a limit too low for the size fails the run with a clear message. Results:
``benchmarks/results/heartbeat_dead_peer.md``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks.harness import (
    BENCH_DIR,
    ClientConfig,
    Result,
    ServerProcess,
    bench_args,
    exit_code,
    raise_fd_limit,
    run_client,
    server_command,
    write_markdown,
)

VARIANTS = ("none", "ours", "ours-gc-freeze", "tornado", "websockets")
SERVER = "heartbeat_server.py"
INTERVAL = 1.0
# Generous, so that a busy shared machine does not drop connections mid-measurement;
# Tornado caps its own timeout at the interval (1 s).
TIMEOUT = 10.0


#: The heartbeat scheduler's resolution (``HeartbeatScheduler`` default): a check
#: runs at most this late after its deadline.
RESOLUTION = 0.05


def fd_limit_error(connections: int) -> str:
    """Why this machine cannot hold ``connections`` (empty if it can).

    Raises this process's soft open-files limit to the hard one, as the server and the
    load client do in theirs: each needs one descriptor per connection and a few more.
    """
    limit = raise_fd_limit()
    if connections + 100 <= limit:
        return ""
    return (
        f"open-files limit {limit} is too low for {connections:,} connections "
        "(raise the hard limit, e.g. ulimit -Hn, or run fewer)"
    )


def run_variant(variant: str, connections: int, hold: float) -> Result:
    cmd = server_command(SERVER, variant, str(connections), str(hold), str(INTERVAL), str(TIMEOUT))
    cfg = ClientConfig(
        path="/",
        connections=connections,
        verify="count",
        # The server's window must lie inside the client's hold, even when a busy
        # machine delays the server's start of measurement by a few seconds.
        duration=hold + max(2.0, 0.6 * hold),
        timeout=max(60.0, connections / 50),  # opening is slow on a busy machine
    )
    too_many = fd_limit_error(connections)
    if too_many:
        return Result(variant, "idle", ok=False, error=too_many, extra={"stats": {}})
    try:
        with ServerProcess(cmd, ready_timeout=60.0) as server:
            report = run_client(cfg.with_port(server.port))
    except RuntimeError as exc:  # the server did not start: a failed row, not a crash
        return Result(variant, "idle", ok=False, error=str(exc)[-300:], extra={"stats": {}})
    stats: dict[str, Any] = server.report("STATS", {})
    errors = list(report.get("errors") or [])
    if not stats:
        errors.append(f"no STATS from the server: {server.stderr[-500:]}")
    else:
        if stats["connections"] != connections:
            errors.append(f"server saw {stats['connections']} connections")
        if stats.get("timeouts"):
            errors.append(f"{stats['timeouts']} heartbeat timeouts")
        if stats["closed_during_hold"]:
            errors.append(f"{stats['closed_during_hold']} connections closed during the hold")
    if report.get("connections") != connections:
        errors.append(f"client opened {report.get('connections')} of {connections}")
    pings = int(report.get("pings", 0))
    expected = connections * hold / INTERVAL
    if variant == "none" and pings:
        errors.append(f"{pings} pings without keepalive")
    if variant != "none" and pings < 0.8 * expected:
        errors.append(f"only {pings} pings, expected about {expected:.0f} or more")
    return Result(
        variant,
        "idle",
        ok=not errors,
        error="; ".join(errors),
        messages=pings,
        bytes=int(report.get("bytes", 0)),
        seconds=float(stats.get("seconds", 0.0)),
        server_cpu_s=float(stats.get("cpu_s", 0.0)),
        client=report,
        extra={"stats": stats},
    )


def table(rows: list[Result]) -> str:
    by = {r.variant: r.extra["stats"] for r in rows}
    base = by.get("none") or {}

    def ratio(stats: dict[str, Any], name: str) -> str:
        other = by.get(name) or {}
        if not stats or not other.get("cpu_s"):
            return "-"
        return f"{stats['cpu_s'] / other['cpu_s']:.2f}x"

    head = [
        "variant",
        "verified",
        "pings answered by clients",
        "server CPU s (hold)",
        "CPU vs tornado",
        "CPU vs websockets",
        "CPU above none",
        "RSS/conn KiB",
        "added RSS/conn KiB vs none",
        "RTT p50 / p99 ms",
        "GC s (full collections)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        s = r.extra["stats"]
        ok = "yes" if r.ok else "NO: " + r.error[:100]
        if not s:
            lines.append(f"| {r.variant} | {ok} |" + " - |" * (len(head) - 2))
            continue
        added = (s["rss_per_conn"] - base["rss_per_conn"]) / 1024 if base else float("nan")
        above = s["cpu_s"] - base["cpu_s"] if base else float("nan")
        rtt = f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f}" if "p50_ms" in s else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    r.variant,
                    ok,
                    f"{r.client.get('pings', 0):,}",
                    f"{s['cpu_s']:.2f}",
                    ratio(s, "tornado"),
                    ratio(s, "websockets"),
                    f"{above:.2f}",
                    f"{s['rss_per_conn'] / 1024:.2f}",
                    f"{added:+.2f}",
                    rtt,
                    f"{s.get('gc_seconds', 0.0):.2f} ({(s.get('gc_collections') or [0, 0, 0])[2]})",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (nearest rank); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_dead_peer(connections: int, interval: float, timeout: float) -> Result:
    """A quarter of ``connections`` freeze after their first pong; time to detection."""
    frozen = connections // 4
    cmd = server_command(
        SERVER, "ours", str(connections), "0", str(interval), str(timeout), "--dead-peer"
    )
    bound = interval + timeout + RESOLUTION
    late_bound = 2 * interval + timeout + RESOLUTION  # detection one interval late
    cfg = ClientConfig(
        path="/",
        connections=connections,
        verify="count",
        freeze=frozen,
        # First ping within one interval of opening (jittered), detection within the
        # late bound after the freeze, and room for a busy machine.
        duration=interval + late_bound + max(2.0, 0.2 * (interval + timeout)),
        timeout=max(60.0, connections / 50),
    )
    scenario = f"{connections:,} connections, {frozen:,} freeze"
    errors: list[str] = []
    report: dict[str, Any] = {}
    dead: dict[str, Any] = {}
    too_many = fd_limit_error(connections)
    try:
        if too_many:
            raise RuntimeError(too_many)
        with ServerProcess(cmd, ready_timeout=60.0) as server:
            report = run_client(cfg.with_port(server.port))
        dead = server.report("DEAD", {})
        if not dead:
            errors.append(f"no DEAD report from the server: {server.stderr[-500:]}")
    except RuntimeError as exc:  # the server did not start: a failed row, not a crash
        errors.append(str(exc)[-300:])
    errors += report.get("errors") or []
    delays = [float(d) for d in dead.get("delays", [])]
    since_activity = [float(d) for d in dead.get("since_activity", [])]
    froze = len(report.get("frozen_at") or [])
    if dead:
        if froze != frozen or dead["frozen"] != frozen:
            errors.append(f"{froze} clients froze, server saw {dead['frozen']} of {frozen}")
        if dead["timed_out"] != frozen:
            errors.append(f"heartbeat closed {dead['timed_out']} of {frozen} frozen connections")
        if dead["live_timed_out"]:
            errors.append(f"heartbeat closed {dead['live_timed_out']} live connections")
        if delays and max(delays) > late_bound:
            errors.append(f"detection took up to {max(delays):.3f} s (> {late_bound:g} s)")
    if report and report.get("connections") != connections:
        errors.append(f"client opened {report.get('connections')} of {connections}")
    return Result(
        "ours",
        scenario,
        ok=not errors,
        error="; ".join(errors),
        messages=len(delays),
        client=report,
        extra={
            "connections": connections,
            "frozen": frozen,
            "interval": interval,
            "timeout": timeout,
            "bound": bound,
            "late_bound": late_bound,
            "p50": percentile(delays, 0.50),
            "p99": percentile(delays, 0.99),
            "max": max(delays, default=0.0),
            "min": min(delays, default=0.0),
            "within": sum(d <= bound for d in delays),
            "max_since_activity": max(since_activity, default=0.0),
            "rtt_p99_ms": float(dead.get("p99_ms", 0.0)),
            "live_timed_out": int(dead.get("live_timed_out", 0)),
        },
    )


def dead_peer_table(rows: list[Result]) -> str:
    """The dead-peer results: detection delays next to the documented bound."""
    head = [
        "scenario",
        "variant",
        "verified",
        "interval / timeout s",
        "detected",
        "detection min s",
        "detection p50 s",
        "detection p99 s",
        "detection max s",
        "bound s (interval + timeout + 0.05)",
        "within bound",
        "max from last activity s",
        "late bound s (2 x interval + timeout + 0.05)",
        "live connections dropped",
        "heartbeat RTT p99 ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        x = r.extra
        lines.append(
            "| "
            + " | ".join(
                [
                    r.scenario,
                    r.variant,
                    "yes" if r.ok else "NO: " + r.error[:120],
                    f"{x['interval']:g} / {x['timeout']:g}",
                    f"{r.messages:,} of {x['frozen']:,}",
                    f"{x['min']:.3f}",
                    f"{x['p50']:.3f}",
                    f"{x['p99']:.3f}",
                    f"{x['max']:.3f}",
                    f"{x['bound']:.2f}",
                    f"{x['within']:,} of {r.messages:,}"
                    + (" (all)" if r.messages and x["within"] == r.messages else ""),
                    f"{x['max_since_activity']:.3f}",
                    f"{x['late_bound']:.2f}",
                    f"{x['live_timed_out']:,}",
                    f"{x['rtt_p99_ms']:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


DEAD_NOTES = """
Notes:

* A frozen client answers its first ping after every connection opened, sends one
  text frame with the time it stops (`time.monotonic()`, the same clock in every
  process of the host), then neither reads nor writes and keeps its TCP connection
  open; "detection" is the server's `on_close` for that connection, which the
  heartbeat's timeout triggers.
* The documented bound is `interval + timeout` after the peer's last activity, plus
  the scheduler's resolution (0.05 s). On top of it come the event loop's lag on a
  busy machine, the frozen client's last frames' trip to the server and the dispatch
  of `on_close`. "max from last activity" measures from when the server received
  the frozen client's last frame, as the bound is defined. The late bound is what
  detection took before frames were dated when they arrived (one interval late).
* "live connections dropped" counts connections that never froze and were closed by
  the heartbeat anyway: with a short timeout (1 s), a server or client starved of
  CPU for longer than that (a shared machine at a load average above 10) answers or
  reads pongs too late, and the run fails. The RTT column shows how loaded the
  server was.
* Server (CPU 0) and load client (CPU 1) run on a shared 2-core VM.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 if every scenario verified."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=("idle", "dead-peer"), help="run one scenario")
    parser.add_argument("--connections", type=int, default=10_000, help="idle connections")
    parser.add_argument("--dead-connections", type=int, default=20_000)
    parser.add_argument("--dead-interval", type=float, default=10.0)
    parser.add_argument("--dead-timeout", type=float, default=5.0)
    args = bench_args("", argv, parser=parser)
    connections, hold = args.connections, 10.0
    dead_size = (args.dead_connections, args.dead_interval, args.dead_timeout)
    if args.tiny:
        connections, hold = 200, 2.0
        dead_size = (200, 1.0, 0.5)
    results: list[Result] = []
    if args.only in (None, "idle"):
        results += run_idle(args, connections, hold)
    if args.only in (None, "dead-peer"):
        results += run_dead(args, *dead_size)
    return exit_code(results)


def run_idle(args: argparse.Namespace, connections: int, hold: float) -> list[Result]:
    rows = []
    for variant in VARIANTS:
        row = run_variant(variant, connections, hold)
        rows.append(row)
        s = row.extra["stats"]
        print(
            f"{variant:15} cpu={s.get('cpu_s', float('nan')):.2f}s "
            f"rss/conn={s.get('rss_per_conn', 0) / 1024:.2f}KiB "
            f"pings={row.client.get('pings')} errors={row.error or '-'}",
            flush=True,
        )
    body = (
        f"{connections:,} idle WebSocket connections, ping interval {INTERVAL:g} s "
        f"(timeout {TIMEOUT:g} s; Tornado caps its own at {INTERVAL:g} s), held {hold:g} s; "
        "server CPU and RSS measured by the server over the hold only.\n\n"
        + table(rows)
        + ratios(rows)
        + NOTES
    )
    print(body)
    if not args.tiny:
        out = args.out or BENCH_DIR / "results" / "heartbeat.md"
        write_markdown(
            out,
            "Heartbeat benchmark: idle connections with keepalive",
            "python -m benchmarks.bench_heartbeat --only idle"
            + ("" if connections == 10_000 else f" --connections {connections}"),
            body,
        )
        print(f"wrote {out}")
    return rows


def run_dead(
    args: argparse.Namespace, connections: int, interval: float, timeout: float
) -> list[Result]:
    row = run_dead_peer(connections, interval, timeout)
    x = row.extra
    print(
        f"dead peer: {row.messages} of {x['frozen']} detected, p99 {x['p99']:.3f} s, "
        f"max {x['max']:.3f} s (bound {x['bound']:.2f} s) errors={row.error or '-'}",
        flush=True,
    )
    body = (
        f"{connections:,} WebSocket connections on `HeartbeatMixin` with "
        f"`heartbeat_interval = {interval:g}` and `heartbeat_timeout = {timeout:g}`; "
        f"{x['frozen']:,} of them (a quarter) freeze right after answering their first "
        "ping once every connection is open. Detection = the time from a client's freeze to the server closing its "
        "connection.\n\n" + dead_peer_table([row]) + DEAD_NOTES
    )
    print(body)
    if not args.tiny:
        # --out names this file only when this scenario runs alone (--only dead-peer).
        out = (args.out if args.only else None) or BENCH_DIR / "results" / "heartbeat_dead_peer.md"
        command = "python -m benchmarks.bench_heartbeat --only dead-peer"
        if (connections, interval, timeout) != (20_000, 10.0, 5.0):
            command += (
                f" --dead-connections {connections} --dead-interval {interval:g}"
                f" --dead-timeout {timeout:g}"
            )
        write_markdown(out, "Heartbeat benchmark: dead-peer detection", command, body)
        print(f"wrote {out}")
    return [row]


def ratios(rows: list[Result]) -> str:
    """One sentence with the CPU ratios of both ``ours`` rows (empty if any is missing)."""
    cpu = {r.variant: r.extra["stats"].get("cpu_s") for r in rows}
    need = ("ours", "ours-gc-freeze", "tornado", "websockets")
    if not all(cpu.get(v) for v in need):
        return ""
    return (
        f"\nRatios: the mixin used {cpu['ours'] / cpu['tornado']:.2f}x Tornado's CPU and "
        f"{cpu['ours'] / cpu['websockets']:.2f}x that of `websockets`; with "
        f"`heartbeat_gc_freeze` {cpu['ours-gc-freeze'] / cpu['tornado']:.2f}x and "
        f"{cpu['ours-gc-freeze'] / cpu['websockets']:.2f}x.\n"
    )


NOTES = """
Notes:

* "CPU above none" is the keepalive's own cost: the idle baseline uses no CPU.
* "GC s" is the time the server spent in Python's cyclic garbage collector during
  the hold, with the number of full (generation 2) collections. With 10,000
  connections a full collection walks over a million objects (Tornado's per-connection
  handler, stream and pending read future among them) and takes a large part of a
  second; how many of them fall inside the 10 s window moves a variant's CPU figure
  more than anything else. `heartbeat_gc_freeze` takes the long-lived connection
  objects out of the collector's sight.
* "RTT p50 / p99" is the heartbeat round trip seen by the server; when the load client
  or the server's loop falls behind it measures that backlog, not the network.
* The machine is a shared 2-core VM: compare ratios within a run.
"""


if __name__ == "__main__":
    sys.exit(main())
