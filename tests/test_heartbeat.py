"""HeartbeatMixin over real sockets: pings, dead peers, late answers, app-level mode, GC."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tornado.web
import tornado.websocket

from tests.helpers import wait_until
from tornado_longconn.codes import CloseCode
from tornado_longconn.gc_tuning import gc_tuning_stats, tune_gc, untune_gc
from tornado_longconn.heartbeat import (
    HeartbeatMixin,
    HeartbeatScheduler,
    HeartbeatStats,
    heartbeat_stats,
)
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled

INTERVAL = scaled(0.1)
TIMEOUT = scaled(0.1)
# Dead within interval + timeout + one scheduler tick; the rest is slack for a busy machine.
DEAD_BY = INTERVAL + TIMEOUT + HeartbeatScheduler().resolution + scaled(2.0)


class Recorder:
    """What the server side saw; shared with the handler through initialize()."""

    def __init__(self) -> None:
        self.handler: weakref.ref[Socket] | None = None
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.closes = 0
        self.closes_target = 1
        self.all_closed = asyncio.Event()
        self.messages: list[str | bytes] = []
        self.pongs = 0
        self.pong_target = 0
        self.enough_pongs = asyncio.Event()
        self.replies = 0
        self.enough_replies = asyncio.Event()
        self.timed_out: bool | None = None

    def get(self) -> Socket:
        assert self.handler is not None
        handler = self.handler()
        assert handler is not None
        return handler


class Socket(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    """A user's handler: overrides open/on_message/on_pong/on_close and calls no super()."""

    heartbeat_interval = INTERVAL
    heartbeat_timeout = TIMEOUT

    def initialize(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def open(self) -> None:
        self.recorder.handler = weakref.ref(self)
        self.recorder.opened.set()

    async def on_message(self, message: str | bytes) -> None:
        self.recorder.messages.append(message)
        await self.write_message(message, binary=isinstance(message, bytes))

    def on_pong(self, data: bytes) -> None:
        rec = self.recorder
        rec.pongs += 1
        if rec.pong_target and rec.pongs >= rec.pong_target:
            rec.enough_pongs.set()

    def is_heartbeat_reply(self, message: str) -> bool:
        answered = super().is_heartbeat_reply(message)
        if answered:
            rec = self.recorder
            rec.replies += 1
            if rec.replies >= 3:
                rec.enough_replies.set()
        return answered

    def on_close(self) -> None:
        rec = self.recorder
        rec.closes += 1
        rec.timed_out = self.heartbeat_timed_out
        rec.closed.set()
        if rec.closes >= rec.closes_target:
            rec.all_closed.set()


def make_app(recorder: Recorder, **settings: Any) -> tornado.web.Application:
    return tornado.web.Application([(r"/ws", Socket, {"recorder": recorder})], **settings)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def server(recorder: Recorder) -> AsyncIterator[AppServer]:
    async with AppServer(make_app(recorder)) as srv:
        yield srv


async def open_client(server: AppServer, recorder: Recorder, **kwargs: Any) -> WebSocketTestClient:
    client = await WebSocketTestClient.connect(server.ws_url("/ws"), **kwargs)
    await asyncio.wait_for(recorder.opened.wait(), scaled(5))
    return client


async def test_answered_pings_keep_the_connection_and_measure_latency(
    server: AppServer, recorder: Recorder
) -> None:
    recorder.pong_target = 3
    async with await open_client(server, recorder) as client:
        await asyncio.wait_for(recorder.enough_pongs.wait(), DEAD_BY * 3)
        handler = recorder.get()
        assert handler.latency is not None and handler.latency >= 0
        stats = heartbeat_stats(server.app)
        assert isinstance(stats, HeartbeatStats) and stats == handler.heartbeat_stats
        assert stats.count >= 3 and stats.p50 is not None and stats.p99 is not None
        assert stats.timeouts == 0 and stats.connections == 1
        assert client.pings_received >= 3
        # The user's on_message still works next to the heartbeats.
        await client.send("hello")
        assert await client.recv(scaled(5)) == "hello"
        assert not client.closed
    await asyncio.wait_for(recorder.closed.wait(), scaled(5))
    assert recorder.closes == 1 and recorder.timed_out is False
    assert stats.connections == 1  # a snapshot: it does not change
    assert heartbeat_stats(server.app).connections == 0
    assert len(HeartbeatScheduler.current()) == 0


async def test_silent_client_that_stops_reading_is_aborted_in_time(
    server: AppServer, recorder: Recorder
) -> None:
    client = await open_client(server, recorder, rcvbuf=4096)
    try:
        client.auto_pong = False
        client.stop_reading()
        await asyncio.wait_for(recorder.closed.wait(), DEAD_BY)
        assert recorder.timed_out is True
        stats = heartbeat_stats(server.app)
        assert stats.timeouts == 1 and stats.connections == 0
        client.resume_reading()
        await client.wait_closed(scaled(5))
        assert recorder.closes == 1
    finally:
        client.vanish()


async def test_a_client_answering_late_but_within_the_timeout_stays(recorder: Recorder) -> None:
    interval, timeout = scaled(0.15), scaled(0.6)
    app = make_app(recorder, heartbeat_interval=interval, heartbeat_timeout=timeout)
    async with AppServer(app) as srv, await open_client(srv, recorder) as client:
        # A busy client: it reads (and so answers pings) only every half timeout.
        for _ in range(8):
            client.stop_reading()
            await asyncio.sleep(timeout / 2)  # the client's own pacing, not a synchronisation
            client.resume_reading()
            await asyncio.sleep(scaled(0.01))
        assert not client.closed
        assert not recorder.closed.is_set()
        stats = heartbeat_stats(app)
        assert stats.timeouts == 0 and stats.count >= 2
        handler = recorder.get()
        assert handler.latency is not None


async def test_sigstopped_client_process_is_detected(server: AppServer, recorder: Recorder) -> None:
    script = (
        "import sys\n"
        "from websockets.sync.client import connect\n"
        "with connect(sys.argv[1]) as ws:\n"
        "    print('ready', flush=True)\n"
        "    while True:\n"
        "        ws.recv()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, server.ws_url("/ws"), stdout=asyncio.subprocess.PIPE
    )
    stopped = False
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), scaled(20))
        assert line.strip() == b"ready"
        await asyncio.wait_for(recorder.opened.wait(), scaled(5))
        recorder.pong_target = 2  # the live process answers pings
        await asyncio.wait_for(recorder.enough_pongs.wait(), DEAD_BY * 3)
        assert not recorder.closed.is_set()
        os.kill(proc.pid, signal.SIGSTOP)  # vanishes without a FIN; its kernel still ACKs
        stopped = True
        await asyncio.wait_for(recorder.closed.wait(), DEAD_BY)
        assert recorder.timed_out is True and recorder.closes == 1
    finally:
        if proc.returncode is None:
            # SIGKILL ends a stopped process too; the child watcher may reap it at
            # once, so the pid can be gone before (or after) either signal.
            with contextlib.suppress(ProcessLookupError):
                if stopped:
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            await asyncio.wait_for(proc.wait(), scaled(10))


