"""Live status: event fields, snapshot + events (the Clone pattern) = the broker's state, gaps, restarts."""

from __future__ import annotations

from broker.protocol import Command, Message
from tests.harness import ALL_TASKS, Harness

# ==================================================================== events and snapshots of the pure core

SPEC_FIELDS = {
    "task.submitted": {"task_id", "name", "resources", "priority"},
    "task.started": {"task_id", "name", "worker", "attempt"},
    "task.succeeded": {"task_id", "name", "worker", "run_s"},
    "task.failed": {"task_id", "name", "worker", "error"},
    "task.retried": {"task_id", "name", "reason"},
    "task.cancelled": {"task_id", "name"},
    "worker.joined": {"worker", "resources", "slots", "tasks"},
    "worker.lost": {"worker", "requeued"},
    "worker.left": {"worker"},
    "broker.stats": {"queued", "running", "workers", "done", "failed", "rate"},
}


def _every_topic(h: Harness) -> None:
    """Drive a core through every event topic."""
    h.join(b"w1", slots=2)
    ok, bad = h.submit("square", 3), h.submit("square", 4)
    h.submit("noop", task_id="queued-then-cancelled")  # both slots are taken
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 1, "session": "s1", "ids": ["queued-then-cancelled"]}), h.now)
    h.flush()
    h.done(b"w1", ok, 9)
    h.done(b"w1", bad, ok=False)
    back = h.submit("noop")
    h.core.on_worker(b"w1", Message(Command.RETURN, {"ids": [back]}), h.now)
    h.flush()
    h.join(b"w2")
    h.core.on_worker(b"w2", Message(Command.DISCONNECT, {}), h.now)
    h.flush()
    h.tick(h.core.heartbeat_s * h.core.liveness + 1)  # w1 goes silent: lost


def test_every_topic_carries_the_fields_the_spec_lists():
    h = Harness()
    _every_topic(h)
    seen = {}
    for topic, fields in h.events:
        seen.setdefault(topic, fields)
        assert SPEC_FIELDS[topic] | {"seq", "ts"} <= set(fields), (topic, fields)
    assert set(seen) == set(SPEC_FIELDS)


def test_task_events_carry_the_resources_a_subscriber_needs_to_keep_free_capacity_exact():
    h = Harness()
    h.join(b"w1", slots=2, resources={"gpu": 1})
    t = h.submit("noop", resources={"cpu": 1, "gpu": 1})
    h.dispatched(b"w1")
    assert h.topics("task.started")[0]["resources"] == {"cpu": 1, "gpu": 1}
    h.done(b"w1", t, ok=False)
    failed = h.topics("task.failed")[0]
    assert failed["error_type"] == "ValueError" and failed["error"] == "ValueError: boom"
    assert failed["resources"] == {"cpu": 1, "gpu": 1}
    h.submit("noop", task_id="c", resources={"cpu": 1, "gpu": 2})  # waits: more GPUs than offered
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 1, "session": "s1", "ids": ["c"]}), h.now)
    h.flush()
    assert h.topics("task.cancelled")[0]["resources"] == {"cpu": 1, "gpu": 2}


def test_a_snapshot_does_not_change_when_the_broker_moves_on_before_sending_it():
    h = Harness()
    h.join(b"w1", slots=2)
    snap = h.core.snapshot(h.now)
    h.submit("noop")  # dispatch takes a slot: the snapshot taken before must not see it
    assert snap["workers"][0]["free"] == {"cpu": 2} and snap["workers"][0]["running"] == 0
    assert h.core.snapshot(h.now)["workers"][0]["free"] == {"cpu": 1}


def test_a_snapshot_lists_running_tasks_with_the_resources_they_hold():
    h = Harness()
    h.join(b"w1", slots=2)
    t = h.submit("noop", resources={"cpu": 2})
    h.now += 1.5
    [row] = h.core.snapshot(h.now)["running_tasks"]
    assert row == {"task_id": t, "name": "noop", "worker": "w1", "attempt": 1, "resources": {"cpu": 2}, "running_s": 1.5}


def test_worker_lost_lists_as_requeued_only_the_tasks_that_were_queued_again():
    h = Harness()
    h.join(b"w1", slots=2)
    once, never = h.submit("noop", retries=1), h.submit("noop", retries=0)
    h.dispatched(b"w1")
    h.tick(h.core.heartbeat_s * h.core.liveness + 1)
    assert h.topics("worker.lost")[0]["requeued"] == [once]
    assert [f["task_id"] for f in h.topics("task.failed")] == [never]


