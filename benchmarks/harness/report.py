"""One :class:`Result` type for every benchmark, and how results are written down.

``Result`` has ``ok``/``error`` (delivery verified), ``messages``, ``msgs_per_s``,
``mb_per_s`` (wire bytes, MB = 10^6, over ``seconds``), ``server_cpu_s`` (user+system
during the scenario), ``rss_start_mb``, ``rss_growth_mb`` (peak minus start), the raw
load-client report (``client``) and whatever else a benchmark measured (``extra``).
``result_from`` builds one from a client report and a ``ServerProcess.measure()``.

``markdown_table(results, ratios_vs=["websockets", ...])`` renders one row per result
grouped by scenario, with ``msgs/s vs <variant>`` (and CPU) ratio columns against the
named variants of the same scenario. ``best_of(results)`` keeps the fastest verified
repeat of each (scenario, variant). ``write_markdown(path, title, command, body)``
writes a results file; ``exit_code(results)`` is non-zero if any check failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .system import CLIENT_CPU, SERVER_CPU

__all__ = ["Result", "best_of", "exit_code", "markdown_table", "result_from", "write_markdown"]


@dataclasses.dataclass
class Result:
    """One scenario run against one server variant (see the module docstring).

    Only ``variant``, ``scenario`` and ``ok`` are required: a failed run may say no
    more than ``error``. ``messages`` counts what the benchmark delivered and verified
    (frames, answers, uploads), ``bytes`` the bytes on the wire (or stored).
    """

    variant: str
    scenario: str
    ok: bool
    error: str = ""
    messages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_growth_mb: float = 0.0
    client: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def msgs_per_s(self) -> float:
        """Messages per second (all connections), 0 if nothing was timed."""
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Wire megabytes (10^6) per second received by the clients."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def result_from(
    variant: str,
    scenario: str,
    report: dict[str, Any],
    m: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> Result:
    """A :class:`Result` from a load-client report and a server ``measure()`` dict."""
    growth = m["rss_growth_mb"]
    errors = report.get("errors") or []
    return Result(
        variant=variant,
        scenario=scenario,
        ok=bool(report.get("ok")),
        error="; ".join(errors)[:500],
        messages=int(report.get("frames", 0)),
        bytes=int(report.get("bytes", 0)),
        seconds=float(report.get("seconds", 0.0)),
        server_cpu_s=m["cpu_s"],
        rss_start_mb=m["rss_start_mb"],
        rss_growth_mb=growth,
        client=report,
        extra=extra or {},
    )


def best_of(results: Sequence[Result]) -> list[Result]:
    """The fastest verified run of each (scenario, variant), in first-seen order.

    A (scenario, variant) with no verified run keeps its first failed run.
    """
    best: dict[tuple[str, str], Result] = {}
    for r in results:
        key = (r.scenario, r.variant)
        cur = best.get(key)
        if cur is None or (r.ok and (not cur.ok or r.msgs_per_s > cur.msgs_per_s)):
            best[key] = r
    return list(best.values())


def _fmt(x: float, digits: int = 0) -> str:
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def markdown_table(
    results: Sequence[Result],
    *,
    ratios_vs: Sequence[str] = (),
    rate: bool = True,
    client_cpu: bool = False,
) -> str:
    """A markdown table, one row per result, with ratio columns vs named variants.

    ``ratios_vs``: variant names; for each, a ``msgs/s vs <name>`` column (this row's
    msgs/s over that variant's in the same scenario) and a ``CPU/msg vs <name>`` column.
    ``rate=False`` drops the msgs/s and MB/s columns (for duration-bound scenarios);
    ``client_cpu=True`` adds the timed seconds and the load client's CPU seconds (when
    they are close, the client, not the server, was the bottleneck).
    """
    head = ["scenario", "variant", "verified", "messages"]
    if rate:
        head += ["msgs/s", "MB/s"]
    if client_cpu:
        head += ["seconds", "client CPU s"]
    head += ["server CPU s", "RSS start MB", "RSS growth MB"]
    for name in ratios_vs:
        if rate:
            head.append(f"msgs/s vs {name}")
        head.append(f"CPU/msg vs {name}")
    by_key = {(r.scenario, r.variant): r for r in results}
    rows = []
    for r in results:
        row = [r.scenario, r.variant, "yes" if r.ok else f"NO: {r.error[:80]}", _fmt(r.messages)]
        if rate:
            row += [_fmt(r.msgs_per_s), _fmt(r.mb_per_s, 1)]
        if client_cpu:
            row += [_fmt(r.seconds, 2), _fmt(float(r.client.get("client_cpu_s", 0.0)), 2)]
        row += [_fmt(r.server_cpu_s, 2), _fmt(r.rss_start_mb, 1), _fmt(r.rss_growth_mb, 1)]
        for name in ratios_vs:
            other = by_key.get((r.scenario, name))
            if rate:
                ok = other is not None and other.msgs_per_s > 0
                row.append(f"{r.msgs_per_s / other.msgs_per_s:.2f}x" if ok else "-")  # type: ignore[union-attr]
            mine = r.server_cpu_s / r.messages if r.messages else 0.0
            theirs = (
                other.server_cpu_s / other.messages if other is not None and other.messages else 0
            )
            row.append(f"{mine / theirs:.2f}x" if theirs and mine else "-")
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, title: str, command: str, body: str) -> Path:
    """Write a results file: title, the reproducing command, the machine, then ``body``."""
    import platform

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    header = (
        f"# {title}\n\n"
        f"Reproduce with:\n\n```\n{command}\n```\n\n"
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu}, "
        f"{os.cpu_count()} CPUs (server pinned to CPU {SERVER_CPU}, load client to CPU "
        f"{CLIENT_CPU}), Python {platform.python_version()}. MB = 10^6 bytes on the wire.\n\n"
    )
    path.write_text(header + body)
    return path


def exit_code(results: Sequence[Result]) -> int:
    """0 if every result verified its delivery, else 1 (after printing the failures)."""
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.scenario} / {r.variant}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
