"""The cost of Prometheus metrics: the fan-out with ``/metrics`` mounted and scraped vs without.

Scenarios (full size; ``--tiny``: 50 clients, each shape once, in a few seconds):
5,000 clients x 100 messages x 64 B, ``burst`` and ``paced`` (as in
``bench_broadcast``), against two servers of the same run, interleaved:

* ``ours``: ``benchmarks/servers/broadcast_server.py ours`` -- a ``BroadcastGroup``;
* ``ours+metrics``: the same server with ``--metrics``: ``/metrics`` mounted
  (:class:`~tornado_longconn.metrics.MetricsHandler` and a
  :class:`~tornado_longconn.metrics.LongConnCollector` of the hub), scraped once a
  second by a thread of this process for the whole time the server is up
  (connections, fan-out, closes), as Prometheus would.

Both variants run the same library code on the message path (metrics are read at
scrape time only); the difference is the scrapes. Each (scenario, variant) runs
``--repeat`` times (default 3), interleaved in ABBA order (which variant runs
first alternates); the best verified run of each is in the first table, the
ratios of the pairs in the second. ``--modes paced`` runs one shape only.
Every client verifies what it received. Results: ``benchmarks/results/metrics.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import threading
import time
import urllib.request
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks.bench_broadcast import fanout_config, result_of, use_run_cpu
from benchmarks.harness import (
    BENCH_DIR,
    Result,
    ServerProcess,
    bench_args,
    best_of,
    exit_code,
    markdown_table,
    run_client,
    server_command,
    write_markdown,
)

SERVER = "broadcast_server.py"
VARIANTS = {"ours": ("ours",), "ours+metrics": ("ours", "--metrics")}
OURS_TIMEOUT = 90.0


class Scraper(threading.Thread):
    """GET ``/metrics`` every ``interval`` seconds until stopped; counts good scrapes."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.stop = threading.Event()
        self.scrapes = 0
        self.errors: list[str] = []
        self.seconds: list[float] = []

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    body = answer.read()
                if b"longconn_messages_delivered_total" not in body:
                    raise ValueError("no longconn_messages_delivered_total in the scrape")
                self.scrapes += 1
                self.seconds.append(time.perf_counter() - t0)
            except Exception as exc:
                self.errors.append(repr(exc))


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--modes", default="burst,paced", help="burst, paced or both")
    known, rest = extra.parse_known_args(argv)
    args = bench_args(__doc__ or "", rest)
    conns = 50 if args.tiny else 5000
    repeat = 1 if args.tiny else args.repeat
    shapes = [(100, 64, mode) for mode in known.modes.split(",")]
    scenarios = [
        (f"{conns} x {count} x {size} B {mode}", fanout_config(conns, count, size, mode))
        for count, size, mode in shapes
    ]
    print(f"metrics: {conns} clients, repeat {repeat}", flush=True)
    t0 = time.monotonic()
    runs: dict[str, list[Result]] = {v: [] for v in VARIANTS}
    scraper: Scraper | None = None
    with contextlib.ExitStack() as stack:
        servers = {
            v: stack.enter_context(ServerProcess(server_command(SERVER, *a)))
            for v, a in VARIANTS.items()
        }
        scraper = Scraper(servers["ours+metrics"].port)
        scraper.start()
        try:
            for name, cfg in scenarios:
                for i in range(repeat):
                    # ABBA: which variant goes first alternates, so neither always
                    # runs right after the other's load.
                    order = list(servers.items())
                    for variant, server in order if i % 2 == 0 else order[::-1]:
                        server.mark()
                        run_cfg = dataclasses.replace(cfg, port=server.port, timeout=OURS_TIMEOUT)
                        r = result_of(variant, name, run_client(run_cfg), server.measure())
                        runs[variant].append(r)
                        print(
                            f"  {name:28} {variant:14} {'ok' if r.ok else 'FAILED'} "
                            f"{r.msgs_per_s:>12,.0f} msgs/s",
                            flush=True,
                        )
        finally:
            scraper.stop.set()
            scraper.join()
    for variant, server in servers.items():
        use_run_cpu(runs[variant], server)
    served: dict[str, Any] = servers["ours+metrics"].report("STATS", {})
    n_scrapes = int(served.get("scrapes", 0))
    cpu_per_scrape = float(served.get("scrape_cpu_s", 0.0)) / n_scrapes if n_scrapes else 0.0
    every = [r for name, _ in scenarios for v in VARIANTS for r in runs[v] if r.scenario == name]
    results = best_of(every)
    elapsed = time.monotonic() - t0
    failed = exit_code(results)
    if scraper.errors:
        print(f"scrape errors: {scraper.errors[:3]}", flush=True)
        failed = 1

    lines = []
    for name, _ in scenarios:
        # Run i of one variant against run i of the other (they ran seconds apart).
        pairs = list(
            zip(
                [r for r in runs["ours"] if r.scenario == name],
                [r for r in runs["ours+metrics"] if r.scenario == name],
                strict=True,
            )
        )
        rates = sorted(m.msgs_per_s / p.msgs_per_s for p, m in pairs if p.msgs_per_s)
        cpus = sorted(
            (m.server_cpu_s / m.messages) / (p.server_cpu_s / p.messages)
            for p, m in pairs
            if p.messages and m.messages and p.server_cpu_s
        )
        lines.append(
            f"| {name} | {median(rates):.2f}x ({', '.join(f'{x:.2f}' for x in rates)}) | "
            f"{median(cpus):.2f}x ({', '.join(f'{x:.2f}' for x in cpus)}) |"
        )
    scrape_ms = sorted(1000 * s for s in scraper.seconds)
    scrape_median = median(scrape_ms) if scrape_ms else 0.0
    body = (
        "## Fan-out with `/metrics` scraped every second vs without, same run\n\n"
        "msgs/s counts frames received and verified by all clients together; server CPU "
        "is the server's own figure from the start of publishing until the last client "
        "closed. Best of each (scenario, variant) over the interleaved runs.\n\n"
        + markdown_table(results, ratios_vs=["ours"])
        + "\n### Interleaved pairs (median, then each pair)\n\n"
        "| scenario | msgs/s with metrics / without | server CPU per message with / without |\n"
        "|---|---|---|\n" + "\n".join(lines) + "\n\n### What a scrape costs\n\n"
        f"- {n_scrapes} scrapes answered by the server ({scraper.scrapes} checked by the "
        f"scraper), one a second while the servers were up;\n"
        f"- server CPU per scrape (collect every family and format the text, measured "
        f"in the handler with `time.process_time()`): **{1000 * cpu_per_scrape:.2f} ms** "
        f"for a hub of up to {conns:,} members (`hub.stats()` walks them once);\n"
        f"- scraped once a second, that is **{100 * cpu_per_scrape:.2f}%** of one core: "
        f"the most a scrape can take from a fan-out that saturates the server's CPU "
        f"(target: < 2%);\n"
        f"- time to answer, seen by the scraper (it waits behind the fan-out in the "
        f"event loop): median {scrape_median:.1f} ms.\n\n"
        f"Full run took {elapsed:.0f} s.\n"
    )
    print(body)
    if not args.tiny:
        out = Path(args.out) if args.out else BENCH_DIR / "results" / "metrics.md"
        write_markdown(out, "Metrics cost", "python -m benchmarks.bench_metrics", body)
        print(f"wrote {out}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
