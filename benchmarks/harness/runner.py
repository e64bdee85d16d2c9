"""Starting and measuring server variants and load clients, each in its own process.

``run_scenario(server_cmd, cfg, variant=..., scenario=...) -> Result`` starts the
server (own process, pinned to :data:`SERVER_CPU`), reads its port, samples its CPU
times and RSS (psutil, every 5 ms, plus ``ru_maxrss`` at exit), runs the load client
(own process, pinned to :data:`CLIENT_CPU`) and stops the server.
``run_scenarios(server_cmd, [(name, cfg), ...], fresh=False)`` runs several scenarios
against one server process (quicker, for ``--tiny``). :class:`ServerProcess` (a
context manager) and :func:`run_client` / :func:`start_client` are the halves, for
benchmarks that bring their own client or read the reports their servers emit
(``server.reports(kind)``, ``server.wait_report(kind)``, :func:`request_report`).

Every process is started with ``cwd`` = the repository root and ``python -m``, so no
search path is edited anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from .client import ClientConfig
from .report import Result, result_from
from .server import parse_report
from .system import CLIENT_CPU, ROOT, SERVER_CPU, pin

__all__ = [
    "ServerProcess",
    "bench_args",
    "client_command",
    "request_report",
    "run_client",
    "run_scenario",
    "run_scenarios",
    "server_command",
    "start_client",
]


def server_command(name: str, *args: str) -> list[str]:
    """``python -m benchmarks.servers.<name> ARGS...`` (``name`` with or without ``.py``)."""
    module = name.removesuffix(".py")
    return [sys.executable, "-m", f"benchmarks.servers.{module}", *args]


def client_command(cfg: ClientConfig) -> list[str]:
    """The command that runs the load client for ``cfg``."""
    return [
        sys.executable,
        "-m",
        "benchmarks.harness.client",
        json.dumps(dataclasses.asdict(cfg)),
    ]


class ServerProcess:
    """A server variant in its own process, pinned to :data:`SERVER_CPU`, measured.

    ``with ServerProcess(cmd) as server:`` starts ``cmd`` (from the repository root),
    waits (``ready_timeout``, 30 s) for its ``PORT`` report and samples RSS every
    ``sample_interval`` (5 ms) in a thread; a second thread reads its report lines
    as they come. ``server.port``; ``server.mark()`` resets the CPU/RSS baseline;
    ``server.measure()`` returns ``{"cpu_s", "rss_start_mb", "rss_peak_mb",
    "rss_growth_mb"}`` since the baseline. On exit the process gets SIGTERM (SIGKILL
    after 5 s); then ``server.stderr`` holds its stderr. Raises ``RuntimeError`` if
    the server exits or says nothing before the timeout, or if its first line is not
    ``PORT <n>``.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        ready_timeout: float = 30.0,
        sample_interval: float = 0.005,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cmd = list(cmd)
        self.ready_timeout = ready_timeout
        self.sample_interval = sample_interval
        self.env = env
        self.port = 0
        self.stderr = ""
        self.maxrss = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._errfile: IO[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._reports: list[tuple[str, Any]] = []
        self._eof = False
        self._peak = 0
        self._cpu0 = 0.0
        self._rss0 = 0

    def __enter__(self) -> ServerProcess:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        self._errfile = tempfile.TemporaryFile()
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self._proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self._errfile, env=env, cwd=str(ROOT)
        )
        pin(self._proc.pid, SERVER_CPU)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.port = self._read_port()
        except BaseException:
            self._shutdown()
            raise
        self._ps = psutil.Process(self._proc.pid)
        self.mark()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._shutdown()

    # -- reports
    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            parsed = parse_report(line)
            with self._cond:
                self._lines.append(line)
                if parsed is not None:
                    self._reports.append(parsed)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_port(self) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self._lines or self._eof, self.ready_timeout):
                raise RuntimeError(f"{self.cmd}: no PORT line within {self.ready_timeout} s")
            if not self._lines:
                raise RuntimeError(f"{self.cmd} exited before PORT: {self._stderr_tail()}")
            first = self._lines[0]
        parsed = parse_report(first)
        if parsed is None or parsed[0] != "PORT" or not isinstance(parsed[1], int):
            raise RuntimeError(f"{self.cmd}: expected 'PORT <n>', got {first!r}")
        return parsed[1]

    def reports(self, kind: str) -> list[Any]:
        """Every ``kind`` report the server emitted so far, oldest first."""
        with self._cond:
            return [value for k, value in self._reports if k == kind]

    def report(self, kind: str, default: Any = None) -> Any:
        """The latest ``kind`` report, or ``default`` if there is none."""
        found = self.reports(kind)
        return found[-1] if found else default

    def wait_report(self, kind: str, *, after: int = 0, timeout: float = 30.0) -> Any:
        """The report number ``after`` (0-based) of ``kind``, waiting for it to arrive.

        Pass ``after=len(server.reports(kind))`` to wait for the next one. Raises
        ``RuntimeError`` if it has not come within ``timeout`` seconds or the server's
        stdout closed first.
        """

        def have() -> bool:
            return self._eof or sum(k == kind for k, _ in self._reports) > after

        with self._cond:
            self._cond.wait_for(have, timeout)
            found = [value for k, value in self._reports if k == kind]
        if len(found) <= after:
            raise RuntimeError(f"{self.cmd}: no {kind} report #{after} within {timeout} s")
        return found[after]

    @property
    def output(self) -> str:
        """Every stdout line after ``PORT`` so far (for error messages)."""
        with self._cond:
            return "\n".join(self._lines[1:])

    # -- measurements
    def _stderr_tail(self) -> str:
        if self._errfile is None:
            return ""
        self._errfile.seek(0)
        data: bytes = self._errfile.read()
        return data.decode(errors="replace")[-2000:]

    def _sample(self) -> None:
        ps = self._ps
        while not self._stop.wait(self.sample_interval):
            try:
                rss = ps.memory_info().rss
            except Exception:
                return
            if rss > self._peak:
                self._peak = rss

    def _cpu(self) -> float:
        t = self._ps.cpu_times()
        return float(t.user + t.system)

    def mark(self) -> None:
        """Start a new measurement: CPU and RSS baselines are taken now."""
        self._cpu0 = self._cpu()
        self._rss0 = self._peak = self._ps.memory_info().rss

    def measure(self) -> dict[str, float]:
        """CPU seconds and RSS (MB = 10^6 bytes) since the last :meth:`mark`."""
        cpu = self._cpu() - self._cpu0
        rss = self._ps.memory_info().rss
        self._peak = max(self._peak, rss)
        return {
            "cpu_s": cpu,
            "rss_start_mb": self._rss0 / 1e6,
            "rss_peak_mb": self._peak / 1e6,
            "rss_growth_mb": (self._peak - self._rss0) / 1e6,
        }

    def _shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        # os.kill, not proc.send_signal: that would reap the child (poll) before wait4,
        # and wait4 is what reports the child's ru_maxrss.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        status = None
        while status is None:
            pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = st
                self.maxrss = usage.ru_maxrss * 1024
            elif time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
            else:
                time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if self._reader is not None:
            self._reader.join(5.0)
        assert proc.stdout is not None
        proc.stdout.close()
        self.stderr = self._stderr_tail()
        if self._errfile is not None:
            self._errfile.close()