@pytest.mark.parametrize("last", ["pong", "message"])
async def test_a_peer_silent_after_its_last_frame_is_dropped_within_interval_plus_timeout(
    recorder: Recorder, last: str
) -> None:
    # The bound is measured on the server's own clock and timers, so a busy
    # machine delays both sides alike: the check below runs one scheduler tick
    # after the bound, and the one before it just before the bound.
    interval, timeout = scaled(0.3), scaled(0.2)
    app = make_app(recorder, heartbeat_interval=interval, heartbeat_timeout=timeout)
    resolution = HeartbeatScheduler.current().resolution
    async with AppServer(app) as srv, await open_client(srv, recorder) as client:
        recorder.pong_target = 1
        await asyncio.wait_for(recorder.enough_pongs.wait(), scaled(5))
        client.auto_pong = False  # from now on the peer answers nothing
        handler = recorder.get()
        state = handler._heartbeat
        assert state is not None
        if last == "message":
            await client.send("last words")
            assert await client.recv(scaled(5)) == "last words"
        last_frame = state.last_activity
        loop = asyncio.get_running_loop()
        bound = last_frame + interval + timeout
        before = loop.create_future()
        after = loop.create_future()
        loop.call_at(bound - resolution / 2, lambda: before.set_result(state.timed_out))
        loop.call_at(bound + 2 * resolution, lambda: after.set_result(state.timed_out))
        assert await before is False
        assert await after is True
        await asyncio.wait_for(recorder.closed.wait(), scaled(5))
        assert recorder.timed_out is True


