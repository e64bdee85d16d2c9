"""The broadcast group's I/O-free core against ``TopicLog``, without sockets or an event loop.

The property test drives a :class:`GroupCore` and a :class:`TopicLog` (the
reference history) through thousands of random operations: publish, join live,
join with a cursor (current, old, evicted, future or another epoch), leave,
history reads that come back later (the shell's ``await backend.since``, with
publishes in between), history trimmed, the epoch changed, the backend reporting
a gap. Every delivery to a member is checked as it happens: each message is the
one right after the previous one (or after the member's cursor, or after the head
named by a resync answer): no gap and no duplicate, at the seam or anywhere.
At the end every member still joined has every message up to the log's head.
"""

from __future__ import annotations

import doctest
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tornado_longconn import _groupcore, log
from tornado_longconn._groupcore import GapPolicy, GroupCore, MemberSlot, MemberState
from tornado_longconn.log import Cursor, HistoryLimit, Message, SinceResult, TopicLog

KEYS = 5


class Slot(MemberSlot[int]):
    __slots__ = ("serial",)

    def __init__(self, serial: int) -> None:
        super().__init__()
        self.serial = serial


@dataclass
class Stream:
    """What one member (one join) was given, checked item by item."""

    after: Cursor  # the message delivered next must directly follow this
    items: list[Message | str] = field(default_factory=list)
    closed: bool = False


Core = GroupCore[int, Slot, int]


