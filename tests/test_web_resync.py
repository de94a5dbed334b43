"""Resyncs lose readers nothing: events that come while a snapshot is due or being fetched are held and
follow it, none twice; a model that resyncs for itself (a worker joins) costs readers no event; a real
break (gap, restart) hands readers the snapshot, what it folded counted in ``missed``."""

from __future__ import annotations

import signal
import time

import msgpack
import zmq

from client.state import ClusterState, StreamState, subscriber
from tests.harness import Harness
from tests.test_status import comparable


def _work(h: Harness, n: int) -> list[str]:
    """Submit ``n`` no-ops and run them all, on whichever workers they went to."""
    ids = [h.submit("noop") for _ in range(n)]
    while any(h.core.tasks[t].state.value in ("queued", "running") for t in ids):
        for wid in list(h.to_workers):
            for t in h.dispatched(wid):
                h.done(wid, t)
    return ids


def _live_state(h: Harness) -> tuple[ClusterState, int]:
    state = ClusterState(None, clock=lambda: h.now)
    state.load(h.core.snapshot(h.now))
    return state, len(h.events)


def _seqs(events) -> list[int]:
    return [fields["seq"] for _, fields in events]


def _outcomes(events, topic: str = "task.succeeded") -> int:
    return sum(1 for t, _ in events if t == topic)


def test_a_worker_joining_mid_flow_resyncs_the_model_and_readers_still_get_every_event_once():
    h = Harness()
    h.join(b"a", slots=2)
    state, start = _live_state(h)
    _work(h, 40)
    h.join(b"b", slots=1)  # the model cannot tell what a joining worker holds: it takes a snapshot
    _work(h, 40)
    snap = h.core.snapshot(h.now)  # the snapshot is taken here ...
    _work(h, 40)  # ... and these events come while it travels back
    events = h.events[start:]
    handed = [(t, f) for t, f in events if state.receive(t, f)]
    assert state.stale and state.broken is None
    handed += state.load(snap)
    assert _seqs(handed) == _seqs(events), "readers get every event once, in order"
    assert state.missed is None
    assert comparable(state.snapshot()) == comparable(h.core.snapshot(h.now))


def test_events_after_a_gap_that_come_while_the_snapshot_travels_follow_it_and_the_folded_are_counted():
    h = Harness()
    h.join(b"a", slots=2)
    state, start = _live_state(h)
    _work(h, 30)
    gap = len(h.events)
    _work(h, 30)
    snap_at, snap = len(h.events), h.core.snapshot(h.now)
    _work(h, 30)
    events = h.events[start:]
    lost = events[gap - start]  # what a SUB socket past its high-water mark drops
    handed = [(t, f) for t, f in events if f is not lost[1] and state.receive(t, f)]
    assert state.broken.startswith("gap") and state.gaps == 1
    assert _seqs(handed) == _seqs(events[:gap - start])
    after = state.load(snap)
    assert _seqs(after) == _seqs(h.events[snap_at:]), "held events past the snapshot follow it, none twice"
    folded = events[gap - start:snap_at - start]
    assert state.missed == {"succeeded": _outcomes(folded), "failed": 0, "cancelled": 0,
                            "submitted": _outcomes(folded, "task.submitted")}
    assert comparable(state.snapshot()) == comparable(h.core.snapshot(h.now))
    more = _work(h, 5)
    assert all(state.receive(t, f) for t, f in h.events[-3 * len(more):]), "and on from there"


def test_a_restarted_broker_s_events_are_held_until_its_snapshot_and_its_counts_are_missed_from_zero():
    old = Harness()
    old.join(b"a", slots=2)
    state, start = _live_state(old)
    _work(old, 20)
    assert all(state.receive(t, f) for t, f in old.events[start:])
    new = Harness()  # a fresh broker: seq starts again from 1
    new.join(b"a", slots=2)
    _work(new, 10)
    snap_at, snap = len(new.events), new.core.snapshot(new.now)
    _work(new, 10)
    assert not any(state.receive(t, f) for t, f in new.events)
    assert state.broken.startswith("broker restarted")
    after = state.load(snap)
    assert _seqs(after) == _seqs(new.events[snap_at:])
    assert state.missed == {"succeeded": 10, "failed": 0, "cancelled": 0}  # no "submitted": a journal replays
    assert state.restarts == 1
    assert comparable(state.snapshot()) == comparable(new.core.snapshot(new.now))



def test_a_restarted_broker_whose_seq_ran_past_the_old_one_is_told_by_its_boot():
    old = Harness()
    old.join(b"a", slots=2)
    state = ClusterState(None, clock=lambda: old.now)
    state.load(old.core.snapshot(old.now), boot="b1")
    _work(old, 5)
    assert all(state.receive(t, f) for t, f in old.events[-15:])
    new = Harness()  # published nothing until this subscriber was back: its first event seen is far ahead
    new.join(b"a", slots=2)
    _work(new, 30)
    snap = new.core.snapshot(new.now)
    assert not state.receive(*new.events[-1]) and state.broken.startswith("gap")
    assert state.load(snap, boot="b2") == []
    assert state.missed == {"succeeded": 30, "failed": 0, "cancelled": 0}  # not 30 - 5



