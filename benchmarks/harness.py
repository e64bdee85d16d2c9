"""Benchmark harness: a verifying WebSocket load client and a measuring server runner.

Every benchmark script (``benchmarks/bench_<part>.py``) starts each server variant in
its own process, drives it with the load client in another process (pinned to another
CPU when there are two), and compares the variants side by side in the same run.

Server variant scripts
----------------------
A server is any command that binds 127.0.0.1 on a free port, prints ``PORT <n>`` on
stdout once it accepts connections, and exits on SIGTERM. Helpers for the scripts::

    from harness import PayloadMaker, serve_tornado, query_int

    class Stream(tornado.websocket.WebSocketHandler):
        async def open(self) -> None:
            count, size = query_int(self, "count"), query_int(self, "size")
            make = PayloadMaker(size)
            for seq in range(count):
                await self.write_message(make(seq), binary=True)

    serve_tornado(tornado.web.Application([("/stream", Stream)]))

``serve_tornado(app)`` binds, announces the port and runs until SIGTERM;
``serve_until_sigterm(start)`` does the same for any ``async start() -> port``
(e.g. a ``websockets`` server). Set ``BENCH_LOOP=uvloop`` to run servers on uvloop.

Payload format
--------------
``make_payload(seq, size)`` / ``PayloadMaker(size)(seq)``: 16 lowercase hex digits of
``seq`` followed by a fixed ASCII pattern, ``size`` bytes in all (``size >= 16``). It is
ASCII, so the same payload can go out as a binary frame, a text frame, an SSE ``data:``
line or a JSON string; ``check_payload(seq, data)`` verifies one.

Load client
-----------
``ClientConfig`` says what every connection expects. The client (``python harness.py
client '<json>'``, started by :func:`run_scenario`; it uses uvloop when installed) opens
``connections`` WebSockets with its own HTTP upgrade and frame parser on raw asyncio
``Protocol`` objects, answers pings with pongs, and verifies per connection:

* ``verify="frames"``: every data frame must carry ``make_payload(next_seq, len)``
  (sequence numbers 0, 1, 2, ... in order, content exact; ``size`` checked if given);
  pings/pongs may be interleaved;
* ``verify="stream"``: the whole byte stream must equal the expected unmasked, unfragmented
  frames of ``opcode`` with ``size`` byte payloads (checked with ``memcmp`` per chunk, so the
  client keeps up with > 1M frames/s; the server must send nothing else before the end);
* ``verify="count"``: only count frames and bytes.

``protocol="socketio"`` speaks Socket.IO v5 / Engine.IO v4 over the WebSocket transport
(``path`` such as ``/socket.io/?EIO=4&transport=websocket``): after the upgrade it waits
for the Engine.IO open packet (``0{...}``), connects to the default namespace (``40``),
counts the connection as open once the server confirms it (``40{"sid":...}``), answers
Engine.IO pings (``2``) with pongs (``3``), and treats only Socket.IO events
``42["<event>","<text>"]`` as data messages (``event``, default ``"m"``; the text is the
payload, checked like a frame's in ``verify="frames"``; ``size`` is the text length). The
timed part starts at the first event. ``send_count`` messages go out as events,
``start_message`` as a raw text frame (a whole Engine.IO packet); ``verify="stream"`` is
not available in this mode.

``expect`` = exact number of data messages per connection (then it closes with a close
frame once all arrived). ``duration`` = stop after that many seconds from the moment all
connections are open (abort the TCP connection). ``read_rate`` (bytes/s) makes a slow
reader (a token bucket pausing/resuming the transport), ``stop_reading`` a client that
never reads, ``rcvbuf`` sets ``SO_RCVBUF`` (smaller kernel buffers make a slow reader
bite sooner). ``start_message`` is a text frame sent on connection 0 once all are open
(e.g. to trigger a broadcast), ``send_count``/``send_size`` make each connection send
that many payload messages to the server (zero mask key) after opening.

Runner
------
``run_scenario(server_cmd, cfg, variant=..., scenario=...) -> Result``: starts the
server (own process, pinned to CPU 0), reads its port, samples its CPU times and RSS
(psutil, every 5 ms, plus ``ru_maxrss`` at exit), runs the load client (own process,
pinned to CPU 1), stops the server. ``Result`` has ``ok``/``error`` (delivery verified),
``messages``, ``msgs_per_s``, ``mb_per_s`` (wire bytes, MB = 10^6, wall time from the
first byte to the last verified byte at the clients), ``server_cpu_s`` (user+system
during the scenario), ``rss_start_mb``, ``rss_growth_mb`` (peak minus start) and the raw
client report. ``run_scenarios(server_cmd, [(name, cfg), ...], fresh=False)`` runs several scenarios
against one server process (quicker, for ``--tiny``). ``ServerProcess`` (a context
manager) and ``run_client`` are the two halves, for benchmarks that bring their own
client process or read statistics the server prints (``server.output``).

Reporting
---------
``markdown_table(results, ratios_vs=["websockets", ...])`` renders one row per result
grouped by scenario, with ``msgs/s vs <variant>`` (and CPU) ratio columns against the
named variants of the same scenario. ``best_of(results)`` keeps the fastest verified
repeat of each (scenario, variant). ``write_markdown(path, title, command, body)``
writes a results file. ``bench_args()`` parses the common ``--tiny`` / ``--repeat``
/ ``--out`` options; ``exit_code(results)`` is non-zero if any delivery check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

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
    "exit_code",
    "make_payload",
    "markdown_table",
    "query_int",
    "result_from",
    "run_client",
    "run_scenario",
    "run_scenarios",
    "serve_tornado",
    "serve_until_sigterm",
    "server_script",
    "write_markdown",
]

#: The ``benchmarks/`` directory and the repository root.
BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
#: CPU the server processes are pinned to (``None``: not pinned).
SERVER_CPU: int | None = _CPUS[0] if len(_CPUS) >= 2 else None
#: CPU the load client processes are pinned to (``None``: not pinned).
CLIENT_CPU: int | None = _CPUS[1] if len(_CPUS) >= 2 else None

# --------------------------------------------------------------------------- payloads

_SEQ_LEN = 16
_UNIT = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
_pattern = _UNIT * 64


def _pattern_of(size: int) -> bytes:
    global _pattern
    while len(_pattern) < size:
        _pattern += _pattern
    return _pattern[:size]


def make_payload(seq: int, size: int) -> bytes:
    """Payload of message ``seq``: 16 hex digits of ``seq`` + ASCII pattern, ``size`` bytes.

    Raises ``ValueError`` if ``size < 16``.
    """
    if size < _SEQ_LEN:
        raise ValueError(f"payload size must be >= {_SEQ_LEN}, not {size}")
    return b"%016x" % seq + _pattern_of(size)[_SEQ_LEN:]


class PayloadMaker:
    """Builds ``make_payload(seq, size)`` quickly for a fixed ``size``: ``maker(seq)``."""

    __slots__ = ("size", "tail")

    def __init__(self, size: int) -> None:
        if size < _SEQ_LEN:
            raise ValueError(f"payload size must be >= {_SEQ_LEN}, not {size}")
        self.size = size
        self.tail = _pattern_of(size)[_SEQ_LEN:]

    def __call__(self, seq: int) -> bytes:
        return b"%016x" % seq + self.tail


def check_payload(seq: int, data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` is exactly ``make_payload(seq, len(data))``."""
    n = len(data)
    return n >= _SEQ_LEN and bytes(data) == make_payload(seq, n)


