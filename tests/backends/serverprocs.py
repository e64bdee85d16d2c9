"""Real servers for the distributed backends' tests, started on free ports of 127.0.0.1.

* :class:`NatsServer` -- ``nats-server -js`` with its own store directory.
* :class:`SentinelSet` -- a Redis master, one replica and three sentinels
  (``redis-server --sentinel``), monitoring the master as ``mymaster``.
* :class:`RedisCluster` -- six ``redis-server --cluster-enabled yes`` processes
  made into three masters with one replica each by ``redis-cli --cluster create``.

Readiness is read from each server's own log line (bounded by a deadline), never
polled with sleeps. Everything is synchronous (``subprocess``), so session-scoped
fixtures can hold the servers for every test of a run; :meth:`close` kills them.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tornado_longconn.testing import scaled

__all__ = ["NatsServer", "RedisCluster", "SentinelSet", "Server", "free_port", "which"]


def which(name: str) -> str | None:
    """The path of a server binary (``/usr/sbin`` included), or ``None``."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One server process whose output is read until a readiness line, then drained."""

    def __init__(self, name: str, args: list[str], ready: bytes, *, port: int) -> None:
        self.name = name
        self.args = args
        self.ready = ready
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: list[bytes] = []  # every line, for failure reports
        self._thread: threading.Thread | None = None
        self._waiters: list[tuple[re.Pattern[bytes], threading.Event]] = []
        self._lock = threading.Lock()
        self._grew = threading.Condition(self._lock)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait (at most ``timeout`` seconds, scaled) for the readiness line."""
        self.output = []
        proc = self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + scaled(timeout)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"{self.name} not ready in time:\n{self.tail()}")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited before it was ready:\n{self.tail()}")
                buf += chunk
                *lines, buf = buf.split(b"\n")
                self.output.extend(lines)
                if any(self.ready in line for line in lines):
                    break
        except BaseException:
            self.kill()
            raise
        finally:
            sel.close()
        if buf:
            self.output.append(buf)
        self._thread = threading.Thread(target=self._drain, args=(proc,), daemon=True)
        self._thread.start()

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.output.append(line)
                self._grew.notify_all()
                for pattern, event in self._waiters:
                    if pattern.search(line):
                        event.set()

    def wait_output(self, pattern: bytes, count: int = 1, timeout: float = 30.0) -> None:
        """Return once ``count`` output lines (so far) match the regex ``pattern``."""
        regex = re.compile(pattern)

        def enough() -> bool:
            return sum(1 for line in self.output if regex.search(line)) >= count

        with self._grew:
            if not self._grew.wait_for(enough, scaled(timeout)):
                raise RuntimeError(f"{self.name}: no {count} x {pattern!r} in time:\n{self.tail()}")

    def watch(self, pattern: bytes, event: threading.Event | None = None) -> threading.Event:
        """An event (``event`` or a new one) set when a future output line matches ``pattern``."""
        event = event or threading.Event()
        with self._lock:
            self._waiters.append((re.compile(pattern), event))
        return event

    def tail(self, lines: int = 30) -> str:
        """The last output lines, for error messages."""
        return b"\n".join(self.output[-lines:]).decode("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL and reap (no clean shutdown)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            self._reaped(proc)

    def _reaped(self, proc: subprocess.Popen[bytes]) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()  # the pipe is at EOF once the process is gone
        if proc.stdout is not None:
            proc.stdout.close()

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown) and reap; SIGKILL after ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._reaped(proc)


class NatsServer:
    """``nats-server -js`` on a free port with its own store directory."""

    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="longconn-nats-")
        args = [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self._dir.name]
        self.server = Server("nats-server", args, b"Server is ready", port=self.port)

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until it accepts clients."""
        self.server.start()

    def restart(self) -> None:
        """Stop cleanly (the store is flushed) and start again on the same port."""
        self.server.terminate()
        self.server.start()

    def close(self) -> None:
        """Kill the server and delete its store."""
        self.server.kill()
        self._dir.cleanup()


def _redis_args(binary: str, port: int, directory: str, *extra: str) -> list[str]:
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", directory, "--logfile", "", *extra,
    ]  # fmt: skip