class Model:
    def __init__(self, policy: GapPolicy, history: int, buffer_limit: int, page: int) -> None:
        self.policy = policy
        self.page = page
        self.epoch_no = 0
        self.log = TopicLog("t", HistoryLimit(max_messages=history), epoch="e0")
        self.core: Core = GroupCore(policy, buffer_limit=buffer_limit)
        self.slots: dict[int, Slot] = {}
        self.streams: dict[int, Stream] = {}
        self.pending: dict[int, tuple[SinceResult, str | None]] = {}
        self.serial = 0
        self.published = 0
        self.resyncs = 0
        self.went_live_from_history = 0
        self.rereads = 0
        # Whether the group is subscribed to the backend: from its first history
        # read or live join until it has no members. Before that, messages of other
        # processes do not reach it ("unseen").
        self.subscribed = False

    # ------------------------------------------------------------------ deliveries

    def deliver(self, slot: Slot, message: Message) -> None:
        stream = self.streams[slot.serial]
        assert not stream.closed, "delivered after a close answer"
        assert message.cursor is not None
        assert message.cursor.follows(stream.after), (
            f"member {slot.serial}: got {message.cursor} after {stream.after}"
        )
        stream.after = message.cursor
        stream.items.append(message)

    def resync(self, slot: Slot, head: Cursor, *, closes: bool) -> None:
        stream = self.streams[slot.serial]
        assert not stream.closed
        stream.items.append(f"resync {head}")
        stream.after = head
        stream.closed = closes
        self.resyncs += 1

    # ------------------------------------------------------------------ operations

    def publish(self) -> None:
        self.published += 1
        message = self.log.append(f"m{self.published}", now=0.0)
        self.core.offer(message, self.published)
        for slot in self.core.live():
            self.deliver(slot, message)

    def publish_unseen(self) -> None:
        """A message the group does not receive live (published before it subscribed).

        Only while the group is not subscribed: once it is, the backend delivers
        every message after what ``since()`` returned (its contract).
        """
        if self.subscribed:
            return
        self.published += 1
        self.log.append(f"m{self.published}", now=0.0)

    def join(self, key: int, cursor: Cursor | None) -> None:
        if key in self.core:
            return
        self.serial += 1
        slot = Slot(self.serial)
        self.core.add(key, slot, cursor=cursor)
        self.subscribed |= cursor is None
        self.slots[key] = slot
        self.streams[slot.serial] = Stream(cursor if cursor is not None else self.log.head)
        assert slot.state is (MemberState.LIVE if cursor is None else MemberState.REPLAYING)

    def leave(self, key: int) -> None:
        slot = self.core.leave(key)
        assert (slot is None) == (key not in self.slots)
        if slot is not None:
            assert slot.state is MemberState.LEFT and slot is self.slots.pop(key)
            self.pending.pop(key, None)
            self.subscribed &= bool(self.slots)

    def fetch(self, key: int) -> None:
        """The shell asks the backend for history; the answer arrives at ``apply``."""
        slot = self.slots.get(key)
        if slot is None or slot.state not in (MemberState.REPLAYING, MemberState.REREAD):
            return
        if key in self.pending:
            return
        position = slot.position
        assert position is not None
        self.subscribed = True
        log_ = self.log
        result = log_.since(position, now=0.0, limit=self.page)  # evicts per the limit first
        # The reference: is the message after ``position`` still kept?
        if position.epoch != log_.epoch:
            why: str | None = "epoch"
        elif position.offset > log_.head.offset:
            why = "future"
        elif position.offset < log_.head.offset and position.offset + 1 < log_.first_offset:
            why = "evicted"
        else:
            why = None
        assert result.gap == (why is not None) and result.reason == why
        self.pending[key] = (result, why)

    def apply(self, key: int) -> None:
        """The history answer arrived: deliver it, and go live when the seam closes."""
        if key not in self.pending:
            return
        result, why = self.pending.pop(key)
        slot = self.slots[key]
        replay = self.core.history(key, result, page_size=self.page)
        if replay.resync is not None:
            assert why is not None and replay.resync.reason == why
            assert replay.resync.members == (slot,) and replay.resync.policy is self.policy
            # Another epoch: continue from the new epoch's start (everything it holds
            # follows), not from its head.
            head = result.cursor
            if why == "epoch" and head.offset > 0:
                head = Cursor(head.epoch, 0)
            assert replay.resync.head == head
            closes = not replay.resync.keeps_members
            self.resync(slot, head, closes=closes)
            if closes:
                self.leave(key)
                return
        else:
            assert why is None
        for message in replay.messages:
            self.deliver(slot, message)
        if replay.more:
            epoch_restart = replay.resync is not None and replay.resync.reason == "epoch"
            assert len(replay.messages) == self.page or epoch_restart
            return
        entries = self.core.go_live(key)
        if entries is None:
            assert slot.state is MemberState.REPLAYING
            self.rereads += 1
            return
        assert slot.state is MemberState.LIVE and slot in self.core.live()
        self.went_live_from_history += 1
        for message, serial in entries:
            assert message.data == f"m{serial}"
            self.deliver(slot, message)

    def trim(self, keep: int) -> None:
        self.log.limit = HistoryLimit(max_messages=keep)

    def restart(self) -> None:
        """History lost and restarted (a new epoch) unreported, while the group is not subscribed.

        Once subscribed, the backend reports a lost history (``backend_gap``).
        """
        if self.subscribed:
            return
        self.epoch_no += 1
        self.log = TopicLog("t", self.log.limit, epoch=f"e{self.epoch_no}")

    def backend_gap(self, *, new_epoch: bool) -> None:
        if new_epoch:
            self.epoch_no += 1
            self.log = TopicLog("t", self.log.limit, epoch=f"e{self.epoch_no}")
        head = self.log.head
        resync = self.core.backend_gap("epoch" if new_epoch else "lost")
        assert resync.head is None and set(resync.members) == set(self.core.live())
        for slot in resync.members:
            self.resync(slot, head, closes=not resync.keeps_members)
        if not resync.keeps_members:
            for key, slot in list(self.slots.items()):
                if slot in resync.members:
                    self.leave(key)
        for slot in self.slots.values():
            assert slot.state is not MemberState.REPLAYING  # replaying members re-read

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        core = self.core
        assert set(core) == set(self.slots) and len(core) == len(self.slots)
        live = core.live()
        assert live == tuple(s for s in self.slots.values() if s.state is MemberState.LIVE)
        assert core.resuming == len(self.slots) - len(live)
        for key, slot in self.slots.items():
            assert core.get(key) is slot and slot.state is not MemberState.LEFT
            assert slot.buffered <= core.buffer_limit

    def drain(self) -> None:
        """Let every replay finish (nothing published meanwhile), then check completeness."""
        for _ in range(10_000):
            replaying = [k for k, s in self.slots.items() if s.state is not MemberState.LIVE]
            if not replaying:
                break
            for key in replaying:
                self.fetch(key)
                self.apply(key)
        else:
            raise AssertionError("replays did not finish")
        self.publish()
        head = self.log.head
        for slot in self.slots.values():
            assert slot.state is MemberState.LIVE
            assert self.streams[slot.serial].after == head  # every message up to the head