async def test_application_mode_with_a_text_only_client(recorder: Recorder) -> None:
    app = make_app(recorder, heartbeat_mode="application")
    async with AppServer(app) as srv:
        client = await open_client(srv, recorder)
        try:
            client.auto_pong = False  # it cannot see ping frames; only text
            seen: list[str | bytes] = []
            echoed = asyncio.Event()

            async def answer() -> None:
                while True:
                    message = await client.recv(DEAD_BY * 3)
                    if message == '{"type":"ping"}':
                        await client.send('{"type":"pong"}')
                    else:
                        seen.append(message)
                        echoed.set()

            answering = asyncio.create_task(answer())
            await asyncio.wait_for(recorder.enough_replies.wait(), DEAD_BY * 3)
            await client.send("hello")
            await asyncio.wait_for(echoed.wait(), scaled(5))
            handler = recorder.get()
            assert handler.latency is not None
            assert client.pings_received == 0  # no protocol pings in this mode
            assert '{"type":"pong"}' not in recorder.messages  # replies are not on_message's

            # Now the client stops answering: closed with the heartbeat close code.
            answering.cancel()
            with pytest.raises(asyncio.CancelledError):
                await answering
            assert recorder.messages == ["hello"]
            await asyncio.wait_for(recorder.closed.wait(), DEAD_BY)
            assert recorder.timed_out is True
            await client.wait_closed(scaled(5))
            assert client.close_code == CloseCode.HEARTBEAT_TIMEOUT
            assert seen == ["hello"]
        finally:
            client.vanish()


async def test_interval_none_sends_nothing(recorder: Recorder) -> None:
    app = make_app(recorder, heartbeat_interval=None)
    async with AppServer(app) as srv, await open_client(srv, recorder) as client:
        client.auto_pong = False
        with pytest.raises(asyncio.TimeoutError):
            await client.recv((INTERVAL + TIMEOUT) * 3)
        assert client.frames_received == 0
        assert len(HeartbeatScheduler.current()) == 0
        handler = recorder.get()
        assert handler.latency is None and not handler.heartbeat_timed_out
        assert not recorder.closed.is_set()


def test_bad_class_attributes_fail_when_the_class_is_defined() -> None:
    with pytest.raises(ValueError, match=r"heartbeat_interval must be > 0 seconds.*-1"):

        class Negative(HeartbeatMixin, tornado.websocket.WebSocketHandler):
            heartbeat_interval = -1.0

    with pytest.raises(ValueError, match="a timeout needs an interval"):

        class TimeoutOnly(HeartbeatMixin, tornado.websocket.WebSocketHandler):
            heartbeat_interval = None
            heartbeat_timeout = 5.0


async def test_bad_settings_refuse_the_connection(recorder: Recorder) -> None:
    app = make_app(recorder, heartbeat_interval=None, heartbeat_timeout=3.0)
    async with AppServer(app) as srv:
        with pytest.raises(ConnectionError, match="500"):
            await WebSocketTestClient.connect(srv.ws_url("/ws"))
    assert not recorder.opened.is_set()


