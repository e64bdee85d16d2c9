"""Per-connection memory: closed connections are freed by reference counting alone.

With the cyclic garbage collector off, a connection that opened (heartbeats on,
a member of a group, subscribed to topics) and then closed -- by the client, by
a reset, by the server, or by a heartbeat timeout -- must leave nothing behind:
not its handler, writer, memberships, hook registry or heartbeat state, and not
Tornado's ``IOStream`` or ``HTTP1Connection`` under it. Objects kept in a
reference cycle would wait for a full collection, which walks every live
object of a server holding thousands of connections.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import tornado.web
import tornado.websocket

from tests.helpers import wait_until
from tornado_longconn import BroadcastGroup, BroadcastHub, HeartbeatMixin, SubscriptionMixin
from tornado_longconn._tornado import iostream
from tornado_longconn.backpressure import BackpressureWriter, FlowState, OverflowPolicy
from tornado_longconn.broadcast import Membership
from tornado_longconn.heartbeat import HeartbeatState
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled

CONNECTIONS = 4


class Tracked:
    """Weak references to everything one connection made, taken in ``open()``."""

    def __init__(self) -> None:
        self.refs: list[tuple[str, weakref.ref[Any]]] = []
        self.handlers: list[tornado.websocket.WebSocketHandler] = []
        self.opened = asyncio.Event()
        self.closed = 0

    def track(self, handler: tornado.websocket.WebSocketHandler) -> None:
        ws = handler.ws_connection
        assert ws is not None
        objects: dict[str, Any] = {
            "handler": handler,
            "writer": BackpressureWriter.of(handler),
            "protocol": ws,
            "IOStream": ws.stream,
            "HTTP1Connection": handler.request.connection,
        }
        for name, obj in objects.items():
            assert obj is not None, name
            self.refs.append((name, weakref.ref(obj)))
        self.handlers.append(handler)
        if len(self.handlers) == CONNECTIONS:
            self.opened.set()

    def close_all(self) -> None:
        for handler in self.handlers:
            handler.close(1000, "bye")

    def alive(self) -> list[str]:
        return [name for name, ref in self.refs if ref() is not None]


def slotted_instances() -> dict[str, int]:
    """Live memberships and heartbeat states (slotted, without weak references)."""
    counts = {"Membership": 0, "HeartbeatState": 0}
    for obj in gc.get_objects():
        if isinstance(obj, Membership):
            counts["Membership"] += 1
        elif isinstance(obj, HeartbeatState):
            counts["HeartbeatState"] += 1
    return counts


class Member(HeartbeatMixin, tornado.websocket.WebSocketHandler):
    heartbeat_interval = 30.0

    def initialize(self, tracked: Tracked, group: BroadcastGroup) -> None:
        self.tracked = tracked
        self.group = group

    def open(self) -> None:
        self.group.join(self)
        self.tracked.track(self)

    def on_message(self, message: str | bytes) -> None:
        pass

    def on_close(self) -> None:
        self.tracked.closed += 1


class Subscriber(HeartbeatMixin, SubscriptionMixin, tornado.websocket.WebSocketHandler):
    heartbeat_interval = 30.0

    def initialize(self, tracked: Tracked, hub: BroadcastHub) -> None:
        self.tracked = tracked
        self.subscription_hub = hub

    def open(self, *args: str, **kwargs: str) -> None:
        super().open(*args, **kwargs)
        for topic in range(10):
            self.subscription_group(f"t{topic}").join(self)
        self.tracked.track(self)

    def on_close(self) -> None:
        self.tracked.closed += 1


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
async def served() -> AsyncIterator[tuple[AppServer, Tracked]]:
    tracked = Tracked()
    hub = BroadcastHub()
    app = tornado.web.Application(
        [
            ("/member", Member, {"tracked": tracked, "group": hub.group("room")}),
            ("/subs", Subscriber, {"tracked": tracked, "hub": hub}),
        ]
    )
    async with AppServer(app) as server:
        yield server, tracked


@pytest.mark.parametrize("path", ["/member", "/subs"])
@pytest.mark.parametrize("how", ["client_close", "reset", "server_close"])
async def test_closed_connections_are_freed_by_refcounting(
    served: tuple[AppServer, Tracked], no_cycle_collector: None, path: str, how: str
) -> None:
    server, tracked = served
    before = slotted_instances()
    clients = [await WebSocketTestClient.connect(server.ws_url(path)) for _ in range(CONNECTIONS)]
    await asyncio.wait_for(tracked.opened.wait(), scaled(10))
    assert len(tracked.refs) == CONNECTIONS * 5
    opened = slotted_instances()
    members = 1 if path == "/member" else 10
    assert opened["Membership"] - before["Membership"] == CONNECTIONS * members
    assert opened["HeartbeatState"] - before["HeartbeatState"] == CONNECTIONS
    if how == "client_close":
        for client in clients:
            await client.close(timeout=10)
    elif how == "reset":  # the peer vanishes: the stream is closed by ECONNRESET
        for client in clients:
            client.vanish()
    else:
        tracked.close_all()
        for client in clients:
            await client.wait_closed(scaled(10))
    tracked.handlers.clear()
    await wait_until(lambda: tracked.closed == CONNECTIONS, timeout=10)
    try:
        await wait_until(lambda: not tracked.alive(), timeout=10)
    except AssertionError:
        raise AssertionError(f"left in reference cycles: {tracked.alive()}") from None
    assert slotted_instances() == before
    assert gc.isenabled() is False


async def test_idle_writer_holds_no_queues_or_waiters(served: tuple[AppServer, Tracked]) -> None:
    server, tracked = served
    client = await WebSocketTestClient.connect(server.ws_url("/member"))
    try:
        await wait_until(lambda: bool(tracked.handlers))
        writer = BackpressureWriter.of(tracked.handlers[0])
        assert not hasattr(writer, "__dict__") or not writer.__dict__
        assert writer._waiters is None and writer._drain_waiters is None
        assert writer._write_futures is None and writer._state.queue == ()
        await writer.send("hello")
        await writer.drained()
        assert await client.recv(scaled(10)) == "hello"
        assert writer._drain_waiters is None and writer._waiters is None
    finally:
        await client.close()


def test_drop_oldest_queue_is_released_when_empty() -> None:
    state: FlowState[str] = FlowState(high_water=10, policy=OverflowPolicy.DROP_OLDEST)
    assert state.queue == ()
    state.commit(11)
    assert state.offer("a", 5).name == "QUEUED"
    assert len(state.queue) == 1
    state.flushed(0)
    assert state.take_queued() == "a"
    assert state.queue == ()  # the deque is dropped once empty
    assert state.offer("b", 5).name == "WRITTEN"


# -- what one membership allocates ------------------------------------------------------

MEMBERS = 200
#: The objects a connection's first membership may add (its writer and what the writer
#: needs, the membership, the handler's one library attribute): no dict, closure, weak
#: reference or patched method.
MEMBER_TYPES = {
    "_Slots": 1,
    "BackpressureWriter": 1,
    "FlowState": 1,
    "_WebSocketTransport": 1,
    "Membership": 1,
    "list": 1,  # the writer's cork
    "method": 1,  # the writer's is_closing, bound once
}


class Counted(tornado.websocket.WebSocketHandler):
    # Class attributes, not initialize(): a handler with Tornado's attributes only.
    handlers: list[Any]

    def open(self) -> None:
        self.handlers.append(self)

    def on_message(self, message: str | bytes) -> None:
        pass


def _library_objects() -> dict[str, int]:
    """GC-tracked objects by type name (all of them: the test compares two moments)."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


