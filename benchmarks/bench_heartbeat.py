"""Keepalive cost: HeartbeatMixin vs Tornado's websocket_ping_interval vs websockets.

Scenario (full size; ``--tiny`` runs 200 connections for 2 s): 10,000 idle
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
"""

from __future__ import annotations

import json
import sys
from typing import Any

from harness import (
    BENCH_DIR,
    ClientConfig,
    ServerProcess,
    bench_args,
    run_client,
    server_script,
    write_markdown,
)

VARIANTS = ("none", "ours", "ours-gc-freeze", "tornado", "websockets")
SERVER = "heartbeat_server.py"
INTERVAL = 1.0
# Generous, so that a busy shared machine does not drop connections mid-measurement;
# Tornado caps its own timeout at the interval (1 s).
TIMEOUT = 10.0


def server_stats(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("STATS "):
            stats: dict[str, Any] = json.loads(line[6:])
            return stats
    return {}


def run_variant(variant: str, connections: int, hold: float) -> dict[str, Any]:
    cmd = [
        *server_script(SERVER),
        variant,
        str(connections),
        str(hold),
        str(INTERVAL),
        str(TIMEOUT),
    ]
    cfg = ClientConfig(
        path="/",
        connections=connections,
        verify="count",
        # The server's window must lie inside the client's hold, even when a busy
        # machine delays the server's start of measurement by a few seconds.
        duration=hold + max(2.0, 0.6 * hold),
        timeout=max(60.0, connections / 50),  # opening is slow on a busy machine
    )
    with ServerProcess(cmd, ready_timeout=60.0) as server:
        report = run_client(cfg.with_port(server.port))
    stats = server_stats(server.output)
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
    return {"variant": variant, "stats": stats, "client": report, "errors": errors}


def table(rows: list[dict[str, Any]], connections: int) -> str:
    by = {r["variant"]: r["stats"] for r in rows}
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
        s = r["stats"]
        ok = "yes" if not r["errors"] else "NO: " + "; ".join(r["errors"])[:100]
        if not s:
            lines.append(f"| {r['variant']} | {ok} |" + " - |" * (len(head) - 2))
            continue
        added = (s["rss_per_conn"] - base["rss_per_conn"]) / 1024 if base else float("nan")
        above = s["cpu_s"] - base["cpu_s"] if base else float("nan")
        rtt = f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f}" if "p50_ms" in s else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    ok,
                    f"{r['client'].get('pings', 0):,}",
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


def main() -> int:
    argv = sys.argv[1:]
    connections = 10_000
    if "--connections" in argv:  # e.g. a smaller full run on a busy machine
        i = argv.index("--connections")
        connections = int(argv[i + 1])
        del argv[i : i + 2]
    args = bench_args(__doc__.splitlines()[0], argv)
    hold = 10.0
    if args.tiny:
        connections, hold = 200, 2.0
    rows = []
    for variant in VARIANTS:
        row = run_variant(variant, connections, hold)
        rows.append(row)
        s = row["stats"]
        print(
            f"{variant:15} cpu={s.get('cpu_s', float('nan')):.2f}s "
            f"rss/conn={s.get('rss_per_conn', 0) / 1024:.2f}KiB "
            f"pings={row['client'].get('pings')} errors={row['errors']}",
            flush=True,
        )
    body = (
        f"{connections:,} idle WebSocket connections, ping interval {INTERVAL:g} s "
        f"(timeout {TIMEOUT:g} s; Tornado caps its own at {INTERVAL:g} s), held {hold:g} s; "
        "server CPU and RSS measured by the server over the hold only.\n\n"
        + table(rows, connections)
        + ratios(rows)
        + NOTES
    )
    print(body)
    if not args.tiny:
        out = args.out or BENCH_DIR / "results" / "heartbeat.md"
        write_markdown(
            out,
            "Heartbeat benchmark: idle connections with keepalive",
            "python benchmarks/bench_heartbeat.py"
            + ("" if connections == 10_000 else f" --connections {connections}"),
            body,
        )
        print(f"wrote {out}")
    failed = [r for r in rows if r["errors"]]
    for r in failed:
        print(f"FAILED {r['variant']}: {r['errors']}", file=sys.stderr)
    return 1 if failed else 0


def ratios(rows: list[dict[str, Any]]) -> str:
    """One sentence with the CPU ratios of both ``ours`` rows (empty if any is missing)."""
    cpu = {r["variant"]: (r["stats"] or {}).get("cpu_s") for r in rows}
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