async def test_tornado_ping_interval_is_ignored_with_a_warning(recorder: Recorder) -> None:
    app = make_app(recorder, websocket_ping_interval=scaled(0.05))
    async with AppServer(app) as srv:
        with pytest.warns(RuntimeWarning, match="websocket_ping_interval=.* is ignored"):
            client = await open_client(srv, recorder)
        async with client:
            assert recorder.get().ping_interval is None  # Tornado's pinger does not run


async def test_tornado_ping_interval_works_when_heartbeats_are_off(recorder: Recorder) -> None:
    app = make_app(recorder, heartbeat_interval=None, websocket_ping_interval=scaled(0.05))
    async with AppServer(app) as srv, await open_client(srv, recorder) as client:
        assert recorder.get().ping_interval == scaled(0.05)
        recorder.pong_target = 2
        await asyncio.wait_for(recorder.enough_pongs.wait(), scaled(5))
        assert client.pings_received >= 2


async def test_connections_share_one_scheduler(server: AppServer, recorder: Recorder) -> None:
    scheduler = HeartbeatScheduler.current()
    recorder.closes_target = 3
    clients = [await WebSocketTestClient.connect(server.ws_url("/ws")) for _ in range(3)]
    try:
        assert len(scheduler) == 3
        assert scheduler is HeartbeatScheduler.current()
    finally:
        for client in clients:
            await client.close()
    await asyncio.wait_for(recorder.all_closed.wait(), scaled(5))
    assert len(scheduler) == 0
    assert scheduler._timer is None  # no timer (and no loop reference) while idle


async def _timed_out_handler_is_freed(
    recorder: Recorder, app: tornado.web.Application, frozen: bool = False
) -> None:
    async with AppServer(app) as srv, await open_client(srv, recorder):
        # A healthy connection keeps the scheduler ticking (and freezing) meanwhile.
        recorder.opened.clear()
        client = await open_client(srv, recorder)
        try:
            client.auto_pong = False
            client.stop_reading()
            handler = recorder.get()
            freed = asyncio.Event()
            weakref.finalize(handler, freed.set)
            del handler
            await asyncio.wait_for(recorder.closed.wait(), DEAD_BY)
            assert recorder.timed_out is True
        finally:
            client.vanish()
        await asyncio.wait_for(freed.wait(), scaled(10))
        assert recorder.handler is not None and recorder.handler() is None
        if frozen:
            assert gc.get_freeze_count() > 0


async def test_closed_handler_is_garbage_collectable(recorder: Recorder) -> None:
    app = make_app(recorder)
    gc.collect()
    await _timed_out_handler_is_freed(recorder, app)


async def test_closed_handler_is_freed_by_refcount_with_gc_freeze_on(recorder: Recorder) -> None:
    # The default never collects frozen objects: the handler must go by reference
    # counting alone, i.e. closing leaves no reference cycle that freezing would keep.
    tune_gc()
    try:
        await _timed_out_handler_is_freed(recorder, make_app(recorder), frozen=True)
        stats = gc_tuning_stats()
        assert stats.active and stats.freezes >= 1 and stats.collections == 0
        assert stats.collect_interval is None
    finally:
        untune_gc()
    assert gc.get_freeze_count() == 0
    assert not gc_tuning_stats().active


class Cyclic(Socket):
    def open(self) -> None:
        super().open()
        self.me = self  # a user's reference cycle: only the cyclic collector frees it


async def test_frozen_cycles_are_collected_periodically(recorder: Recorder) -> None:
    tune_gc(collect_interval=scaled(0.3))
    try:
        app = tornado.web.Application([(r"/ws", Cyclic, {"recorder": recorder})])
        await _timed_out_handler_is_freed(recorder, app)
        assert gc_tuning_stats().collections >= 1
    finally:
        untune_gc()


async def test_gc_freeze_setting_turns_it_on_once_for_the_process(recorder: Recorder) -> None:
    app = make_app(recorder, heartbeat_gc_freeze=True)
    try:
        async with AppServer(app) as srv, await open_client(srv, recorder):
            assert gc_tuning_stats().active
        # The last connection closing does not unfreeze: the tuning is the process's.
        await asyncio.wait_for(recorder.closed.wait(), scaled(5))
        assert gc_tuning_stats().active
    finally:
        untune_gc()