async def test_a_membership_allocates_no_dict_closure_or_hook_per_connection() -> None:
    handlers: list[Any] = []
    hub = BroadcastHub()
    group = hub.group("room")
    counted = type("CountedHere", (Counted,), {"handlers": handlers})
    app = tornado.web.Application([("/ws", counted)])
    async with AppServer(app) as server:
        clients = [await WebSocketTestClient.connect(server.ws_url("/ws")) for _ in range(MEMBERS)]
        try:
            await wait_until(lambda: len(handlers) == MEMBERS)
            # One join first: the group's own structures (its member dict, the
            # flusher, the class-level hooks) are made once, not per member.
            group.join(handlers[0])
            gc.collect()
            keys = [set(h.__dict__) for h in handlers]
            sizes = [sys.getsizeof(h.__dict__) for h in handlers]
            before = _library_objects()
            tracemalloc.start()
            try:
                snapshot0 = tracemalloc.take_snapshot()
                for handler in handlers[1:]:
                    group.join(handler)
                snapshot1 = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            joined = MEMBERS - 1
            library = tracemalloc.Filter(True, "*tornado_longconn*")
            diff = snapshot1.filter_traces([library]).compare_to(
                snapshot0.filter_traces([library]), "filename"
            )
            size = sum(stat.size_diff for stat in diff) / joined
            del snapshot0, snapshot1, diff
            gc.collect()
            after = _library_objects()
            added = {name: after.get(name, 0) - before.get(name, 0) for name in after}
            per_member = {n: round(c / joined) for n, c in added.items() if c >= joined // 2}
            assert per_member == MEMBER_TYPES, per_member
            assert size <= 1024, f"{size:.0f} bytes per member"
            # Nothing patched on the handler, its protocol or its stream.
            for handler in handlers:
                assert "close" not in handler.__dict__
                assert "on_connection_close" not in handler.__dict__
                assert "close" not in handler.ws_connection.__dict__
                assert iostream.close_callback(handler.ws_connection.stream) is None
            # The handler gains one attribute: with Tornado's 27, CPython still shares
            # the key table between handlers (one more makes a 1.3 KB dict per handler).
            for handler, was, size_was in zip(handlers[1:], keys[1:], sizes[1:], strict=True):
                assert set(handler.__dict__) - was == {"_longconn"}
                if sys.version_info[:2] == (3, 11):
                    assert sys.getsizeof(handler.__dict__) == size_was
            assert all(group in _groups_of(h) for h in handlers)
        finally:
            for client in clients:
                client.vanish()
    await wait_until(lambda: len(group) == 0)


def _groups_of(handler: Any) -> list[BroadcastGroup]:
    from tornado_longconn.broadcast import _members_of

    return list(_members_of(handler))