# --------------------------------------------------------------------------- client

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclasses.dataclass
class ClientConfig:
    """What the load client does; see the module docstring. Times in seconds."""

    path: str = "/"
    connections: int = 1
    expect: int | None = None
    size: int | None = None
    verify: str = "frames"
    opcode: int = 2
    read_rate: float | None = None
    stop_reading: bool = False
    rcvbuf: int | None = None
    duration: float | None = None
    timeout: float = 120.0
    connect_concurrency: int = 200
    start_message: str | None = None
    send_count: int = 0
    send_size: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    protocol: str = "websocket"
    event: str = "m"

    def with_port(self, port: int) -> ClientConfig:
        """A copy aimed at ``port``."""
        return dataclasses.replace(self, port=port)


def _frame_header(opcode: int, n: int, *, masked: bool = False) -> bytes:
    m = 0x80 if masked else 0
    if n < 126:
        return bytes((0x80 | opcode, m | n))
    if n <= 0xFFFF:
        return bytes((0x80 | opcode, m | 126)) + n.to_bytes(2, "big")
    return bytes((0x80 | opcode, m | 127)) + n.to_bytes(8, "big")


def _client_frame(opcode: int, payload: bytes) -> bytes:
    # Zero mask key: XOR is the identity, so the client spends no CPU masking.
    return _frame_header(opcode, len(payload), masked=True) + b"\0\0\0\0" + payload