async def test_a_freeze_made_by_someone_else_is_never_undone(recorder: Recorder) -> None:
    gc.freeze()  # the application's own freeze, e.g. after imports in a pre-fork server
    theirs = gc.get_freeze_count()
    assert theirs > 0
    tune_gc(collect_interval=scaled(0.05))
    try:
        await _timed_out_handler_is_freed(recorder, make_app(recorder), frozen=True)
        stats = gc_tuning_stats()
        assert stats.foreign_freeze and stats.collections == 0 and stats.freezes >= 1
        untune_gc()
        assert gc.get_freeze_count() >= theirs  # nothing was unfrozen
    finally:
        untune_gc()
        gc.unfreeze()


async def test_periodic_collection_is_off_by_default_and_can_be_turned_off(
    recorder: Recorder,
) -> None:
    tune_gc(collect_interval=scaled(0.05))
    try:
        assert gc_tuning_stats().collect_interval == scaled(0.05)
        tune_gc()  # back to the default: freeze, never collect
        app = tornado.web.Application([(r"/ws", Cyclic, {"recorder": recorder})])
        async with AppServer(app) as srv:
            client = await open_client(srv, recorder)
            ref = recorder.handler
            assert ref is not None
            opened_at = gc_tuning_stats().freezes
            # A freeze after the open: the handler (a cycle of its own) is frozen.
            await wait_until(lambda: gc_tuning_stats().freezes > opened_at, timeout=scaled(10))
            client.vanish()
            await asyncio.wait_for(recorder.closed.wait(), scaled(5))
        stats = gc_tuning_stats()
        assert stats.collections == 0 and stats.collect_interval is None
        assert ref() is not None  # frozen and never collected: the documented trade-off
    finally:
        untune_gc()
    gc.collect()
    assert ref() is None


def test_tune_gc_rejects_a_bad_interval() -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="collect_interval"):
            tune_gc(collect_interval=bad)  # type: ignore[arg-type]
    assert not gc_tuning_stats().active