def request_report(server: ServerProcess, kind: str, *, timeout: float = 30.0) -> Any:
    """Ask a server that mounts ``report_route`` for a ``kind`` report now; its value.

    Sends ``POST /report?kind=KIND`` and waits for the report line it makes the server
    emit. Raises ``RuntimeError`` if the server refuses or does not report in time.
    """
    after = len(server.reports(kind))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", f"/report?kind={kind}", body=b"")
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    if resp.status != 204:
        raise RuntimeError(f"{server.cmd}: POST /report?kind={kind} answered {resp.status}")
    return server.wait_report(kind, after=after, timeout=timeout)


def start_client(cfg: ClientConfig, *, quiet: bool = False) -> subprocess.Popen[bytes]:
    """Start the load client for ``cfg`` in its own process pinned to :data:`CLIENT_CPU`.

    Its report is the last line of its stdout (``quiet=True`` discards stdout and
    stderr, for a client whose report nobody reads, e.g. stopped readers).
    """
    sink = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen(client_command(cfg), stdout=sink, stderr=sink, cwd=str(ROOT))
    pin(proc.pid, CLIENT_CPU)
    return proc


def run_client(cfg: ClientConfig, *, timeout: float | None = None) -> dict[str, Any]:
    """Run the load client in its own process pinned to :data:`CLIENT_CPU`; its report.

    The report is a dict: ``ok``, ``errors``, ``connections``, ``frames``, ``bytes``,
    ``payload_bytes``, ``seconds`` (first byte to last verified byte), ``pings``, ...
    A client that crashes yields ``ok: False`` with its stderr as the error.
    """
    limit = timeout if timeout is not None else cfg.timeout + (cfg.duration or 0) + 30
    proc = start_client(cfg)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"ok": False, "errors": [f"client killed after {limit} s"], "frames": 0}
    lines = out.decode().strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = err.decode(errors="replace")[-1500:]
        return {"ok": False, "errors": [f"client failed: {tail}"], "frames": 0}
    return report


