"""Benchmark harness: a verifying WebSocket load client and a measuring server runner.

Every benchmark (``python -m benchmarks.bench_<part>`` from the repository root)
starts each server variant in its own process, drives it with the load client in
another process (pinned to another CPU when there are two), and compares the variants
side by side in the same run. Benchmarks and servers import only the names below.

Modules:

* :mod:`~benchmarks.harness.payload` -- ``make_payload`` / ``PayloadMaker`` /
  ``check_payload``: 16 hex digits of a sequence number, then a fixed ASCII pattern;
* :mod:`~benchmarks.harness.client` -- ``ClientConfig`` and the load client (raw
  asyncio WebSockets that verify sequence, content and count; slow, stopped and
  frozen peers; Socket.IO mode);
* :mod:`~benchmarks.harness.server` -- the server side: ``serve_tornado`` /
  ``serve_until_sigterm``, and the one way a server reports to its benchmark: report
  lines ``KIND <json>`` on stdout (``emit``; ``PORT <n>`` first; ``report_route`` when
  the benchmark picks the moment);
* :mod:`~benchmarks.harness.runner` -- ``ServerProcess`` (start, measure, read
  reports), ``run_client``, ``run_scenario(s)``, ``request_report``, ``bench_args``;
* :mod:`~benchmarks.harness.report` -- the one ``Result`` type, ``markdown_table``,
  ``best_of``, ``write_markdown``, ``exit_code``;
* :mod:`~benchmarks.harness.system` -- paths, CPU pinning, ``raise_fd_limit``.
"""

from __future__ import annotations

from .client import ClientConfig
from .payload import PayloadMaker, check_payload, make_payload
from .report import Result, best_of, exit_code, markdown_table, result_from, write_markdown
from .runner import (
    ServerProcess,
    bench_args,
    request_report,
    run_client,
    run_scenario,
    run_scenarios,
    server_command,
    start_client,
)
from .server import (
    announce,
    emit,
    parse_report,
    query_int,
    report_route,
    serve_tornado,
    serve_until_sigterm,
)
from .system import BENCH_DIR, CLIENT_CPU, ROOT, SERVER_CPU, pin, raise_fd_limit

__all__ = [
    "BENCH_DIR",
    "CLIENT_CPU",
    "ROOT",
    "SERVER_CPU",
    "ClientConfig",
    "PayloadMaker",
    "Result",
    "ServerProcess",
    "announce",
    "bench_args",
    "best_of",
    "check_payload",
    "emit",
    "exit_code",
    "make_payload",
    "markdown_table",
    "parse_report",
    "pin",
    "query_int",
    "raise_fd_limit",
    "report_route",
    "request_report",
    "result_from",
    "run_client",
    "run_scenario",
    "run_scenarios",
    "serve_tornado",
    "serve_until_sigterm",
    "server_command",
    "start_client",
    "write_markdown",
]