class Streamer(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    heartbeat_interval = scaled(0.2)

    def initialize(self, recorder: Recorder, size: int) -> None:
        self.recorder = recorder
        self.size = size

    async def open(self) -> None:
        self.recorder.handler = weakref.ref(self)  # type: ignore[arg-type]
        self.recorder.opened.set()
        chunk = b"x" * (1 << 20)
        for _ in range(self.size // len(chunk)):
            await self.write_message(chunk, binary=True)

    def on_message(self, message: str | bytes) -> None:
        pass

    def on_close(self) -> None:
        self.recorder.timed_out = self.heartbeat_timed_out
        self.recorder.closed.set()


async def test_slow_reader_of_a_50mb_stream_is_not_cut(recorder: Recorder) -> None:
    size = 50 << 20
    app = tornado.web.Application([(r"/s", Streamer, {"recorder": recorder, "size": size})])
    async with AppServer(app) as srv:
        client = await WebSocketTestClient.connect(srv.ws_url("/s"), rcvbuf=65536)
        try:
            client.auto_pong = False  # only the draining shows that it is alive
            received = 0

            async def read_slowly() -> None:
                nonlocal received
                rate = 20 << 20  # a slow reader: about 20 MB/s, paced by pausing
                while received < size:
                    before = client.bytes_received
                    client.resume_reading()
                    await asyncio.sleep(0.001)
                    client.stop_reading()
                    await asyncio.sleep((client.bytes_received - before) / rate)
                    while client.pending_messages:
                        received += len(await client.recv(0))

            await asyncio.wait_for(read_slowly(), scaled(90))
            assert received == size
            stats = heartbeat_stats(app)
            # The transfer spanned several heartbeat intervals, none of them answered.
            assert stats.pings_sent >= 4
            assert stats.timeouts == 0 and not recorder.closed.is_set()
            # Once the stream is done and the client goes silent, it is dropped.
            client.stop_reading()
            await asyncio.wait_for(recorder.closed.wait(), scaled(0.4) + DEAD_BY)
            assert recorder.timed_out is True
        finally:
            client.vanish()


class Member(Socket):
    """Joins a BroadcastGroup in open(): the group hooks the close path too."""

    def initialize(self, recorder: Recorder, group: Any) -> None:  # type: ignore[override]
        super().initialize(recorder)
        self.group = group

    def open(self) -> None:
        super().open()
        self.group.join(self)


async def test_composes_with_broadcast_group_membership(recorder: Recorder) -> None:
    from tornado_longconn.broadcast import BroadcastGroup

    group = BroadcastGroup("room")
    app = tornado.web.Application([(r"/ws", Member, {"recorder": recorder, "group": group})])
    async with AppServer(app) as srv:
        client = await open_client(srv, recorder)
        try:
            await group.publish("hello")
            assert await client.recv(scaled(5)) == "hello"
            assert len(group) == 1
            client.auto_pong = False
            client.stop_reading()
            handler = recorder.get()
            freed = asyncio.Event()
            weakref.finalize(handler, freed.set)
            del handler
            await asyncio.wait_for(recorder.closed.wait(), DEAD_BY)
            assert recorder.timed_out is True and recorder.closes == 1
            assert len(group) == 0  # the group saw the close and let the member go
        finally:
            client.vanish()
        gc.collect()
        await asyncio.wait_for(freed.wait(), scaled(5))
    await group.close()


def test_gc_tuning_freezes_at_most_once_a_second_of_ticks() -> None:
    # Each freeze counts the frozen objects (gc.get_freeze_count walks them all: 24 ms
    # for a million): once per scheduler tick (20 a second) it took the whole event loop
    # of a 10,000-connection server.
    from tornado_longconn import gc_tuning

    tune_gc(collect_interval=3600)
    try:
        for _ in range(20):
            gc_tuning.after_tick()
        assert gc_tuning_stats().freezes == 1
    finally:
        untune_gc()


async def test_gc_freeze_setting_does_not_count_frozen_objects_per_connection(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gc.get_freeze_count() walks every frozen object: once per connection opened,
    # a 10,000-connection server spent its whole loop counting.
    import gc

    from tornado_longconn import connection_stats

    calls: list[int] = []
    real = gc.get_freeze_count

    def counting() -> int:
        calls.append(1)
        return real()

    app = make_app(recorder, heartbeat_gc_freeze=True)
    try:
        async with AppServer(app) as srv:
            clients = [await WebSocketTestClient.connect(srv.ws_url("/ws")) for _ in range(2)]
            await wait_until(lambda: gc_tuning_stats().active)
            monkeypatch.setattr(gc, "get_freeze_count", counting)
            clients += [await WebSocketTestClient.connect(srv.ws_url("/ws")) for _ in range(10)]
            await wait_until(lambda: connection_stats(app).websocket == 12)
            monkeypatch.undo()
            # At most one freeze (two counts) in that time, not two per connection.
            assert len(calls) <= 4
            for client in clients:
                await client.close()
    finally:
        untune_gc()


def test_default_tuning_does_not_walk_the_frozen_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    from tornado_longconn import gc_tuning

    counted: list[int] = []
    real = gc.get_freeze_count

    def counting() -> int:
        counted.append(1)
        return real()

    tuner = gc_tuning._Tuner(None, 0.0)
    monkeypatch.setattr(gc_tuning.gc, "get_freeze_count", counting)
    try:
        for second in range(5):
            tuner.after_tick(float(second))
        assert tuner.freezes == 5 and counted == []  # get_freeze_count() walks them all
        tuner.set_interval(60.0, 5.0)
        tuner.after_tick(5.0)
        assert tuner.freezes == 6 and len(counted) == 2  # with collections it must count
    finally:
        monkeypatch.undo()
        gc.unfreeze()