def _published(messages: list) -> tuple[list, StreamState]:
    """What a live state reads of ``messages`` (lists of frames) sent through a real PUB/SUB pair."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind("inproc://events-under-test")
    sub = subscriber(ctx, "inproc://events-under-test")
    state = StreamState(model=False)
    state.load({"seq": 0, "workers": []})
    try:
        probe = [b"broker.stats", msgpack.packb({"seq": 0})]  # at the snapshot's seq: in it, handed to nobody
        deadline = time.monotonic() + 10
        while not sub.poll(50):  # a SUB joins asynchronously: until a probe gets through
            assert time.monotonic() < deadline, "the subscription never went live"
            pub.send_multipart(probe)
        for frames in messages:
            pub.send_multipart(frames)
        got = []
        while sub.poll(1000) and len(got) < len(messages):
            got += [fields["seq"] for _, events in state.read(sub) for fields in events]
        return got, state
    finally:
        sub.close(linger=0)
        pub.close(linger=0)
        ctx.term()


def _message(seq: int, *extra: bytes) -> list:
    return [b"task.submitted", msgpack.packb({"seq": seq, "ts": 1.0, "task_id": f"t{seq}", "name": "noop"}), *extra]


def test_a_message_of_one_part_costs_its_successor_and_a_snapshot_and_the_messages_after_it_read_whole():
    got, state = _published([_message(1), [b"task.submitted"], _message(2), _message(3), _message(4)])
    assert got == [1]  # 2 went with the malformed one; 3 is past a gap
    assert state.broken.startswith("gap")
    assert [f["seq"] for _, f in state.load({"seq": 2, "workers": []})] == [3, 4], "read in step again"


def test_a_message_of_three_parts_costs_its_successor_and_a_snapshot_and_the_messages_after_it_read_whole():
    got, state = _published([_message(1), _message(2, b"surplus"), _message(3), _message(4), _message(5)])
    assert got == [1, 2]
    assert state.broken.startswith("gap")
    assert [f["seq"] for _, f in state.load({"seq": 3, "workers": []})] == [4, 5]


# ==================================================================== real processes

from tests.conftest import wait_until  # noqa: E402
from tests.web_support import web_grid  # noqa: E402


def test_the_gateway_counts_every_task_and_keeps_no_stale_state_while_workers_join_mid_flow(tmp_path):
    """Each join makes the gateway's state resynchronise while events flow: nothing may be lost."""
    with web_grid(tmp_path) as grid:
        web = grid.web
        # /healthz answers once the broker does; the event stream is followed from its first snapshot on
        snapshots = wait_until(lambda: web.metric("gridq_web_snapshots_total"), 20, what="the gateway's first snapshot")
        futures = []
        with grid.client() as c:
            for wave in range(4):
                futures += [c.submit("square", i) for i in range(300)]
                grid.start_worker("--slots", "1", "--name", f"late{wave}")  # a join while those run
                wait_until(lambda: len(c.status()["workers"]) == wave + 2, 30, what="the worker to join")
            assert [f.result(timeout=120) for f in futures] == [i * i for i in range(300)] * 4
        n = len(futures)
        wait_until(lambda: web.metric("gridq_tasks_total", 'event="succeeded"') >= n, 30, what="every success counted")
        time.sleep(0.5)  # past a double count, had there been one
        assert web.metric("gridq_tasks_total", 'event="succeeded"') == n
        assert web.metric("gridq_tasks_total", 'event="submitted"') == n
        assert web.metric("gridq_tasks_total", 'event="started"') == n
        assert web.metric("gridq_web_snapshots_total") == snapshots, "joins resync the model, not the readers"
        states = _window(web)
        stale = {f.task_id: states.get(f.task_id) for f in futures if states.get(f.task_id) != "succeeded"}
        assert not stale, f"{len(stale)} tasks not succeeded in the window, e.g. {list(stale.items())[:5]}"


def _window(web) -> dict:
    """task id -> state, for every task in the gateway's window."""
    states: dict = {}
    cursor = None
    while True:
        page = web.get("/api/tasks", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
        states.update({t["task_id"]: t["state"] for t in page["tasks"]})
        cursor = page["next"]
        if cursor is None:
            return states


def test_the_gateway_counts_every_success_across_a_broker_restart_while_tasks_flow(tmp_path):
    """The new broker's events before the gateway's fresh snapshot are in it: counted from its counts."""
    with web_grid(tmp_path) as grid:
        web = grid.web
        snapshots = wait_until(lambda: web.metric("gridq_web_snapshots_total"), 20, what="the gateway's first snapshot")
        with grid.client() as c:
            assert [f.result(timeout=60) for f in [c.submit("square", i) for i in range(300)]] == \
                [i * i for i in range(300)]
        wait_until(lambda: web.metric("gridq_tasks_total", 'event="succeeded"') == 300, 30, what="the first 300")
        grid.kill(grid.broker, signal.SIGTERM)
        grid.start_broker()
        with grid.client() as c:  # submitted at once: they run as soon as the worker is back, events flowing
            futures = [c.submit("square", i) for i in range(900)]
            assert [f.result(timeout=120) for f in futures] == [i * i for i in range(900)]
        wait_until(lambda: web.metric("gridq_tasks_total", 'event="succeeded"') >= 1200, 30,
                   what="every success counted")
        time.sleep(0.5)  # past a double count, had there been one
        assert web.metric("gridq_tasks_total", 'event="succeeded"') == 1200
        assert web.metric("gridq_tasks_total", 'event="failed"') == 0
        assert web.metric("gridq_web_snapshots_total") > snapshots  # the restart's
        states = _window(web)  # a task whose first events are in the snapshot is not shown; none is stuck
        stale = {f.task_id: states[f.task_id] for f in futures if states.get(f.task_id, "succeeded") != "succeeded"}
        assert not stale, f"{len(stale)} tasks not succeeded in the window, e.g. {list(stale.items())[:5]}"