def run_scenario(
    server_cmd: Sequence[str],
    cfg: ClientConfig,
    *,
    variant: str = "",
    scenario: str = "",
    env: dict[str, str] | None = None,
) -> Result:
    """Start ``server_cmd``, run the load client ``cfg`` against it, measure, stop it."""
    try:
        with ServerProcess(server_cmd, env=env) as server:
            server.mark()
            report = run_client(cfg.with_port(server.port))
            m = server.measure()
    except RuntimeError as exc:
        return Result(variant, scenario, False, str(exc))
    if server.maxrss:
        m["rss_growth_mb"] = max(m["rss_growth_mb"], server.maxrss / 1e6 - m["rss_start_mb"])
    return result_from(variant, scenario, report, m)


def run_scenarios(
    server_cmd: Sequence[str],
    scenarios: Sequence[tuple[str, ClientConfig]],
    *,
    variant: str = "",
    fresh: bool = True,
    env: dict[str, str] | None = None,
) -> list[Result]:
    """Run several ``(scenario name, cfg)`` against one variant.

    ``fresh=True``: a new server process per scenario (like :func:`run_scenario`; RSS
    growth is then per scenario). ``fresh=False``: one server process for all of them,
    which saves the start-up time (for ``--tiny`` runs); CPU and RSS are measured from
    the start of each scenario, so RSS growth only shows new peaks.
    """
    if fresh:
        return [
            run_scenario(server_cmd, cfg, variant=variant, scenario=name, env=env)
            for name, cfg in scenarios
        ]
    results = []
    try:
        with ServerProcess(server_cmd, env=env) as server:
            for name, cfg in scenarios:
                server.mark()
                report = run_client(cfg.with_port(server.port))
                results.append(result_from(variant, name, report, server.measure()))
    except RuntimeError as exc:
        done = {r.scenario for r in results}
        results += [
            Result(variant, name, False, str(exc)) for name, _ in scenarios if name not in done
        ]
    return results


def bench_args(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    repeat: int = 3,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.Namespace:
    """Parse the common options: ``--tiny``, ``--repeat N`` (default ``repeat``), ``--out PATH``.

    ``--tiny`` forces one repeat. A benchmark with options of its own passes its
    ``parser`` (the common options are added to it).
    """
    p = parser if parser is not None else argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny sizes, one repeat, no results file")
    p.add_argument("--repeat", type=int, default=repeat, help="runs per scenario (best is kept)")
    p.add_argument("--out", default=None, help="results markdown file")
    args = p.parse_args(argv)
    if args.tiny:
        args.repeat = 1
    return args