def cursor_for(model: Model, kind: int, back: int) -> Cursor:
    head = model.log.head
    if kind == 0:  # behind the head by ``back`` (maybe evicted)
        return Cursor(head.epoch, max(0, head.offset - back))
    if kind == 1:  # at the head
        return head
    if kind == 2:  # ahead of the head
        return Cursor(head.epoch, head.offset + 1 + back)
    return Cursor("elsewhere", back)  # another epoch


op = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("unseen"), st.just(0), st.just(0)),
    st.tuples(st.just("restart"), st.just(0), st.just(0)),
    st.tuples(st.just("join"), st.integers(0, KEYS - 1), st.just(-1)),
    st.tuples(st.just("join"), st.integers(0, KEYS - 1), st.integers(0, 3) | st.just(0)),
    st.tuples(st.just("leave"), st.integers(0, KEYS - 1), st.just(0)),
    st.tuples(st.just("fetch"), st.integers(0, KEYS - 1), st.just(0)),
    st.tuples(st.just("apply"), st.integers(0, KEYS - 1), st.just(0)),
    st.tuples(st.just("step"), st.integers(0, KEYS - 1), st.just(0)),
    st.tuples(st.just("trim"), st.integers(1, 6), st.just(0)),
    st.tuples(st.just("gap"), st.booleans().map(int), st.just(0)),
)


def run(model: Model, steps: list[tuple[str, int, int]], backs: list[int]) -> None:
    for n, (name, a, b) in enumerate(steps):
        if name == "publish":
            for _ in range(a):
                model.publish()
        elif name == "unseen":
            model.publish_unseen()
        elif name == "restart":
            model.restart()
        elif name == "join":
            cursor = None if b < 0 else cursor_for(model, b, backs[n % len(backs)])
            model.join(a, cursor)
        elif name == "leave":
            model.leave(a)
        elif name == "fetch":
            model.fetch(a)
        elif name == "apply":
            model.apply(a)
        elif name == "step":
            model.fetch(a)
            model.apply(a)
        elif name == "trim":
            model.trim(a)
        else:
            model.backend_gap(new_epoch=bool(a))
        model.check()
    model.drain()
    model.check()


