"""Live status: event fields, snapshot + events (the Clone pattern) = the broker's state, gaps, restarts."""

from __future__ import annotations

from broker.protocol import Command, Message
from tests.test_core import ALL_TASKS, Harness

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