def test_tasks_sent_ahead_to_a_busy_worker_still_count_in_the_queues_until_they_start():
    h = Harness()
    h.join(b"w1")
    first = h.submit("noop")
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": [[first, True, b"\xc0", 0, 0.001]]}), h.now)  # noop is short
    h.flush()
    ids = [h.submit("noop") for _ in range(3)]
    assert h.core.tasks[ids[1]].state.value == "dispatched"  # sent ahead: the worker's one slot is taken
    snap = h.core.snapshot(h.now)
    assert snap["queued"] == 2 and snap["queues"] == {"cpu": 2}
    h.core._last_stats_at = None
    h.tick(0)
    assert h.topics("broker.stats")[-1]["queues"] == {"cpu": 2}


def test_broker_stats_reports_each_worker_s_load_and_heartbeat_age():
    h = Harness()
    h.join(b"w1", slots=2)
    h.submit("noop")
    h.tick(0.5)
    stats = h.topics("broker.stats")[-1]
    assert stats["per_worker"] == {"w1": {"running": 1, "tasks": 0, "state": "ready", "heartbeat_age_s": 0.5}}
    assert ALL_TASKS  # the harness announces the built-in names


# ==================================================================== ClusterState against the pure core

import random  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from client.state import ClusterState, Link  # noqa: E402


def comparable(snap: dict) -> dict:
    """A snapshot without what only says how old it is, workers and running tasks in name order."""
    workers = sorted(({k: v for k, v in w.items() if k != "heartbeat_age_s"} for w in snap["workers"]),
                     key=lambda w: w["name"])
    running = sorted(({k: v for k, v in t.items() if k != "running_s"} for t in snap.get("running_tasks", ())),
                     key=lambda t: t["task_id"])
    return {**{k: v for k, v in snap.items() if k not in ("workers", "running_tasks")},
            "workers": workers, "running_tasks": running}