@settings(
    max_examples=int(os.environ.get("LONGCONN_HYPOTHESIS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    policy=st.sampled_from(GapPolicy),
    history=st.integers(1, 12),
    buffer_limit=st.integers(1, 8),
    page=st.integers(1, 5),
    steps=st.lists(op, min_size=100, max_size=400),
    backs=st.lists(st.integers(0, 15), min_size=1, max_size=8),
)
def test_every_member_gets_the_log_after_its_cursor_without_gap_or_duplicate(
    policy: GapPolicy,
    history: int,
    buffer_limit: int,
    page: int,
    steps: list[tuple[str, int, int]],
    backs: list[int],
) -> None:
    run(Model(policy, history, buffer_limit, page), steps, backs)


@pytest.mark.parametrize("policy", list(GapPolicy))
def test_a_long_random_run_exercises_every_path(policy: GapPolicy) -> None:
    # One seeded run of 20,000 operations; the counters show that the seam, the
    # resync answers and the re-reads were all exercised (the checks are the model's).
    import random

    rng = random.Random(20261204)
    names = ["publish", "unseen", "join", "join", "leave", "fetch", "apply", "step", "trim", "gap"]
    names += ["publish", "step", "restart"]
    steps: list[tuple[str, int, int]] = []
    for _ in range(20_000):
        name = rng.choice(names)
        if name == "publish":
            steps.append((name, rng.randint(1, 4), 0))
        elif name == "join":
            steps.append((name, rng.randrange(KEYS), rng.choice([-1, 0, 0, 1, 2, 3])))
        elif name == "trim":
            steps.append((name, rng.randint(1, 12), 0))
        elif name in ("unseen", "restart"):
            steps.append((name, 0, 0))
        elif name == "gap" and rng.random() < 0.2:  # 2% of the operations
            steps.append((name, int(rng.random() < 0.3), 0))
        else:
            steps.append(("step" if name == "gap" else name, rng.randrange(KEYS), 0))
    model = Model(policy, history=8, buffer_limit=4, page=3)
    run(model, steps, [rng.randint(0, 15) for _ in range(50)])

    assert model.published > 4_000
    assert model.went_live_from_history > 100
    assert model.resyncs > 50
    assert model.rereads > 20


def state_of(slot: Slot) -> MemberState:
    return slot.state  # read through a call: mypy would keep an earlier check narrowed


def make(policy: GapPolicy = GapPolicy.NOTICE, *, limit: int = 5) -> tuple[TopicLog, Core]:
    return TopicLog("t", HistoryLimit(max_messages=limit), epoch="e"), GroupCore(
        policy, buffer_limit=limit
    )


def test_seam_drops_what_history_already_gave() -> None:
    topic, core = make()
    for text in "ab":
        topic.append(text, now=0.0)
    slot = Slot(1)
    core.add(0, slot, cursor=Cursor("e", 0))
    answer = topic.since(slot.position, now=0.0)
    late = topic.append("c", now=0.0)  # published after the read, before it came back
    core.offer(late, 3)
    replay = core.history(0, answer, page_size=10)
    assert [m.data for m in replay.messages] == ["a", "b"] and not replay.more
    assert [m.data for m, _ in core.go_live(0) or []] == ["c"]
    # And when the read already included the buffered message, it is not repeated.
    slot2 = Slot(2)
    core.add(1, slot2, cursor=Cursor("e", 1))
    core.offer(d := topic.append("d", now=0.0), 4)
    replay = core.history(1, topic.since(slot2.position, now=0.0), page_size=10)
    assert [m.data for m in replay.messages] == ["b", "c", "d"]
    assert core.go_live(1) == [] and slot2.state is MemberState.LIVE
    assert d.cursor == Cursor("e", 4)


def test_a_message_missing_between_history_and_buffer_means_read_again() -> None:
    # Defensive: a backend that breaks its contract (a live message arrives that
    # the history read missed, with one in between lost) must not make a gap.
    topic, core = make()
    slot = Slot(1)
    core.add(0, slot, cursor=Cursor("e", 0))
    answer = topic.since(slot.position, now=0.0)  # empty: nothing published yet
    topic.append("a", now=0.0)  # published while the group was not yet subscribed
    core.offer(topic.append("b", now=0.0), 2)
    core.history(0, answer, page_size=10)
    assert core.go_live(0) is None and slot.state is MemberState.REPLAYING
    replay = core.history(0, topic.since(slot.position, now=0.0), page_size=10)
    assert [m.data for m in replay.messages] == ["a", "b"]
    assert core.go_live(0) == []


def test_overflow_while_replaying_rereads_history() -> None:
    topic, core = make(limit=2)
    slot = Slot(1)
    core.add(0, slot, cursor=Cursor("e", 0))
    for i in range(3):
        core.offer(topic.append(str(i), now=0.0), i)
    assert slot.state is MemberState.REREAD and slot.buffered == 0
    core.offer(topic.append("x", now=0.0), 9)  # not buffered while REREAD
    assert slot.buffered == 0
    core.history(0, SinceResult((), Cursor("e", 0)), page_size=10)
    assert core.go_live(0) is None and state_of(slot) is MemberState.REPLAYING


@pytest.mark.parametrize("policy", list(GapPolicy))
def test_gap_answers_follow_the_policy(policy: GapPolicy) -> None:
    topic, core = make(policy, limit=2)
    for i in range(5):
        topic.append(str(i), now=0.0)
    slot = Slot(1)
    core.add(0, slot, cursor=Cursor("e", 1))
    replay = core.history(0, topic.since(slot.position, now=0.0), page_size=10)
    assert replay.resync is not None and replay.resync.reason == "evicted"
    assert replay.resync.head == topic.head and replay.messages == ()
    assert replay.resync.keeps_members is (policy is GapPolicy.NOTICE)
    if policy is GapPolicy.NOTICE:
        assert slot.position == topic.head  # continues after the head it was told
        assert core.go_live(0) == []
    else:
        assert slot.position == Cursor("e", 1)  # the caller closes it and leaves


def test_add_twice_and_leave_unknown() -> None:
    _, core = make()
    core.add(0, Slot(1))
    with pytest.raises(ValueError, match="already a member"):
        core.add(0, Slot(2))
    assert core.leave(7) is None
    with pytest.raises(ValueError, match="buffer_limit"):
        GroupCore(GapPolicy.CLOSE, buffer_limit=0)


def test_live_tuple_is_reused_until_membership_changes() -> None:
    _, core = make()
    core.add(0, Slot(1))
    first = core.live()
    assert core.live() is first
    core.add(1, Slot(2), cursor=Cursor("e", 0))  # replaying: not live, same tuple
    assert core.live() is first
    core.add(2, Slot(3))
    assert core.live() is not first and len(core.live()) == 2


@pytest.mark.parametrize("module", [_groupcore, log])
def test_doctests(module: object) -> None:
    failures, tried = doctest.testmod(module)  # type: ignore[arg-type]
    assert tried and not failures


@pytest.mark.parametrize("policy", list(GapPolicy))
def test_another_epoch_continues_from_the_new_epochs_start(policy: GapPolicy) -> None:
    """A cursor of a lost history: the member gets everything the new epoch holds."""
    topic, core = make(policy, limit=10)
    for i in range(3):
        topic.append(str(i), now=0.0)
    slot = Slot(1)
    core.add(0, slot, cursor=Cursor("old", 7))
    replay = core.history(0, topic.since(slot.position, now=0.0), page_size=10)
    assert replay.resync is not None and replay.resync.reason == "epoch"
    assert replay.resync.head == Cursor("e", 0) and replay.messages == ()
    if policy is GapPolicy.CLOSE:
        assert not replay.more  # the caller closes it with 4001
        return
    assert replay.more and slot.position == Cursor("e", 0)
    page = core.history(0, topic.since(slot.position, now=0.0), page_size=10)
    assert [m.data for m in page.messages] == ["0", "1", "2"] and page.resync is None
    assert core.go_live(0) == [] and slot.state is MemberState.LIVE


def test_another_epoch_with_no_messages_goes_live_at_once() -> None:
    topic, core = make(GapPolicy.NOTICE, limit=10)
    slot = Slot(1)
    core.add(0, slot, cursor=Cursor("old", 7))
    replay = core.history(0, topic.since(slot.position, now=0.0), page_size=10)
    assert replay.resync is not None and replay.resync.head == Cursor("e", 0)
    assert not replay.more and core.go_live(0) == []
