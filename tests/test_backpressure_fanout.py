"""The broadcast fan-out's writer path (``_offer_all``) against ``send_nowait``, differentially.

``_offer_all`` serves two cases without calling the writer (a frame joining the
cork of this iteration, and a frame sent straight to an idle socket); both must
keep exactly the counters that :meth:`BackpressureWriter.send_nowait` keeps.
Two connections to a real server get the same hypothesis-generated operations,
one through each path; after every operation every counter must be equal, and
both clients must receive the same frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import tornado.web
import tornado.websocket
import websockets
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tornado_longconn._frames import encode_message
from tornado_longconn.backpressure import BackpressureWriter, OverflowPolicy, SendResult, _offer_all
from tornado_longconn.testing import AppServer, scaled


class Handler(tornado.websocket.WebSocketHandler):
    def initialize(
        self, writers: asyncio.Queue[BackpressureWriter], kwargs: dict[str, Any]
    ) -> None:
        self.writers = writers
        self.kwargs = kwargs

    def open(self) -> None:
        self.writers.put_nowait(BackpressureWriter(self, **self.kwargs))


#: Message payload sizes; a negative number is one event-loop iteration instead.
ops_strategy = st.lists(st.integers(min_value=-300, max_value=3000), min_size=1, max_size=30)


async def run_twins(ops: list[int], high_water: int) -> None:
    writers: asyncio.Queue[BackpressureWriter] = asyncio.Queue()
    kwargs = {"high_water": high_water, "policy": OverflowPolicy.DROP_OLDEST}
    app = tornado.web.Application([("/ws", Handler, {"writers": writers, "kwargs": kwargs})])
    async with (
        AppServer(app) as server,
        websockets.connect(server.ws_url("/ws"), compression=None) as client_a,
        websockets.connect(server.ws_url("/ws"), compression=None) as client_b,
    ):
        fanout = await asyncio.wait_for(writers.get(), scaled(5))
        direct = await asyncio.wait_for(writers.get(), scaled(5))
        sent: list[bytes] = []
        for n in ops:
            if n < 0:
                await asyncio.sleep(0)  # one loop iteration: the flusher runs
                continue
            payload = len(sent).to_bytes(4, "big") + b"x" * n
            sent.append(payload)
            encoded = encode_message(payload)
            results: list[SendResult] = []
            _offer_all((fanout,), encoded, results)
            assert results == [direct.send_nowait(encoded)]
            assert dataclasses.asdict(fanout.stats()) == dataclasses.asdict(direct.stats())
        await fanout.drained()
        await direct.drained()
        assert dataclasses.asdict(fanout.stats()) == dataclasses.asdict(direct.stats())
        for client in (client_a, client_b):
            got = [await asyncio.wait_for(client.recv(), scaled(5)) for _ in sent]
            assert got == sent


@settings(max_examples=40, deadline=None)
@given(ops=ops_strategy, high_water=st.sampled_from([1 << 20, 4096, 1500, 64]))
@example(ops=[1000, 1000, 1000, 1000, -1, 10, 10], high_water=1500)  # a corked frame flushes now
@example(ops=[10, 500, 984, 10], high_water=1500)  # the cork one byte below high water: kept
@example(ops=[10, 500, 985, 10], high_water=1500)  # one byte above: flushed at once
@example(ops=[10, 10, 70_000, 10, -1, 10], high_water=1 << 20)  # a large frame is never corked
def test_fan_out_path_keeps_the_counters_of_send_nowait(ops: list[int], high_water: int) -> None:
    asyncio.run(run_twins(ops, high_water))