class Mirror:
    """A ClusterState fed a pure core's events; it re-snapshots from the core whenever it distrusts them."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.reasons: list[str] = []
        self.state = ClusterState(self, clock=lambda: h.now)
        self.state.load(h.core.snapshot(h.now))
        self.fed = len(h.events)

    def status(self) -> dict:  # what ClusterState asks its client for
        return self.h.core.snapshot(self.h.now)

    def catch_up(self, drop=lambda seq: False) -> None:
        for topic, fields in self.h.events[self.fed:]:
            if drop(fields["seq"]):
                continue
            self.state.receive(topic, fields)
            if self.state.stale:
                self.reasons.append(self.state.reason)
                assert self.state.resync()
        self.fed = len(self.h.events)

    def check(self) -> None:
        self.h.core._last_stats_at = None  # a broker.stats now: the state checks itself against it
        self.h.tick(0)
        self.catch_up()
        assert comparable(self.state.snapshot()) == comparable(self.h.core.snapshot(self.h.now))


OPS = ("join", "submit", "submit_gpu", "submit_unservable", "submit_timeout", "done", "fail", "hand_back", "drain",
       "leave", "cancel", "silence", "tick", "late_result", "report_start")


def _finish(h: Harness, wid: bytes, task_id: str, ok: bool) -> None:
    """A result that took 1 ms: short enough that the broker starts sending tasks of its name ahead."""
    value = b"\xc0" if ok else {"type": "ValueError", "message": "boom", "traceback": ""}
    h.core.on_worker(wid, Message(Command.DONE, {"log": [[task_id, ok, value, 0, 0.001]]}), h.now)
    h.flush()


def _run_ops(ops: list, seed: int) -> Mirror:
    rnd = random.Random(seed)
    h = Harness(no_worker_timeout_s=2.0)
    m = Mirror(h)
    names = iter(f"w{i}".encode() for i in range(1000))
    held: dict[bytes, list] = {}  # worker -> task ids it was sent
    timed_out: dict[bytes, list] = {}
    queued_ids: list = []

    def dispatched():
        for wid in list(h.to_workers):
            if wid in h.core.workers:
                held.setdefault(wid, []).extend(h.dispatched(wid))
            else:
                h.to_workers.pop(wid)

    for op in ops:
        live = [w for w in h.core.workers]
        if op == "join" or not live:
            wid = next(names)
            resources = {"gpu": 1} if rnd.random() < 0.5 else {}
            h.join(wid, slots=rnd.randint(1, 3), resources=resources)
        elif op.startswith("submit"):
            resources = {"submit_gpu": {"cpu": 1, "gpu": 1}, "submit_unservable": {"tpu": 1}}.get(op)
            for _ in range(rnd.randint(1, 4)):
                queued_ids.append(h.submit("noop", resources=resources, priority=rnd.randint(0, 2),
                                           timeout_s=0.5 if op == "submit_timeout" else None,
                                           retries=rnd.randint(0, 1)))
        elif op in ("done", "fail", "hand_back"):
            wid = rnd.choice(live)
            ids = [t for t in held.get(wid, []) if h.core.tasks.get(t) and h.core.tasks[t].worker == wid
                   and h.core.tasks[t].state.value in ("running", "dispatched")]
            if ids:
                t = rnd.choice(ids)
                held[wid].remove(t)
                if op == "hand_back":
                    h.core.on_worker(wid, Message(Command.RETURN, {"ids": [t]}), h.now)
                    h.flush()
                else:
                    _finish(h, wid, t, ok=op == "done")
        elif op == "report_start":  # a worker starts a task it was sent ahead
            wid = rnd.choice(live)
            ahead = list(h.core.workers[wid].ahead)
            if ahead:
                h.core.on_worker(wid, Message(Command.DONE, {"log": [ahead[0]]}), h.now)
                h.flush()
        elif op == "drain":
            wid = rnd.choice(live)
            h.core.on_worker(wid, Message(Command.RETURN, {"draining": True, "ids": []}), h.now)
            h.flush()
        elif op == "leave":
            wid = rnd.choice(live)
            h.core.on_worker(wid, Message(Command.RETURN, {"ids": held.pop(wid, [])}), h.now)
            h.core.on_worker(wid, Message(Command.DISCONNECT, {}), h.now)
            h.flush()
        elif op == "cancel" and queued_ids:
            t = rnd.choice(queued_ids)
            h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 1, "session": "s1", "ids": [t]}), h.now)
            h.flush()
        elif op == "silence":  # one worker stops talking; the others keep heartbeating
            quiet = rnd.choice(live)
            for _ in range(int(h.core.heartbeat_s * h.core.liveness / 0.5) + 2):
                for wid in list(h.core.workers):
                    if wid != quiet:
                        h.core.on_worker(wid, Message(Command.HEARTBEAT, {}), h.now)
                h.tick(0.5)
        elif op == "tick":
            for wid in list(h.core.workers):
                h.core.on_worker(wid, Message(Command.HEARTBEAT, {}), h.now)
            h.tick(rnd.choice((0.1, 0.6, 2.5)))
            for wid, ids in held.items():  # whatever timed out stays held by its worker
                timed_out.setdefault(wid, []).extend(
                    t for t in ids if h.core.tasks.get(t) and h.core.tasks[t].state.value == "failed")
        elif op == "late_result":
            for wid, ids in timed_out.items():
                if ids and wid in h.core.workers:
                    _finish(h, wid, ids.pop(), ok=True)
                    break
        dispatched()
        m.check()
    return m


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(OPS), min_size=5, max_size=60), st.integers(0, 2**16))
def test_snapshot_plus_events_equals_the_core_s_own_snapshot_after_any_sequence(ops, seed):
    m = _run_ops(ops, seed)
    # the stream itself is trusted: snapshots are retaken only where no event can tell what changed
    for reason in m.reasons:
        assert reason.startswith(("worker ", "broker.stats disagrees about worker")), reason


def test_a_busy_run_is_mirrored_without_any_resnapshot():
    h = Harness()
    m = Mirror(h)
    h.join(b"a", slots=3)
    h.join(b"b", slots=2, resources={"gpu": 1})
    m.catch_up()
    before = m.state.resyncs
    ids = [h.submit("noop", resources={"cpu": 1, "gpu": 1} if i % 7 == 0 else None, priority=i % 3)
           for i in range(300)]
    rnd = random.Random(1)
    while any(h.core.tasks[t].state.value in ("queued", "running") for t in ids):
        for wid in (b"a", b"b"):
            for t in h.dispatched(wid):
                h.done(wid, t, ok=rnd.random() < 0.9)
        m.check()
    assert m.state.resyncs == before
    assert m.state.counts["done"] + m.state.counts["failed"] == 300
    assert len(m.state.failures) == min(m.state.counts["failed"], 50)


def test_a_dropped_event_is_a_gap_and_the_state_resnapshots():
    h = Harness()
    h.join(b"a", slots=2)
    m = Mirror(h)
    for _ in range(20):
        h.submit("noop")
    lost = m.state.seq + 3
    m.catch_up(drop=lambda seq: seq == lost)
    assert m.state.gaps == 1 and any(r.startswith("gap") for r in m.reasons)
    m.check()


def test_a_broker_restart_is_seen_as_seq_going_back_and_the_state_resnapshots():
    h = Harness()
    h.join(b"a", slots=2)
    for _ in range(5):
        h.submit("noop")
    m = Mirror(h)
    h.submit("noop")
    m.catch_up()
    restarted = Harness()  # a fresh broker: seq starts again from 1
    restarted.join(b"a", slots=2)
    m.h, m.fed = restarted, 0
    m.catch_up()
    assert m.state.restarts == 1 and m.state.seq == restarted.core.seq
    m.check()


def test_events_before_the_first_snapshot_or_already_in_it_are_not_applied_twice():
    h = Harness()
    h.join(b"a", slots=2)
    state = ClusterState(None, clock=lambda: h.now)
    assert not state.receive(*h.events[-1])  # nothing to apply them to yet
    h.submit("noop")
    state.load(h.core.snapshot(h.now))
    for topic, fields in h.events:  # buffered while the snapshot was taken
        state.receive(topic, fields)
    assert comparable(state.snapshot()) == comparable(h.core.snapshot(h.now))
    assert state.link is Link.LIVE and state.resyncs == 1


# ==================================================================== real processes

from concurrent.futures import wait as wait_futures  # noqa: E402

from client import Client  # noqa: E402
from tests.conftest import wait_until  # noqa: E402


def _quick_client(cluster) -> Client:
    """A client that gives up on a dead broker within about a second."""
    return Client(cluster.frontend, timeout=0.5, retries=1)


def _settle(futures, timeout: float = 120.0) -> None:
    done, not_done = wait_futures(futures, timeout=timeout)
    assert not not_done, f"{len(not_done)} tasks did not finish"


def _mirrors(state: ClusterState, client: Client) -> bool:
    """The state, caught up to a fresh snapshot, equals it (the cluster must be quiet meanwhile)."""
    fresh = client.status()
    if not state.wait(lambda s: s.link is Link.LIVE and s.seq is not None and s.seq >= fresh["seq"], 10):
        return False
    return comparable(state.snapshot()) == comparable(fresh)


def test_thousands_of_events_have_contiguous_seq_and_every_task_its_three_events(cluster, events):
    cluster.start_broker()
    cluster.start_worker("--slots", "2")
    cluster.start_worker("--slots", "2")
    cluster.wait_workers(2)
    log = events()
    with cluster.client() as c:
        futures = [c.submit("square", i) for i in range(3000)] + [c.submit("square", "x") for _ in range(30)]
        _settle(futures)
    ids = {f.task_id for f in futures}
    wait_until(lambda: len(log.of("task.succeeded")) + len(log.of("task.failed")) >= len(ids), 30,
               what="every task's final event")
    seqs = [fields["seq"] for _, fields in list(log.events)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must rise by exactly one per event"
    assert len(seqs) > 3 * len(ids)
    assert log.messages < len(seqs), f"{log.messages} messages for {len(seqs)} events: runs of one topic travel together"
    by_task: dict = {}
    for topic, fields in log.events:
        if "task_id" in fields:
            by_task.setdefault(fields["task_id"], []).append((topic, fields["seq"]))
    assert set(by_task) == ids
    failed = {f.task_id for f in futures[3000:]}
    for task_id, seen in by_task.items():
        last = "task.failed" if task_id in failed else "task.succeeded"
        assert [t for t, _ in seen] == ["task.submitted", "task.started", last], (task_id, seen)


def test_a_live_state_equals_a_fresh_snapshot_after_a_busy_run_and_while_slots_are_held(cluster):
    cluster.start_broker("--no-worker-timeout", "1")
    cluster.start_worker("--slots", "2", "--name", "plain")
    cluster.start_worker("--slots", "2", "--name", "gpu-box", "--resources", "gpu=1")
    cluster.wait_workers(2)
    with cluster.client() as c, ClusterState(_quick_client(cluster), cluster.events).start() as state:
        assert state.wait(lambda s: s.link is Link.LIVE, 10)
        busy = [c.submit("square", i, priority=i % 3) for i in range(1500)]
        busy += [c.submit("square", "x") for _ in range(20)]  # TypeError on the worker
        busy += [c.submit("echo", i, resources={"cpu": 1, "gpu": 1}) for i in range(50)]
        busy += [c.submit("noop", resources={"tpu": 1}) for _ in range(3)]  # nobody offers a tpu
        _settle(busy)
        assert wait_until(lambda: _mirrors(state, c), 15, what="state == snapshot after the busy run")
        # every slot held by a long sleep; squares wait (sent ahead), GPU noops wait in the queue
        sleepers = [c.submit("sleep", 60) for _ in range(4)]
        waiting = [c.submit("square", i) for i in range(10)]
        gpu_waiting = [c.submit("noop", resources={"cpu": 1, "gpu": 1}) for _ in range(3)]
        wait_until(lambda: (s := c.status())["running"] == 4 and s["queued"] == 13, 20, what="slots all held")
        assert c.cancel(gpu_waiting[0])
        snap = wait_until(lambda: _mirrors(state, c) and c.status(), 15, what="state == snapshot while held")
        assert snap["queues"] == {"cpu": 12, "gpu": 2} and snap["cancelled"] == 1
        assert {t["name"] for t in state.snapshot()["running_tasks"]} == {"sleep"}
        assert {w["name"]: w["free"] for w in state.snapshot()["workers"]} == \
            {"plain": {"cpu": 0}, "gpu-box": {"cpu": 0, "gpu": 1}}
        assert state.gaps == 0 and state.mismatches == 0 and state.resyncs == 1
        assert len(state.failures) == 23 and {f["error"].split(":")[0] for f in state.failures} == \
            {"TypeError", "NoWorkerAvailable"}
        del sleepers, waiting


class LossyState(ClusterState):
    """Loses some events on their way in, like a SUB socket past its high-water mark."""

    succeeded_seen = 0

    def receive(self, topic: str, fields: dict) -> bool:
        if topic == "task.succeeded":
            self.succeeded_seen += 1
            if self.succeeded_seen % 250 == 0:  # every 250th, whatever the interleaving of topics
                return False
        return super().receive(topic, fields)


def test_a_state_that_misses_events_sees_the_gap_and_resnapshots(cluster):
    cluster.start_broker()
    cluster.start_worker("--slots", "2")
    cluster.wait_workers(1)
    with cluster.client() as c, LossyState(_quick_client(cluster), cluster.events).start() as state:
        assert state.wait(lambda s: s.link is Link.LIVE, 10)
        _settle([c.submit("square", i) for i in range(2000)])
        assert wait_until(lambda: _mirrors(state, c), 15, what="state == snapshot after gaps")
        assert state.gaps >= 1 and state.resyncs >= 2
        assert state.counts["done"] == 2000


def test_a_state_started_while_the_broker_is_down_says_so_and_goes_live_when_it_comes_up(cluster):
    cluster.start_broker()  # once, to learn its endpoints; the state starts while it is down
    cluster.kill(cluster.broker)
    with ClusterState(_quick_client(cluster), cluster.events).start() as state:
        assert state.wait(lambda s: s.link is Link.UNREACHABLE, 15)
        cluster.start_broker()
        cluster.start_worker("--name", "late")
        assert state.wait(lambda s: s.link is Link.LIVE and list(s.workers) == ["late"], 20)
        with cluster.client() as c:
            assert wait_until(lambda: _mirrors(state, c), 15, what="state == snapshot")


def test_a_running_state_notices_the_broker_going_away_and_coming_back(cluster):
    cluster.start_broker()
    cluster.start_worker("--slots", "2", "--name", "survivor")
    cluster.wait_workers(1)
    with cluster.client() as c, ClusterState(_quick_client(cluster), cluster.events).start() as state:
        _settle([c.submit("square", i) for i in range(300)])
        assert state.wait(lambda s: s.link is Link.LIVE and s.counts["done"] == 300, 15)
        cluster.kill(cluster.broker)
        assert state.wait(lambda s: s.link is Link.UNREACHABLE, 15)
        cluster.start_broker()
        assert state.wait(lambda s: s.link is Link.LIVE and len(s.workers) == 1 and s.counts["done"] == 0, 20)
        assert state.restarts == 1  # the new broker's seq started again from 1
        assert wait_until(lambda: _mirrors(state, c), 15, what="state == snapshot after the restart")


# ==================================================================== logs

import json  # noqa: E402
import re  # noqa: E402


def test_logs_are_json_lines_with_snake_case_events_and_heartbeats_only_at_debug(cluster):
    cluster.start_broker("--log-format", "json", "--log-level", "debug")
    cluster.start_worker("--log-format", "json", "--name", "w-json")
    cluster.wait_workers(1)
    with cluster.client() as c:
        c.map("square", range(10))
    wait_until(lambda: "heartbeat_received" in cluster.logs(), 10, what="a heartbeat logged at debug")
    records = [json.loads(line) for path in sorted(cluster.tmp_path.glob("*.log"))
               for line in path.read_text().splitlines() if line.strip()]
    assert records and all(re.fullmatch(r"[a-z][a-z0-9_]*", r["event"]) for r in records), records
    assert all(r["level"] == "debug" for r in records if r["event"].startswith("heartbeat_"))
    assert any(r["event"] == "worker_joined" and r["worker"] == "w-json" for r in records)
