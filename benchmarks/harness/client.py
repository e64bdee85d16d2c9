"""The verifying WebSocket load client (runs in its own process).

``python -m benchmarks.harness.client '<ClientConfig JSON>'`` prints one JSON report
line; :func:`benchmarks.harness.run_client` starts it pinned to the client CPU. It uses
uvloop when installed.

``ClientConfig`` says what every connection expects. The client opens
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

``freeze`` (dead-peer tests): the first ``freeze`` connections, right after answering
their first ping once every connection is open (so that the server is no longer busy
with handshakes; ``start_message`` goes out at that moment too), send one text frame
``"frozen <t>"`` (``t`` = ``time.monotonic()``,
the same clock in every process of the host) and then neither read nor write again,
without closing: a peer that vanished without a FIN. The report lists their
``frozen_at`` times.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from collections import OrderedDict
from typing import Any

from .payload import SEQ_LEN, PayloadMaker, pattern_of
from .system import raise_fd_limit

__all__ = ["ClientConfig", "main"]

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
    freeze: int = 0

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
        self.tail = pattern_of(size)[SEQ_LEN:]
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
        self.freeze = index < self.cfg.freeze
        self.frozen_at: float | None = None
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
        if self.finished or self.frozen_at is not None:
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
                        tail = self.tails[ln] = pattern_of(ln)[SEQ_LEN:]
                    if (
                        ln < SEQ_LEN
                        or buf[ps : ps + SEQ_LEN] != b"%016x" % seq
                        or buf[ps + SEQ_LEN : end] != tail
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
                if self.freeze and self.client.all_open:
                    self._freeze()
                    return
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
                    tail = self.tails[ln] = pattern_of(ln)[SEQ_LEN:]
                if (
                    ln < SEQ_LEN
                    or buf[ds : ds + SEQ_LEN] != b"%016x" % seq
                    or buf[ds + SEQ_LEN : de] != tail
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
        if (
            self.transport is not None
            and self.frozen_at is None
            and not self.transport.is_closing()
        ):
            self.transport.write(data)

    def _freeze(self) -> None:
        """Say when, then stop reading and writing without closing (a vanished peer)."""
        now = time.monotonic()
        self._write(_client_frame(1, b"frozen %.6f" % now))
        self.frozen_at = now
        self.freeze = False
        self.buf = bytearray()
        self._pause()

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
            "frozen_at": self.frozen_at,
            "errors": errors,
        }


class _LoadClient:
    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.expected: _ExpectedStream | None = None
        self.all_open = False
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
        self.all_open = True
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
            "frozen_at": [r["frozen_at"] for r in per_conn if r["frozen_at"] is not None],
        }


def main(config_json: str) -> int:
    """Run the client for the JSON ``ClientConfig``; print its report; 0 if it verified."""
    cfg = ClientConfig(**json.loads(config_json))
    limit = raise_fd_limit()
    if cfg.connections + 50 > limit:
        error = f"open-files limit {limit} is too low for {cfg.connections} connections"
        print(json.dumps({"ok": False, "errors": [error], "frames": 0}), flush=True)
        return 1

    async def main() -> dict[str, Any]:
        return await _LoadClient(cfg).run()

    try:
        import uvloop

        report = uvloop.run(main())
    except ImportError:
        report = asyncio.run(main())
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m benchmarks.harness.client '<ClientConfig JSON>'", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
