"""Broadcast fan-out: BroadcastGroup vs the tutorial loop, Tornado awaiting, websockets, bare send.

Scenarios (full size; ``--tiny`` runs one burst and one paced shape and the stopped-clients
case once, with 50 clients, in a few seconds):

* 5,000 clients x 100 messages x 64 B, and x 20 x 4 KiB, each in two modes:
  ``burst`` (all messages published back to back) and ``paced`` (one message
  per event-loop iteration); every variant in the same run;
* slow consumers: 5,000 clients x 50 x 4 KiB paced, with the group's members
  limited to 64 KiB (``CLOSE`` policy) and a 32 KiB ``SO_SNDBUF``, first with every
  client reading, then with 5% (250) clients that stop reading (own client process,
  4 KiB receive buffer); the fast clients' per-connection rate and the server's RSS
  growth are compared (three such pairs in a full run, interleaved; the median pair
  is reported).

``bare-send`` (see ``servers/broadcast_server.py``) is the reference technique the
fan-out was specified against: the frame built once and ``socket.send`` to each
member whose stream has nothing pending, with no flow control, no corking and no
bookkeeping. In ``paced`` mode nothing can be merged, so it is about the least a
server that writes every message as it comes can spend.

Every client verifies that it received exactly the expected frames, in order.
Results: ``benchmarks/results/broadcast.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    BENCH_DIR,
    ClientConfig,
    Result,
    ServerProcess,
    bench_args,
    best_of,
    exit_code,
    markdown_table,
    result_from,
    run_client,
    server_command,
    start_client,
    write_markdown,
)

VARIANTS = ("ours", "websockets", "bare-send", "tornado-await", "tutorial")
SERVER = "broadcast_server.py"


def result_of(
    variant: str, scenario: str, report: dict[str, Any], measure: dict[str, float]
) -> Result:
    return result_from(
        variant, scenario, report, measure, extra={"rss_peak_mb": measure["rss_peak_mb"]}
    )


#: Seconds a peer's client run may take once connected. The slowest peers
#: (Tornado's write_message with 5,000 members) can need more on a busy machine: they
#: are then reported with the rate of what they delivered in that time, marked "NO".
CLIENT_TIMEOUT = 15.0
#: The same for our variant, which must always finish (its failure fails the run).
OURS_TIMEOUT = 90.0


def fanout_config(conns: int, count: int, size: int, mode: str) -> ClientConfig:
    return ClientConfig(
        path="/ws",
        connections=conns,
        expect=count,
        size=size,
        verify="stream",
        opcode=2,
        timeout=CLIENT_TIMEOUT,
        start_message=f"go {conns} {count} {size} {mode}",
    )


def run_fanout(
    variants: tuple[str, ...], scenarios: list[tuple[str, ClientConfig]], repeat: int
) -> list[Result]:
    """Every scenario against every variant, interleaved.

    One server process per variant stays up for the whole run; each scenario is
    run against every variant in turn, so the variants of one scenario are measured
    within seconds of each other on a machine whose load drifts.
    """
    results: dict[str, list[Result]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        servers = {
            v: stack.enter_context(ServerProcess(server_command(SERVER, v))) for v in variants
        }
        for name, cfg in scenarios:
            for _ in range(repeat):
                for variant, server in servers.items():
                    server.mark()
                    timeout = OURS_TIMEOUT if variant == "ours" else CLIENT_TIMEOUT
                    run_cfg = dataclasses.replace(cfg, port=server.port, timeout=timeout)
                    report = run_client(run_cfg)
                    r = result_of(variant, name, report, server.measure())
                    results[variant].append(r)
                    print(
                        f"  {name:28} {variant:14} {'ok' if r.ok else 'FAILED'} "
                        f"{r.msgs_per_s:>12,.0f} msgs/s",
                        flush=True,
                    )
    for variant, server in servers.items():
        use_run_cpu(results[variant], server)
    return [r for name, _ in scenarios for v in variants for r in results[v] if r.scenario == name]


def use_run_cpu(results: list[Result], server: ServerProcess) -> None:
    """Use the server's own CPU figure, and RSS growth from when all clients were open.

    The runner's figures include 5,000 WebSocket handshakes and connection objects
    per run, which would swamp the fan-out; the server's ``RUN`` line counts CPU from
    "go" to the last close and gives its RSS at "go".
    """
    runs: list[dict[str, Any]] = server.reports("RUN")
    if len(runs) != len(results):
        print(f"  (server reported {len(runs)} runs for {len(results)} results)", flush=True)
        return
    for r, run in zip(results, runs, strict=True):
        r.server_cpu_s = float(run["cpu_s"])
        rss_go = float(run.get("rss_go", 0)) / 1e6
        peak = float(r.extra.get("rss_peak_mb", 0.0))
        if rss_go and peak:
            r.rss_start_mb = rss_go
            r.rss_growth_mb = max(0.0, peak - rss_go)


def run_slow(
    conns: int, count: int, size: int, high_water: int, sndbuf: int, stopped: int
) -> Result:
    """``conns - stopped`` reading clients and ``stopped`` clients that never read."""
    cfg = fanout_config(conns - stopped, count, size, "paced")
    cfg.timeout = OURS_TIMEOUT
    cfg.start_message = f"go {conns} {count} {size} paced"
    cmd = server_command(SERVER, "ours", "--policy", "close")
    cmd += ["--high-water", str(high_water), "--sndbuf", str(sndbuf)]
    name = f"slow: {stopped} of {conns} stopped"
    with ServerProcess(cmd) as server:
        server.mark()
        slow = None
        if stopped:
            # Stopped readers: a client process that connects and never reads; it is
            # terminated once the reading clients are done (its own limit is 60 s).
            slow = start_client(
                ClientConfig(
                    path="/ws",
                    connections=stopped,
                    verify="count",
                    stop_reading=True,
                    rcvbuf=4096,
                    duration=60.0,
                    port=server.port,
                ),
                quiet=True,
            )
        try:
            report = run_client(cfg.with_port(server.port))
            measure = server.measure()
        finally:
            if slow is not None:
                slow.terminate()
                slow.wait()
    result = result_of("ours", name, report, measure)
    use_run_cpu([result], server)
    stats: dict[str, Any] = server.report("STATS", {})
    result.extra["stats"] = stats
    print(
        f"  {name:28} ours           {'ok' if result.ok else 'FAILED'} "
        f"{result.msgs_per_s:>12,.0f} msgs/s  rss +{result.rss_growth_mb:6.1f} MB  "
        f"closed_slow={stats.get('closed_slow')} peak_buffered={stats.get('peak_buffered')}",
        flush=True,
    )
    return result


def ratio(results: list[Result], scenario: str, a: str, b: str) -> float:
    by = {(r.scenario, r.variant): r for r in results}
    ra, rb = by.get((scenario, a)), by.get((scenario, b))
    if ra is None or rb is None or not rb.msgs_per_s:
        return 0.0
    return ra.msgs_per_s / rb.msgs_per_s


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--only", default="", help="comma-separated variants (default: all)")
    extra.add_argument("--no-slow", action="store_true", help="skip the slow-consumer runs")
    known, rest = extra.parse_known_args(argv)
    args = bench_args(__doc__ or "", rest)
    variants = tuple(known.only.split(",")) if known.only else VARIANTS
    conns = 50 if args.tiny else 5000
    shapes = [(100, 64, "burst"), (100, 64, "paced"), (20, 4096, "burst"), (20, 4096, "paced")]
    if args.tiny:  # one burst and one paced shape: a few seconds
        shapes = [shapes[0], shapes[3]]
    scenarios = [
        (f"{conns} x {count} x {size} B {mode}", fanout_config(conns, count, size, mode))
        for count, size, mode in shapes
    ]
    # One run each by default keeps the full run near 3 minutes; --repeat N for best-of-N.
    repeat = args.repeat if "--repeat" in " ".join(rest) else 1
    print(f"broadcast: {conns} clients, repeat {repeat}", flush=True)
    t0 = time.monotonic()
    results = best_of(run_fanout(variants, scenarios, repeat))

    slow_count, slow_size, high_water, sndbuf = (
        (40, 4096, 64 * 1024, 16 * 1024) if args.tiny else (50, 4096, 65536, 32 * 1024)
    )
    stopped = max(1, conns // 20)
    slow_results = []
    pairs: list[tuple[Result, Result]] = []
    if not known.no_slow:
        # The baseline (nobody stopped) is skipped in --tiny to keep it short.
        for _ in range(1 if args.tiny else 3):
            base_run = None
            if not args.tiny:
                base_run = run_slow(conns, slow_count, slow_size, high_water, sndbuf, 0)
                slow_results.append(base_run)
            slow_run = run_slow(conns, slow_count, slow_size, high_water, sndbuf, stopped)
            slow_results.append(slow_run)
            if base_run is not None:
                pairs.append((base_run, slow_run))
    elapsed = time.monotonic() - t0
    # A peer that runs out of time is a measurement, not a failure of this library:
    # the exit code reflects our own variant (every variant in --tiny).
    checked = results if args.tiny else [r for r in results if r.variant == "ours"]
    failed = exit_code(checked + slow_results)

    lines = []
    for name, _ in scenarios:
        lines.append(
            f"| {name} | {ratio(results, name, 'ours', 'websockets'):.2f}x | "
            f"{ratio(results, name, 'ours', 'tornado-await'):.2f}x | "
            f"{ratio(results, name, 'ours', 'tutorial'):.2f}x | "
            f"{ratio(results, name, 'bare-send', 'websockets'):.2f}x | "
            f"{ratio(results, name, 'ours', 'bare-send'):.2f}x |"
        )
    if not pairs:
        print("\n".join(lines))
        return failed

    def fast_ratio(pair: tuple[Result, Result]) -> float:
        base_rate = pair[0].msgs_per_s / conns
        return (pair[1].msgs_per_s / (conns - stopped)) / base_rate if base_rate else 0.0

    ordered = sorted(pairs, key=fast_ratio)
    base, slow = ordered[len(ordered) // 2]  # the median pair
    per_conn_base = base.msgs_per_s / (conns)
    per_conn_slow = slow.msgs_per_s / (conns - stopped)
    pair_ratios = ", ".join(f"{fast_ratio(p):.2f}x" for p in pairs)
    stats = slow.extra.get("stats", {})
    body = (
        "## Fan-out: every variant, same run\n\n"
        "msgs/s counts frames received and verified by all clients together, from the "
        "first byte to the last. Server CPU is the server's own figure from the start "
        "of publishing until the last client closed (handshakes excluded); RSS start is "
        "the server's RSS once every client was connected, RSS growth its peak above "
        "that. `burst`: all messages published back to back (the first frame goes "
        "straight to the socket, our writers cork the rest into about one more write "
        "per member); `paced`: one message "
        "per event-loop iteration (nothing to coalesce across messages). `bare-send`: "
        "the frame built once and `socket.send` to each member whose stream has nothing "
        "pending (the rest to `IOStream.write`), no flow control, no corking, no "
        "bookkeeping -- the reference technique; in `paced` mode about the least a "
        "server that writes every message as it comes can spend. Every server runs "
        "`gc.collect()` once all clients have joined, before its clock starts, so that "
        "no variant pays for the handshakes' garbage.\n\n"
        + markdown_table(results, ratios_vs=["websockets", "tornado-await", "tutorial"])
        + "\n### Ratios of `ours`\n\n"
        "| scenario | vs websockets | vs tornado-await | vs tutorial | "
        "bare-send vs websockets | ours vs bare-send |\n|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\nTargets: paced >= 1.8x websockets, burst >= 5x websockets. In `paced` "
        "mode nothing can be merged: every variant makes one `send()` per member and "
        "message, so `bare-send vs websockets` shows how much room the system call leaves "
        "to any library at that size.\n\n"
        "## Slow consumers (5% of clients stop reading)\n\n"
        f"{conns} clients x {slow_count} x {slow_size} B paced; the group's members are "
        f"limited to {high_water // 1024} KiB (policy `CLOSE`) and their kernel send "
        f"buffers to {sndbuf // 1024} KiB (`SO_SNDBUF`; Linux would otherwise absorb up "
        "to 4 MB per connection before the group sees anything). The stopped clients "
        "(own client process, 4 KiB receive buffer) never read.\n\n"
        + markdown_table(slow_results)
        + "\n"
        f"- fast clients' rate per connection: {per_conn_base:,.1f} msgs/s without stopped "
        f"clients, {per_conn_slow:,.1f} with them "
        f"({per_conn_slow / per_conn_base if per_conn_base else 0:.2f}x, the median of "
        f"{len(pairs)} interleaved pairs: {pair_ratios}; target >= 0.90x);\n"
        f"- group stats with stopped clients: closed_slow={stats.get('closed_slow')}, "
        f"closed={stats.get('closed')}, dropped={stats.get('dropped')}, "
        f"members left={stats.get('members')};\n"
        f"- server RSS growth {slow.rss_growth_mb:.1f} MB with stopped clients vs "
        f"{base.rss_growth_mb:.1f} MB without; bound members x limit = "
        f"{stopped} x {high_water // 1024} KiB = {stopped * high_water / 1e6:.1f} MB for the "
        "stopped ones.\n\n"
        f"Full run took {elapsed:.0f} s.\n"
    )
    print(body)
    if not args.tiny:
        out = Path(args.out) if args.out else BENCH_DIR / "results" / "broadcast.md"
        write_markdown(
            out,
            "Broadcast fan-out",
            "python -m benchmarks.bench_broadcast",
            body,
        )
        print(f"wrote {out}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