class SentinelSet:
    """A Redis master, one replica and three sentinels watching it as ``mymaster``.

    ``down_after_ms`` is the sentinels' ``down-after-milliseconds``: how long a
    master must not answer before a failover starts.
    """

    SERVICE = "mymaster"

    def __init__(self, binary: str, *, down_after_ms: int = 1000) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="longconn-sentinel-")
        root = Path(self._dir.name)
        self.redis: list[Server] = []
        for role in ("master", "replica"):
            port = free_port()
            (root / role).mkdir()
            extra = ["--replicaof", "127.0.0.1", str(self.redis[0].port)] if self.redis else []
            args = _redis_args(binary, port, str(root / role), *extra)
            self.redis.append(Server(f"redis {role}", args, b"Ready to accept", port=port))
        self.sentinels: list[Server] = []
        master = self.redis[0].port
        for i in range(3):
            port = free_port()
            conf = root / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} 10000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            args = [binary, str(conf), "--sentinel", "--logfile", ""]
            self.sentinels.append(Server(f"sentinel {i}", args, b"+monitor master", port=port))

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:<s1>,127.0.0.1:<s2>,.../mymaster/0``."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def start(self) -> None:
        """Start the master, the replica (synced) and the sentinels."""
        self.redis[0].start()
        synced = self.redis[1]
        synced.ready = b"MASTER <-> REPLICA sync: Finished with success"
        synced.start()
        for sentinel in self.sentinels:
            sentinel.start()
        # A failover needs sentinels that know the replica and each other (they
        # announce themselves through the master every 2 s).
        for sentinel in self.sentinels:
            sentinel.wait_output(rb"\+slave slave", 1)
            sentinel.wait_output(rb"\+sentinel sentinel", 2)
        self.master = self.redis[0]

    def failover(self, timeout: float = 30.0) -> None:
        """Kill the current master; return when a sentinel has promoted the replica."""
        switched = threading.Event()
        for sentinel in self.sentinels:
            sentinel.watch(rb"\+switch-master", switched)
        old = self.master
        old.kill()
        if not switched.wait(scaled(timeout)):
            raise RuntimeError("no sentinel promoted the replica in time")
        self.master = next(r for r in self.redis if r is not old)

    def close(self) -> None:
        """Kill every process and delete the directory."""
        for server in [*self.sentinels, *self.redis]:
            server.kill()
        self._dir.cleanup()


def _in_range(slot: int, spec: str) -> bool:
    low, _, high = spec.partition("-")
    return int(low) <= slot <= int(high or low)


class RedisCluster:
    """Six ``redis-server`` cluster nodes: three masters, one replica each."""

    def __init__(self, binary: str, cli: str, *, node_timeout_ms: int = 1000) -> None:
        self._cli = cli
        self._dir = tempfile.TemporaryDirectory(prefix="longconn-cluster-")
        root = Path(self._dir.name)
        self.nodes: list[Server] = []
        for i in range(6):
            port = free_port()
            node_dir = root / str(i)
            node_dir.mkdir()
            args = _redis_args(
                binary, port, str(node_dir), "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(free_port()),  # not port + 10000: that may be taken
                "--cluster-replica-validity-factor", "0",  # a replica may always take over
            )  # fmt: skip
            self.nodes.append(Server(f"cluster node {i}", args, b"Ready to accept", port=port))

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port>,...``: every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> None:
        """Start the nodes, create the cluster, return when every node sees it as ok."""
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [self._cli, "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=scaled(timeout),
        )  # fmt: skip
        for node in self.nodes:
            self.wait_ok(node, timeout)

    def cli(self, node: Server, *args: str) -> str:
        """Run ``redis-cli`` against ``node``; its output."""
        done = subprocess.run(
            [self._cli, "-p", str(node.port), *args],
            check=True, capture_output=True, timeout=scaled(10),
        )  # fmt: skip
        return done.stdout.decode()

    def wait_ok(self, node: Server, timeout: float = 60.0) -> None:
        """Return when ``node`` reports ``cluster_state:ok`` (checked on its log lines)."""
        deadline = time.monotonic() + scaled(timeout)
        event = node.watch(rb"Cluster state changed: ok")
        while "cluster_state:ok" not in self.cli(node, "cluster", "info"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: cluster not ok in time")
            event.wait(0.2)  # the node logs when its state changes
            event.clear()

    def masters(self) -> list[Server]:
        """The nodes that are masters right now (asked of a live node)."""
        live = next(n for n in self.nodes if n.running)
        ports = {
            int(line.split()[1].split(":")[1].split("@")[0])
            for line in self.cli(live, "cluster", "nodes").splitlines()
            if "master" in line.split()[2] and "fail" not in line.split()[2]
        }
        return [n for n in self.nodes if n.port in ports and n.running]

    def fail_master_of(self, tag: str, timeout: float = 30.0) -> None:
        """Kill the master owning hash tag ``tag``'s slot; return when its replica took over."""
        live = next(n for n in self.nodes if n.running)
        slot = int(self.cli(live, "cluster", "keyslot", "{" + tag + "}").strip())
        rows = [line.split() for line in self.cli(live, "cluster", "nodes").splitlines()]
        port_of = {row[0]: int(row[1].split("@")[0].rsplit(":", 1)[1]) for row in rows}
        master_id = next(
            row[0]
            for row in rows
            if "master" in row[2]
            and any(_in_range(slot, r) for r in row[8:] if not r.startswith("["))
        )
        replica_id = next(row[0] for row in rows if row[3] == master_id)
        master = next(n for n in self.nodes if n.port == port_of[master_id])
        replica = next(n for n in self.nodes if n.port == port_of[replica_id])
        won = replica.watch(rb"Failover election won")
        master.kill()
        if not won.wait(scaled(timeout)):
            raise RuntimeError(f"the replica did not take over:\n{replica.tail()}")
        for node in self.nodes:
            if node.running:
                self.wait_ok(node, timeout)

    def close(self) -> None:
        """Kill every node and delete the directory."""
        for node in self.nodes:
            node.kill()
        self._dir.cleanup()