class _ExpectedStream:
    """The exact bytes of frames 0, 1, 2, ... of a fixed size, built in cached blocks."""

    def __init__(self, opcode: int, size: int, count: int | None) -> None:
        self.header = _frame_header(opcode, size)
        self.tail = _pattern_of(size)[_SEQ_LEN:]
        self.frame_len = len(self.header) + size
        self.count = count
        self.per_block = max(1, (256 * 1024) // self.frame_len)
        self.block_len = self.per_block * self.frame_len
        self.total = None if count is None else count * self.frame_len
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        # A stream of known length up to 256 MiB is built before connecting (outside the
        # timed part), so that verifying costs one memcmp per chunk received.
        self._keep = self.total is not None and self.total <= 256 * 1024 * 1024
        if self._keep and self.total:
            for index in range(-(-self.total // self.block_len)):
                self.block(index)

    def block(self, index: int) -> bytes:
        cache = self._cache
        data = cache.get(index)
        if data is not None:
            cache.move_to_end(index)
            return data
        first = index * self.per_block
        last = first + self.per_block
        if self.count is not None:
            last = min(last, self.count)
        h, t = self.header, self.tail
        data = b"".join([h + (b"%016x" % s) + t for s in range(first, last)])
        cache[index] = data
        if len(cache) > 64 and not self._keep:
            cache.popitem(last=False)
        return data


class _Conn(asyncio.Protocol):
    def __init__(self, client: _LoadClient, index: int) -> None:
        self.client = client
        self.cfg = client.cfg
        self.index = index
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.key = base64.b64encode(os.urandom(16))
        self.handshake = True
        self.buf = bytearray()
        self.frames = 0
        self.bytes = 0
        self.payload_bytes = 0
        self.next_seq = 0
        self.pings = 0
        self.first: float | None = None
        self.last: float | None = None
        self.errors: list[str] = []
        self.closed_by_server = False
        self.finished = False
        self.stream_off = 0
        self.stream = client.expected
        self.read_started = 0.0
        self.paused = False
        self.write_ok: asyncio.Event = asyncio.Event()
        self.write_ok.set()
        self.tails: dict[int, bytes] = {}
        self.sio = self.cfg.protocol == "socketio"
        self.sio_state = "open"  # Engine.IO open packet -> namespace connect -> events
        self.sio_prefix = b'42["' + self.cfg.event.encode() + b'","'
        self.ping_interval = 0.0  # Engine.IO pingInterval (s), from the open packet

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cfg = self.cfg
        request = (
            f"GET {cfg.path} HTTP/1.1\r\nHost: {cfg.host}:{cfg.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        self.write_ok.set()
        if not self.finished:
            self.closed_by_server = True
            self._finish()

    def pause_writing(self) -> None:
        self.write_ok.clear()

    def resume_writing(self) -> None:
        self.write_ok.set()

    def data_received(self, data: bytes) -> None:
        if self.handshake:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            rest = bytes(self.buf[end + 4 :])
            self.buf = bytearray()
            self.handshake = False
            if not self._check_handshake(head):
                return
            if not self.sio:
                self.opened.set_result(None)
            if self.cfg.stop_reading:
                self._pause()
            if not rest:
                return
            data = rest
        if self.finished:
            return
        now = time.perf_counter()
        if not self.read_started:
            self.read_started = now
        if self.first is None and not self.sio:
            self.first = now
        self.bytes += len(data)
        if self.stream is not None and (
            self.stream.total is None or self.stream_off < self.stream.total
        ):
            data = self._stream_verify(data, now)
            if not data or self.finished:
                self._throttle(now)
                return
        self._parse(data, now)
        if not self.finished:
            self._throttle(now)

    # -- handshake
    def _check_handshake(self, head: str) -> bool:
        lines = head.split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            self._fail(f"handshake: {lines[0]!r}")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            self._fail("handshake: bad Sec-WebSocket-Accept")
            return False
        if "sec-websocket-extensions" in headers:
            self._fail(f"handshake: unrequested extension {headers['sec-websocket-extensions']}")
            return False
        return True

    # -- slow / stopped readers
    def _pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.transport is not None and self.paused and not self.finished:
            self.paused = False
            self.transport.resume_reading()

    def _throttle(self, now: float) -> None:
        rate = self.cfg.read_rate
        if rate is None or self.finished:
            return
        allowed_at = self.read_started + self.bytes / rate
        if allowed_at > now:
            self._pause()
            self.loop.call_later(allowed_at - now, self._resume)

    # -- verification
    def _stream_verify(self, data: bytes, now: float) -> bytes:
        """Compare ``data`` with the expected stream; return bytes past its end."""
        st = self.stream
        assert st is not None
        n = len(data)
        i = 0
        off = self.stream_off
        total = st.total
        while i < n and (total is None or off < total):
            bi, r = divmod(off, st.block_len)
            blk = st.block(bi)
            take = min(len(blk) - r, n - i)
            a = data if (i == 0 and take == n) else data[i : i + take]
            b = blk if (r == 0 and take == len(blk)) else blk[r : r + take]
            if a != b:
                k = next(j for j in range(take) if a[j] != b[j])
                frame = (off + k) // st.frame_len
                self._fail(f"stream mismatch at byte {off + k} (frame {frame})")
                return b""
            i += take
            off += take
        self.stream_off = off
        frames = off // st.frame_len
        if frames != self.frames:
            self.payload_bytes += (frames - self.frames) * (st.frame_len - len(st.header))
            self.frames = frames
            self.next_seq = frames
            self.last = now
        if total is not None and off >= total:
            self._complete()
        return data[i:] if i < n else b""

    def _parse(self, data: bytes, now: float) -> None:
        buf: bytes | bytearray
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data
        n = len(buf)
        pos = 0
        cfg = self.cfg
        verify = cfg.verify
        size = cfg.size
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if b1 & 0x80:
                self._fail("masked frame from server")
                return
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            ps = pos + hl
            end = ps + ln
            if end > n:
                break
            op = b0 & 0x0F
            if self.sio and (op == 1 or op == 2):
                if b0 & 0xF0 != 0x80 or op != 1:
                    self._fail("Socket.IO: expected unfragmented text frames")
                    return
                if not self._sio_packet(buf, ps, end, now):
                    return
            elif op == 1 or op == 2:
                if b0 & 0x70:
                    self._fail("RSV bit set (no extension negotiated)")
                    return
                if not b0 & 0x80:
                    self._fail("fragmented message")
                    return
                seq = self.next_seq
                if verify != "count":
                    if size is not None and ln != size:
                        self._fail(f"frame {seq}: {ln} bytes, expected {size}")
                        return
                    tail = self.tails.get(ln)
                    if tail is None:
                        tail = self.tails[ln] = _pattern_of(ln)[_SEQ_LEN:]
                    if (
                        ln < _SEQ_LEN
                        or buf[ps : ps + _SEQ_LEN] != b"%016x" % seq
                        or buf[ps + _SEQ_LEN : end] != tail
                    ):
                        self._fail(f"frame {seq}: wrong payload {bytes(buf[ps : ps + 24])!r}")
                        return
                self.next_seq = seq + 1
                self.frames += 1
                self.payload_bytes += ln
                self.last = now
                if cfg.expect is not None and self.frames >= cfg.expect:
                    pos = end
                    if self.frames > cfg.expect:
                        self._fail(f"{self.frames} messages, expected {cfg.expect}")
                        return
                    self._complete()
                    return
            elif op == 9:
                self.pings += 1
                self._write(_client_frame(0xA, bytes(buf[ps:end])))
            elif op == 10:
                pass
            elif op == 8:
                self.closed_by_server = True
                self._finish()
                return
            else:
                self._fail(f"unexpected opcode {op}")
                return
            pos = end
        if buf is self.buf:
            del self.buf[:pos]
        elif pos < n:
            self.buf = bytearray(buf[pos:])

    def _sio_packet(self, buf: bytes | bytearray, ps: int, end: int, now: float) -> bool:
        """Handle one Socket.IO / Engine.IO packet (a text frame); False: stop parsing."""
        cfg = self.cfg
        prefix = self.sio_prefix
        if self.sio_state == "live" and buf[ps : ps + len(prefix)] == prefix:
            ds = ps + len(prefix)
            de = end - 2
            seq = self.next_seq
            if buf[de:end] != b'"]' or de < ds:
                self._fail(f"event {seq}: not a one-string event {bytes(buf[ps:end])[:48]!r}")
                return False
            ln = de - ds
            if cfg.verify != "count":
                if cfg.size is not None and ln != cfg.size:
                    self._fail(f"event {seq}: {ln} bytes, expected {cfg.size}")
                    return False
                tail = self.tails.get(ln)
                if tail is None:
                    tail = self.tails[ln] = _pattern_of(ln)[_SEQ_LEN:]
                if (
                    ln < _SEQ_LEN
                    or buf[ds : ds + _SEQ_LEN] != b"%016x" % seq
                    or buf[ds + _SEQ_LEN : de] != tail
                ):
                    self._fail(f"event {seq}: wrong payload {bytes(buf[ds : ds + 24])!r}")
                    return False
            if self.first is None:
                self.first = now
            self.next_seq = seq + 1
            self.frames += 1
            self.payload_bytes += ln
            self.last = now
            if cfg.expect is not None and self.frames >= cfg.expect:
                self._complete()
                return False
            return True
        packet = bytes(buf[ps:end])
        kind = packet[:1]
        if kind == b"2":  # Engine.IO ping: answer with a pong carrying the same data
            self.pings += 1
            self._write(_client_frame(1, b"3" + packet[1:]))
        elif kind in (b"3", b"6"):  # pong, noop
            pass
        elif kind == b"0" and self.sio_state == "open":
            try:
                info = json.loads(packet[1:])
                self.ping_interval = float(info["pingInterval"]) / 1000
            except (ValueError, KeyError, TypeError):
                self._fail(f"Engine.IO: bad open packet {packet[:80]!r}")
                return False
            self.sio_state = "connecting"
            self._write(_client_frame(1, b"40"))
        elif packet.startswith(b"40") and self.sio_state == "connecting":
            try:
                sid = json.loads(packet[2:])["sid"]
            except (ValueError, KeyError, TypeError):
                sid = None
            if not isinstance(sid, str):
                self._fail(f"Socket.IO: bad connect packet {packet[:80]!r}")
                return False
            self.sio_state = "live"
            if not self.opened.done():
                self.opened.set_result(None)
        elif kind == b"1" or packet.startswith(b"41"):  # Engine.IO close, namespace disconnect
            self.closed_by_server = True
            self._finish()
            return False
        else:
            self._fail(f"Socket.IO: unexpected packet {packet[:80]!r} ({self.sio_state})")
            return False
        return True

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, message: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(message)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(message))
        self._finish(abort=True)

    def _complete(self) -> None:
        """Every expected message arrived: close handshake from our side."""
        self._write(_client_frame(0x8, (1000).to_bytes(2, "big")))
        self._finish()

    def _finish(self, *, abort: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def stop(self) -> None:
        """End of the scenario's duration: vanish (abort the TCP connection)."""
        self._finish(abort=True)

    async def send_messages(self) -> None:
        make = PayloadMaker(self.cfg.send_size)
        for seq in range(self.cfg.send_count):
            if self.finished:
                return
            await self.write_ok.wait()
            if self.sio:
                self._write(_client_frame(1, self.sio_prefix + make(seq) + b'"]'))
            else:
                self._write(_client_frame(2, make(seq)))

    def report(self) -> dict[str, Any]:
        cfg = self.cfg
        errors = list(self.errors)
        if not errors and cfg.expect is not None and self.frames != cfg.expect:
            errors.append(f"received {self.frames} of {cfg.expect} messages")
        return {
            "frames": self.frames,
            "bytes": self.bytes,
            "payload_bytes": self.payload_bytes,
            "first": self.first,
            "last": self.last,
            "pings": self.pings,
            "closed_by_server": self.closed_by_server,
            "errors": errors,
        }


class _LoadClient:
    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.expected: _ExpectedStream | None = None
        if cfg.verify == "stream":
            if cfg.size is None:
                raise ValueError('verify="stream" needs a fixed size')
            self.expected = _ExpectedStream(cfg.opcode, cfg.size, cfg.expect)
        elif cfg.verify not in ("frames", "count"):
            raise ValueError(f"unknown verify mode {cfg.verify!r}")
        if cfg.protocol not in ("websocket", "socketio"):
            raise ValueError(f"unknown protocol {cfg.protocol!r}")
        if cfg.protocol == "socketio" and cfg.verify == "stream":
            raise ValueError('verify="stream" is not available with protocol="socketio"')

    async def _open(self, index: int, sem: asyncio.Semaphore) -> _Conn:
        cfg = self.cfg
        async with sem:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if cfg.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.rcvbuf)
            try:
                await self.loop.sock_connect(sock, (cfg.host, cfg.port))
            except BaseException:
                sock.close()
                raise
            _, conn = await self.loop.create_connection(lambda: _Conn(self, index), sock=sock)
            await asyncio.wait_for(conn.opened, cfg.timeout)
            return conn

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        sem = asyncio.Semaphore(cfg.connect_concurrency)
        tasks = [asyncio.ensure_future(self._open(i, sem)) for i in range(cfg.connections)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        conns = [c for c in outcomes if isinstance(c, _Conn)]
        connect_errors = [repr(e) for e in outcomes if not isinstance(e, _Conn)]
        t_open = time.perf_counter()
        if cfg.start_message is not None and conns:
            conns[0]._write(_client_frame(1, cfg.start_message.encode()))
        senders = [asyncio.ensure_future(c.send_messages()) for c in conns if cfg.send_count]
        stoppers = []
        if cfg.duration is not None:
            stoppers = [self.loop.call_later(cfg.duration, c.stop) for c in conns]
        timed_out = False
        if conns:
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(c.done for c in conns)),
                    cfg.timeout + (cfg.duration or 0),
                )
            except asyncio.TimeoutError:
                timed_out = True
        for h in stoppers:
            h.cancel()
        for c in conns:
            c.stop()
        for s in senders:
            s.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        per_conn = [c.report() for c in conns]
        errors = [f"connect: {e}" for e in connect_errors[:5]]
        if timed_out:
            errors.append(f"timeout after {cfg.timeout} s")
        for i, r in enumerate(per_conn):
            errors.extend(f"conn {i}: {e}" for e in r["errors"])
        firsts = [r["first"] for r in per_conn if r["first"] is not None]
        lasts = [r["last"] for r in per_conn if r["last"] is not None]
        frames = [r["frames"] for r in per_conn]
        return {
            "ok": not errors,
            "errors": errors[:10],
            "error_count": len(errors),
            "connections": len(conns),
            "connect_errors": len(connect_errors),
            "connect_seconds": t_open - t0,
            "frames": sum(frames),
            "frames_min": min(frames, default=0),
            "frames_max": max(frames, default=0),
            "bytes": sum(r["bytes"] for r in per_conn),
            "payload_bytes": sum(r["payload_bytes"] for r in per_conn),
            "pings": sum(r["pings"] for r in per_conn),
            "closed_by_server": sum(r["closed_by_server"] for r in per_conn),
            "seconds": (max(lasts) - min(firsts)) if firsts and lasts else 0.0,
            "wall_seconds": time.perf_counter() - t0,
            "client_cpu_s": time.process_time() - cpu0,
        }


def _client_main(config_json: str) -> int:
    cfg = ClientConfig(**json.loads(config_json))

    async def main() -> dict[str, Any]:
        return await _LoadClient(cfg).run()

    try:
        import uvloop

        report = uvloop.run(main())
    except ImportError:
        report = asyncio.run(main())
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------- servers


def announce(port: int) -> None:
    """Tell the runner the server is ready: print ``PORT <port>`` on stdout."""
    print(f"PORT {port}", flush=True)


def query_int(handler: Any, name: str, default: int | None = None) -> int:
    """Integer query argument ``name`` of a Tornado handler's request."""
    value = handler.get_query_argument(name, None)
    if value is None:
        if default is None:
            raise ValueError(f"missing query argument {name!r}")
        return default
    return int(value)


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if os.environ.get("BENCH_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def serve_until_sigterm(start: Callable[[], Awaitable[int]]) -> None:
    """Run ``await start()`` (returns the bound port), announce it, serve until SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        port = await start()
        announce(port)
        await stop.wait()

    _run(main)


def serve_tornado(app: Any, **server_kwargs: Any) -> None:
    """Serve a Tornado ``Application`` on a free 127.0.0.1 port until SIGTERM."""
    import tornado.httpserver
    import tornado.netutil

    async def start() -> int:
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", socket.AF_INET, backlog=4096)
        server = tornado.httpserver.HTTPServer(app, **server_kwargs)
        server.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    serve_until_sigterm(start)


def server_script(name: str) -> list[str]:
    """Command that runs ``benchmarks/servers/<name>`` with this interpreter."""
    return [sys.executable, str(BENCH_DIR / "servers" / name)]


# --------------------------------------------------------------------------- runner


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(BENCH_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _pin(pid: int, cpu: int | None) -> None:
    if cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {cpu})


class ServerProcess:
    """A server variant in its own process, pinned to :data:`SERVER_CPU`, measured.

    ``with ServerProcess(cmd) as server:`` starts ``cmd``, waits (``ready_timeout``, 30 s)
    for ``PORT <n>`` and samples RSS every ``sample_interval`` (5 ms) in a thread.
    ``server.port``; ``server.mark()`` resets the CPU/RSS baseline; ``server.measure()``
    returns ``{"cpu_s", "rss_start_mb", "rss_peak_mb", "rss_growth_mb"}`` since the
    baseline. On exit the process gets SIGTERM (SIGKILL after 5 s); ``server.output``
    holds its stdout after ``PORT`` and ``server.stderr`` its stderr. Raises
    ``RuntimeError`` if the server exits or says nothing before the timeout.
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
        self.output = ""
        self.stderr = ""
        self.maxrss = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._errfile: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._cpu0 = 0.0
        self._rss0 = 0

    def __enter__(self) -> ServerProcess:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        self._errfile = tempfile.TemporaryFile()
        env = _env()
        if self.env:
            env.update(self.env)
        self._proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self._errfile, env=env, cwd=str(ROOT)
        )
        _pin(self._proc.pid, SERVER_CPU)
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

    def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"{self.cmd}: no PORT line within {self.ready_timeout} s")
                chunk = os.read(self._proc.stdout.fileno(), 1)
                if not chunk:
                    raise RuntimeError(f"{self.cmd} exited before PORT: {self._stderr_tail()}")
                line += chunk
        text = line.decode().strip()
        if not text.startswith("PORT "):
            raise RuntimeError(f"{self.cmd}: expected 'PORT <n>', got {text!r}")
        return int(text.split()[1])

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
        assert proc.stdout is not None
        self.output = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        self.stderr = self._stderr_tail()
        self._errfile.close()


def run_client(cfg: ClientConfig, *, timeout: float | None = None) -> dict[str, Any]:
    """Run the load client in its own process pinned to :data:`CLIENT_CPU`; its report.

    The report is a dict: ``ok``, ``errors``, ``connections``, ``frames``, ``bytes``,
    ``payload_bytes``, ``seconds`` (first byte to last verified byte), ``pings``, ...
    A client that crashes yields ``ok: False`` with its stderr as the error.
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "client",
        json.dumps(dataclasses.asdict(cfg)),
    ]
    limit = timeout if timeout is not None else cfg.timeout + (cfg.duration or 0) + 30
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=str(ROOT)
    )
    _pin(proc.pid, CLIENT_CPU)
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


@dataclasses.dataclass
class Result:
    """One scenario run against one server variant (see the module docstring)."""

    variant: str
    scenario: str
    ok: bool
    error: str
    messages: int
    bytes: int
    seconds: float
    server_cpu_s: float
    rss_start_mb: float
    rss_growth_mb: float
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
        return Result(variant, scenario, False, str(exc), 0, 0, 0.0, 0.0, 0.0, 0.0)
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
            Result(variant, name, False, str(exc), 0, 0, 0.0, 0.0, 0.0, 0.0)
            for name, _ in scenarios
            if name not in done
        ]
    return results


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


# --------------------------------------------------------------------------- reporting


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


def bench_args(
    description: str, argv: Sequence[str] | None = None, *, repeat: int = 3
) -> argparse.Namespace:
    """Parse the common options: ``--tiny``, ``--repeat N`` (default ``repeat``), ``--out PATH``.

    ``--tiny`` forces one repeat.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny sizes, one repeat, no results file")
    p.add_argument("--repeat", type=int, default=repeat, help="runs per scenario (best is kept)")
    p.add_argument("--out", default=None, help="results markdown file")
    args = p.parse_args(argv)
    if args.tiny:
        args.repeat = 1
    return args


def exit_code(results: Sequence[Result]) -> int:
    """0 if every result verified its delivery, else 1 (after printing the failures)."""
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.scenario} / {r.variant}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "client":
        sys.exit(_client_main(sys.argv[2]))
    print("usage: harness.py client '<ClientConfig JSON>'", file=sys.stderr)
    sys.exit(2)
