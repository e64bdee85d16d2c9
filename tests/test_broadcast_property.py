"""Hypothesis: random interleavings of join / leave / publish / close over real sockets.

After every step the group's membership equals the model's, the publish counts
match it, and at the end every connection that stayed open received exactly the
messages published while it was a member (and not excluded), in order.
"""

from __future__ import annotations

import asyncio
import os

import tornado.web
import tornado.websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import close_all, run_on_suite_loop, wait_until
from tornado_longconn.broadcast import BroadcastGroup
from tornado_longconn.codes import CloseCode
from tornado_longconn.testing import AppServer, WebSocketTestClient, scaled

N = 4  # connections per example

Op = tuple[str, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, N - 1)),
        st.tuples(st.just("leave"), st.integers(0, N - 1)),
        st.tuples(st.just("publish"), st.integers(-1, N - 1)),  # -1: exclude nobody
        st.tuples(st.just("client_close"), st.integers(0, N - 1)),
        st.tuples(st.just("vanish"), st.integers(0, N - 1)),
        st.tuples(st.just("server_close"), st.integers(0, N - 1)),
        st.tuples(st.just("group_close"), st.just(0)),
    ),
    max_size=30,
)


class Conn(tornado.websocket.WebSocketHandler):
    def initialize(self, opened: asyncio.Queue[Conn]) -> None:
        self.opened = opened

    def open(self) -> None:
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.opened.put_nowait(self)

    def on_close(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)


async def scenario(steps: list[Op]) -> None:
    opened: asyncio.Queue[Conn] = asyncio.Queue()
    group = BroadcastGroup("prop", close_spread=0.0)
    app = tornado.web.Application([(r"/ws", Conn, {"opened": opened})])
    async with AppServer(app) as server:
        clients: list[WebSocketTestClient] = []
        handlers: list[Conn] = []
        for _ in range(N):
            clients.append(await WebSocketTestClient.connect(server.ws_url("/ws")))
            handlers.append(await asyncio.wait_for(opened.get(), scaled(5)))
        alive = [True] * N
        members: set[int] = set()
        expected: list[list[str]] = [[] for _ in range(N)]
        published = delivered = 0
        group_closed = False

        async def gone(i: int) -> None:
            await asyncio.wait_for(handlers[i].gone, scaled(5))
            alive[i] = False
            members.discard(i)

        for n, (op, i) in enumerate(steps):
            if op == "join":
                await group.join(handlers[i])
                if group_closed and alive[i]:
                    await gone(i)  # a closed group closes late joiners (1001)
                    assert clients[i].close_code == CloseCode.GOING_AWAY
                elif alive[i]:
                    members.add(i)
            elif op == "leave":
                assert group.leave(handlers[i]) == (i in members)
                members.discard(i)
            elif op == "publish":
                text = f"m{n}"
                exclude = handlers[i] if i >= 0 else None
                result = await group.publish(text, exclude=exclude)
                targets = members - {i}
                assert result.delivered == len(targets)
                assert result.dropped == result.closed == 0
                for t in targets:
                    expected[t].append(text)
                published += 1
                delivered += len(targets)
            elif op in ("client_close", "vanish", "server_close"):
                if not alive[i]:
                    continue
                if op == "client_close":
                    await clients[i].close()
                elif op == "vanish":
                    clients[i].vanish()
                else:
                    handlers[i].close(1000, "bye")
                await gone(i)
                # Leaving on close happens before the handler's on_close runs.
                assert handlers[i] not in group
            elif op == "group_close":
                await group.close()
                group_closed = True
                for m in list(members):
                    await gone(m)
                    assert clients[m].close_code == CloseCode.GOING_AWAY
            assert set(group) == {handlers[m] for m in members}
            stats = group.stats()
            assert stats.members == len(group) == len(members)
            assert stats.joined - stats.left == stats.members
            assert stats.published == published
            assert stats.delivered == delivered

        for i in range(N):
            if alive[i]:
                assert await clients[i].recv_many(len(expected[i])) == expected[i]
                assert clients[i].pending_messages == 0
        await close_all(clients)
        await wait_until(lambda: len(group) == 0)


@settings(
    max_examples=int(os.environ.get("LONGCONN_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops)
def test_random_join_leave_publish_close_stay_consistent(steps: list[Op]) -> None:
    run_on_suite_loop(scenario(steps))
