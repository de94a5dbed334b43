"""The pure broker core with a fake clock: scheduling, priorities, slots, cancel, timeouts, liveness."""

from __future__ import annotations

import msgpack
import pytest

from broker.protocol import Command, Message, pack_value, unpack_value
from broker.states import IllegalTransition, TaskState, WorkerState, check_task_move, check_worker_move
from broker.core import Core
from tests.harness import ALL_TASKS, Harness, published

@pytest.fixture
def h():
    return Harness()


def test_task_goes_to_the_only_worker_and_its_result_to_the_session(h):
    h.join(b"w1")
    t = h.submit("square", 7)
    assert h.dispatched(b"w1") == [t]
    h.done(b"w1", t, 49)
    results = h.fetch()
    status, value, nframes, info = results[t][1], results[t][2], results[t][3], results[t][4]
    assert status == "succeeded" and unpack_value(value) == 49 and nframes == 0
    assert info["worker"] == "w1" and info["attempts"] == 1


def test_accepted_reply_for_every_submit(h):
    h.submit()
    assert [m.command for _, m in h.to_clients] == [Command.ACCEPTED]


def test_a_worker_never_holds_more_tasks_than_its_slots(h):
    h.join(b"w1", slots=2)
    ids = [h.submit() for _ in range(5)]
    assert h.dispatched(b"w1") == ids[:2]
    h.done(b"w1", ids[0])
    assert h.dispatched(b"w1") == [ids[2]]
    assert len(h.core.workers[b"w1"].running) == 2


def test_higher_priority_runs_first_and_fifo_within_a_priority(h):
    ids = [h.submit(priority=p) for p in (0, 5, 0, 5, 9)]
    h.join(b"w1", slots=5)
    assert h.dispatched(b"w1") == [ids[4], ids[1], ids[3], ids[0], ids[2]]


def test_least_loaded_worker_gets_the_next_task(h):
    h.join(b"a", slots=4)
    h.join(b"b", slots=4)
    ids = [h.submit() for _ in range(4)]
    a, b = h.dispatched(b"a"), h.dispatched(b"b")
    assert len(a) == 2 and len(b) == 2  # spread, not piled on one worker
    h.done(b"a", a[0])
    h.done(b"a", a[1])
    nxt = h.submit()
    assert h.dispatched(b"a") == [nxt]  # a is idle, b is half full
    assert set(a + b) == set(ids)


def test_tasks_only_go_to_workers_that_serve_their_name(h):
    h.join(b"cpu", tasks={"noop": {"cpu": 1}})
    h.join(b"sq", tasks={"square": {"cpu": 1}})
    t = h.submit("square", 2)
    assert h.dispatched(b"cpu") == [] and h.dispatched(b"sq") == [t]


def test_cancel_of_queued_task_removes_it_and_reports(h):
    t = h.submit()
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 9, "session": "s1", "ids": [t]}), h.now)
    h.flush()
    reply = [m for _, m in h.to_clients if m.command is Command.CANCELLED][-1]
    assert reply.header["cancelled"] == [t]
    assert h.state(t) is TaskState.CANCELLED
    h.join(b"w1")
    assert h.dispatched(b"w1") == []
    assert h.topics("task.cancelled")[0]["task_id"] == t


def test_cancel_of_running_or_foreign_task_is_refused(h):
    h.join(b"w1")
    t = h.submit()
    h.core.on_client(b"c2", Message(Command.CANCEL, {"rid": 1, "session": "other", "ids": [t]}), h.now)
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 2, "session": "s1", "ids": [t]}), h.now)
    h.flush()
    replies = [m for _, m in h.to_clients if m.command is Command.CANCELLED]
    assert all(r.header["cancelled"] == [] and r.header["refused"] == [t] for r in replies)
    assert h.state(t) is TaskState.RUNNING


def test_task_past_its_timeout_fails_and_its_slot_stays_held_until_the_worker_answers(h):
    h.join(b"w1")
    t = h.submit("sleep", 10, timeout_s=1.0)
    h.dispatched(b"w1")
    h.core.on_worker(b"w1", Message(Command.HEARTBEAT, {}), h.now + 0.9)
    h.tick(1.1)
    assert h.state(t) is TaskState.FAILED
    assert h.core.tasks[t].result[1]["type"] == "TaskTimeout"
    t2 = h.submit()
    assert h.dispatched(b"w1") == []  # the worker still runs the timed-out task
    h.done(b"w1", t)  # late result: ignored, slot freed
    assert h.state(t) is TaskState.FAILED
    assert h.dispatched(b"w1") == [t2]


def test_silent_worker_is_declared_dead_and_its_task_requeued(h):
    h.join(b"w1")
    h.join(b"w2")
    t = h.submit()
    holder = b"w1" if h.dispatched(b"w1") else b"w2"
    other = b"w2" if holder == b"w1" else b"w1"
    h.dispatched(other)
    for _ in range(4):  # the other worker keeps heartbeating, the holder is silent (busy or dead)
        h.core.on_worker(other, Message(Command.HEARTBEAT, {}), h.now)
        h.tick(1.0)
    assert holder not in h.core.workers
    lost = h.topics("worker.lost")[0]
    assert lost["requeued"] == [t] and lost["worker"] == holder.decode()
    assert h.dispatched(other) == [t]
    assert h.topics("task.retried")[0]["task_id"] == t
    h.done(holder, t)  # a late result from the dead worker is ignored
    assert h.state(t) is TaskState.RUNNING
    h.done(other, t, 5)
    assert h.state(t) is TaskState.SUCCEEDED
    assert len(h.topics("task.succeeded")) == 1


def test_task_lost_more_than_its_retries_fails_with_task_lost_naming_workers(h):
    t = h.submit(retries=1)
    for name in (b"x1", b"x2"):
        h.join(name)
        assert h.dispatched(name) == [t]
        h.tick(3.5)  # silent past heartbeat x liveness
    assert h.state(t) is TaskState.FAILED
    error = h.core.tasks[t].result[1]
    assert error["type"] == "TaskLost" and "x1" in error["message"] and "x2" in error["message"]


def test_task_nobody_serves_fails_after_no_worker_timeout_with_its_name(h):
    h.join(b"w1")
    t = h.submit("mystery")
    h.core.on_worker(b"w1", Message(Command.HEARTBEAT, {}), h.now + 2.0)
    h.tick(4.0)
    assert h.state(t) is TaskState.QUEUED
    h.core.on_worker(b"w1", Message(Command.HEARTBEAT, {}), h.now)
    h.tick(1.5)
    assert h.state(t) is TaskState.FAILED
    assert "mystery" in h.core.tasks[t].result[1]["message"]


def test_task_whose_resources_nobody_offers_fails_naming_the_resource(h):
    h.join(b"w1", tasks={"noop": {"cpu": 1}})
    t = h.submit(resources={"gpu": 1})
    for _ in range(7):
        h.core.on_worker(b"w1", Message(Command.HEARTBEAT, {}), h.now)
        h.tick(1.0)
    assert h.state(t) is TaskState.FAILED
    assert "gpu=1" in h.core.tasks[t].result[1]["message"]


def test_busy_capacity_is_waited_for_without_failing(h):
    h.join(b"w1")
    t1, t2 = h.submit("sleep", 1), h.submit("sleep", 1)
    for _ in range(20):
        h.core.on_worker(b"w1", Message(Command.HEARTBEAT, {}), h.now)
        h.tick(1.0)
    assert h.state(t2) is TaskState.QUEUED
    h.done(b"w1", t1)
    assert h.state(t2) is TaskState.RUNNING


def test_resubmitting_the_same_task_id_never_duplicates(h):
    h.join(b"w1")
    t = h.submit(task_id="same")
    h.submit(task_id="same")
    assert h.dispatched(b"w1") == ["same"]
    assert len(h.topics("task.submitted")) == 1


def test_idempotency_key_returns_the_first_task(h):
    h.join(b"w1")
    a = h.submit(key="k")
    h.to_clients.clear()
    b = h.submit(key="k")
    reply = [m for _, m in h.to_clients if m.command is Command.ACCEPTED][0]
    assert reply.header["aliases"] == [[b, a]]
    assert h.dispatched(b"w1") == [a]


def test_results_stay_until_acknowledged_then_the_task_leaves_memory(h):
    h.join(b"w1")
    t = h.submit()
    h.dispatched(b"w1")
    h.done(b"w1", t, 1)
    assert t in h.fetch()
    assert t in h.fetch()  # not acknowledged yet: delivered again
    assert h.fetch(ack=[t]) == {}
    assert t not in h.core.tasks and ("s1", t) in h.core._recent


def test_parked_fetch_is_answered_when_a_result_arrives(h):
    h.join(b"w1")
    t = h.submit()
    h.dispatched(b"w1")
    assert h.fetch(wait_ms=1000) == {}  # parked, nothing sent yet
    h.to_clients.clear()
    h.done(b"w1", t)
    assert [m.header["results"][0][0] for _, m in h.to_clients if m.command is Command.RESULTS] == [t]


def test_parked_fetch_expires_with_an_empty_reply(h):
    h.fetch(wait_ms=500)
    h.tick(0.6)
    assert [m.header["results"] for _, m in h.to_clients if m.command is Command.RESULTS] == [[]]


def test_heartbeats_go_to_idle_workers(h):
    h.join(b"w1")
    h.to_workers.clear()
    h.tick(1.1)
    assert [m.command for m in h.to_workers[b"w1"]] == [Command.HEARTBEAT]


def test_worker_that_hands_back_tasks_gets_them_requeued_without_counting_a_loss(h):
    h.join(b"w1")
    t = h.submit()
    h.dispatched(b"w1")
    h.core.on_worker(b"w1", Message(Command.RETURN, {"draining": True, "ids": [t]}), h.now)
    h.flush()
    assert h.state(t) is TaskState.QUEUED and h.core.tasks[t].lost_on == ()
    assert h.core.workers[b"w1"].state is WorkerState.DRAINING
    h.join(b"w2")
    assert h.dispatched(b"w2") == [t] and h.dispatched(b"w1") == []
    h.core.on_worker(b"w1", Message(Command.DISCONNECT, {}), h.now)
    h.flush()
    assert h.topics("worker.left")[0]["worker"] == "w1"


def test_rejoining_worker_keeps_the_tasks_it_still_runs(h):
    h.join(b"old", name="w")
    t = h.submit()
    h.dispatched(b"old")
    h.join(b"new", name="w", running=[t])  # same worker, fresh socket after a broker silence
    assert h.state(t) is TaskState.RUNNING and h.core.tasks[t].worker == b"new"
    assert h.topics("task.retried") == []
    h.done(b"new", t)
    assert h.state(t) is TaskState.SUCCEEDED


def test_a_worker_process_on_a_fresh_socket_keeps_its_served_count(h):
    h.join(b"old", name="w")
    t = h.submit()
    h.dispatched(b"old")
    h.done(b"old", t)
    h.join(b"new", name="w")  # the same process (same pid, here none) redialled after a broker silence
    t = h.submit()
    h.dispatched(b"new")
    h.done(b"new", t)
    assert [w["tasks"] for w in h.core.snapshot(h.now)["workers"]] == [2]


def test_every_event_has_contiguous_seq_and_a_timestamp(h):
    h.join(b"w1")
    for _ in range(10):
        t = h.submit()
        h.dispatched(b"w1")
        h.done(b"w1", t)
    seqs = [e["seq"] for _, e in h.events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all("ts" in e for _, e in h.events)
    assert h.core.snapshot(h.now)["seq"] == seqs[-1]


def test_bad_client_requests_get_an_error_reply(h):
    bad = [
        Message(Command.SUBMIT, {"rid": 1, "session": "s", "tasks": "nope"}),
        Message(Command.SUBMIT, {"rid": 1, "session": "s", "tasks": [[1, 2]]}),
        Message(Command.SUBMIT, {"rid": 1, "session": 5, "tasks": []}),
        Message(Command.TASKS, {"rid": 1}),
        Message(Command.SUBMIT, {"rid": 1, "session": "s", "tasks": [["t", "n", b"", 2, None, 0, None, None, None]]}),
    ]
    for msg in bad:
        h.core.on_client(b"c", msg, h.now)
    h.flush()
    assert [m.command for _, m in h.to_clients] == [Command.ERROR] * len(bad)


def test_invalid_task_fields_are_rejected_per_task(h):
    h.to_clients.clear()
    blob = msgpack.packb([[], {}])
    recs = [["a", "noop", blob, 0, {"cpu": -1}, 0, None, None, None],
            ["b", "noop", blob, 0, None, 0, None, -5, None],
            ["c", "noop", blob, 0, {"gpu": 1e300}, 0, None, None, None],
            ["d", "noop", blob, 0, None, 0, None, None, None]]
    h.core.on_client(b"c", Message(Command.SUBMIT, {"rid": 1, "session": "s", "tasks": recs}), h.now)
    h.flush()
    reply = h.to_clients[-1][1]
    assert [r[0] for r in reply.header["rejected"]] == ["a", "b", "c"]
    assert "d" in h.core.tasks and "a" not in h.core.tasks


def test_bad_worker_messages_are_dropped(h):
    h.join(b"w1")
    h.core.on_worker(b"w1", Message(Command.DONE, {"results": "garbage"}), h.now)
    h.core.on_worker(b"w1", Message(Command.DONE, {"results": [["never-given", True, b"\xc0", 0, 0.1]]}), h.now)
    h.core.on_worker(b"zz", Message(Command.READY, {"name": "zz", "slots": -3, "tasks": {}}), h.now)
    h.flush()
    assert list(h.core.workers) == [b"w1"]


@pytest.mark.parametrize("old,new", [(TaskState.SUCCEEDED, TaskState.QUEUED), (TaskState.CANCELLED, TaskState.RUNNING),
                                     (TaskState.QUEUED, TaskState.SUCCEEDED), (TaskState.FAILED, TaskState.FAILED)])
def test_illegal_task_moves_raise(old, new):
    with pytest.raises(IllegalTransition):
        check_task_move("t", old, new)


@pytest.mark.parametrize("old,new", [(WorkerState.LOST, WorkerState.READY), (WorkerState.LEFT, WorkerState.DRAINING),
                                     (WorkerState.DRAINING, WorkerState.READY)])
def test_illegal_worker_moves_raise(old, new):
    with pytest.raises(IllegalTransition):
        check_worker_move("w", old, new)


# ---------------------------------------------------------------- sending ahead (prefetch)


def _run_once(h, wid, name="noop", run_s=0.00001):
    t = h.submit(name)
    assert h.dispatched(wid) == [t]
    blob, _ = pack_value(None)
    h.core.on_worker(wid, Message(Command.DONE, {"log": [[t, True, blob, 0, run_s]]}), h.now)
    h.flush()


def test_short_tasks_wait_ahead_on_a_busy_worker_without_holding_resources(h):
    from broker.core import AHEAD_PER_SLOT

    h.join(b"w1")
    _run_once(h, b"w1")  # now the broker knows noop is short
    ids = [h.submit() for _ in range(AHEAD_PER_SLOT + 5)]
    sent = h.dispatched(b"w1")
    assert sent == ids[: len(sent)]  # one to run, the rest ahead, in order
    w = h.core.workers[b"w1"]
    assert len(w.running) == 1 and AHEAD_PER_SLOT // 2 < len(w.ahead) <= AHEAD_PER_SLOT
    assert w.free["cpu"] == 0  # only the running one holds its slot
    assert h.state(ids[1]) is TaskState.DISPATCHED
    snap = h.core.snapshot(h.now)
    assert snap["running"] == 1 and snap["queued"] == len(ids) - 1
    started = [e["task_id"] for e in h.topics("task.started")]
    assert ids[1] not in started
    blob, _ = pack_value(None)
    # the worker's log: first finished, then the next (sent ahead) started
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": [[ids[0], True, blob, 0, 0.001], ids[1]]}), h.now)
    h.flush()
    assert h.state(ids[1]) is TaskState.RUNNING
    assert [e["task_id"] for e in h.topics("task.started")][-1] == ids[1]
    assert w.free["cpu"] == 0 and len(w.running) == 1


def test_only_a_few_milliseconds_of_work_wait_ahead_per_slot(h):
    from broker.core import AHEAD_MAX_WAIT_S

    h.join(b"w1")
    _run_once(h, b"w1", run_s=0.004)
    for _ in range(20):
        h.submit()
    assert len(h.core.workers[b"w1"].ahead) == int(AHEAD_MAX_WAIT_S / 0.004)


def test_tasks_of_unknown_or_long_duration_are_never_sent_ahead(h):
    h.join(b"w1")
    ids = [h.submit("sleep", 1) for _ in range(3)]
    assert h.dispatched(b"w1") == ids[:1]  # duration unknown: one at a time
    blob, _ = pack_value(1)
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": [[ids[0], True, blob, 0, 1.0]]}), h.now)
    h.flush()
    assert h.dispatched(b"w1") == ids[1:2]  # long: still one at a time
    assert not h.core.workers[b"w1"].ahead


def test_tasks_ahead_of_a_dead_worker_are_requeued_without_counting_a_loss(h):
    h.join(b"w1")
    _run_once(h, b"w1")
    ids = [h.submit(retries=0) for _ in range(4)]
    h.dispatched(b"w1")
    h.tick(3.5)  # w1 silent: dead
    running, ahead = ids[0], ids[1:]
    assert h.state(running) is TaskState.FAILED  # retries=0: lost once is too many
    assert all(h.state(t) is TaskState.QUEUED for t in ahead)
    assert all(h.core.tasks[t].attempts == 0 and h.core.tasks[t].lost_on == () for t in ahead)
    assert h.topics("worker.lost")[0]["requeued"] == ahead
    h.join(b"w2")
    assert set(h.dispatched(b"w2")) == set(ahead)


def test_nothing_overtakes_tasks_waiting_ahead(h):
    h.join(b"w1", slots=2)
    _run_once(h, b"w1")
    ids = [h.submit() for _ in range(4)]
    h.dispatched(b"w1")
    w = h.core.workers[b"w1"]
    assert len(w.running) == 2 and len(w.ahead) == 2
    blob, _ = pack_value(None)
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": [[ids[0], True, blob, 0, 0.001]]}), h.now)
    h.flush()
    later = h.submit()
    # a slot is free in the broker's view, but the worker starts the ahead tasks first
    assert not w.has_free_slot()
    assert h.state(later) in (TaskState.QUEUED, TaskState.DISPATCHED)
    assert all(v >= 0 for v in w.free.values())


def test_a_fetched_task_leaves_only_a_compact_record_of_its_id_which_expires(h):
    import tracemalloc

    from broker.core import ACKED_GRACE_S

    h.join(b"w1", slots=2)
    plain, keyed = h.submit(), h.submit(key="k")
    h.dispatched(b"w1")
    h.done(b"w1", plain, 1)
    h.done(b"w1", keyed, 2)
    h.fetch(ack=[plain, keyed])
    assert plain not in h.core.tasks and len(h.core._recent) == 1
    h.to_clients.clear()
    h.submit(task_id=plain)  # a late resend of its SUBMIT: recognised, never run again
    assert h.dispatched(b"w1") == [] and h.to_clients[0][1].header["rejected"] == []
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20_000):
        h.core._recent.add("s1", f"0123456789ab-{i:x}", h.now)
    per_task = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    assert per_task < 150, f"{per_task:.0f} bytes per acknowledged task"  # a whole task is ~1.3 KiB
    for _ in range(int(ACKED_GRACE_S) + 2):
        h.core.on_worker(b"w1", Message(Command.HEARTBEAT, {}), h.now)
        h.tick(1.0)
    assert len(h.core._recent) == 0  # the record expires
    assert unpack_value(h.core.tasks[keyed].result[1]) == 2  # no journal: the keyed result stays (its TTL)
    assert list(h.core._expiry) == [keyed]  # no timer left behind


def test_without_a_journal_fetched_keyed_results_in_memory_are_bounded(h, monkeypatch):
    import broker.sessions

    monkeypatch.setattr(broker.sessions, "MAX_KEYED_RESULTS", 3)
    h.join(b"w1")
    ids = []
    for i in range(5):
        ids.append(h.submit(key=f"k{i}"))
        h.dispatched(b"w1")
        h.done(b"w1", ids[-1], i)
    h.fetch(ack=ids)
    assert [t for t in ids if t in h.core.tasks] == ids[2:]  # oldest forgotten first
    assert h.core.counts["done"] == 5


def test_a_keyed_result_is_read_back_from_the_journal_after_the_in_memory_copy_is_gone(tmp_path):
    from broker.journal import Journal

    journal = Journal(str(tmp_path / "j.db"))
    h = Harness(journal=journal)
    h.join(b"w1")
    first = h.submit("square", 3, key="k")
    h.dispatched(b"w1")
    h.done(b"w1", first, 9)
    journal.commit()
    assert first in h.fetch()
    h.fetch(ack=[first])
    journal.commit()
    assert first not in h.core.tasks and not h.core.keys and not h.core._expiry  # out of memory
    h.to_clients.clear()
    again = h.submit("square", 3, key="k", session="s2")
    accepted = [m for _, m in h.to_clients if m.command is Command.ACCEPTED][0]
    assert accepted.header["aliases"] == [[again, first]]
    assert unpack_value(h.fetch(session="s2")[first][2]) == 9
    assert h.dispatched(b"w1") == [] and h.core.counts["done"] == 1  # never ran twice, counted once
    h.fetch(session="s2", ack=[first])
    journal.commit()
    assert first not in h.core.tasks  # out of memory again once fetched
    fresh = Core()
    journal.restore(fresh, 0.0)
    assert fresh.tasks == {}  # a restart loads no fetched keyed result either: read back on demand
    assert fresh._keyed("k", 0.0) is None  # (no journal attached to this core)
    fresh.journal = journal
    assert unpack_value(fresh._keyed("k", 0.0).result[1]) == 9
    journal.close()


def test_timeouts_of_tasks_that_finished_in_time_do_not_pile_up(h):
    h.join(b"w1")
    for _ in range(1500):
        t = h.submit(timeout_s=3600.0)
        h.dispatched(b"w1")
        h.done(b"w1", t)
    h.tick(1.5)
    assert len(h.core._deadlines) < 1024


def test_queues_of_one_off_task_names_are_forgotten_once_empty(h):
    h.join(b"w1", tasks={f"job{i}": {"cpu": 1} for i in range(50)})
    for i in range(50):
        t = h.submit(f"job{i}")
        h.dispatched(b"w1")
        h.done(b"w1", t)
    h.tick(1.5)
    assert len(h.core.sched.classes) == 0
    t = h.submit("job7")  # a class comes back when needed
    assert h.dispatched(b"w1") == [t]


def test_nothing_waits_ahead_behind_a_long_running_task(h):
    h.join(b"w1")
    _run_once(h, b"w1")  # noop is known to be short
    long_one = h.submit("sleep", 60)  # unknown duration, runs on w1
    assert h.dispatched(b"w1") == [long_one]
    short = [h.submit() for _ in range(5)]
    assert h.dispatched(b"w1") == [] and not h.core.workers[b"w1"].ahead
    h.join(b"w2")  # an idle worker takes them, instead of them waiting a minute on w1
    assert h.dispatched(b"w2")[0] == short[0]


def test_two_live_processes_with_one_name_do_not_evict_each_other(h):
    h.core.on_worker(b"a", Message(Command.READY, {"name": "x", "slots": 1, "tasks": ALL_TASKS, "pid": 1}), h.now)
    t = h.submit()
    assert h.dispatched(b"a") == [t]
    h.core.on_worker(b"b", Message(Command.READY, {"name": "x", "slots": 1, "tasks": ALL_TASKS, "pid": 2}), h.now)
    h.flush()
    assert list(h.core.workers) == [b"a"] and h.state(t) is TaskState.RUNNING
    refusal = h.to_workers[b"b"][-1]
    assert refusal.command is Command.DISCONNECT and refusal.header["reason"].startswith("worker name in use")
    h.tick(2.0)  # a silent while later the name's owner may be dead: a new process may take the name over
    h.core.on_worker(b"c", Message(Command.READY, {"name": "x", "slots": 1, "tasks": ALL_TASKS, "pid": 3}), h.now)
    h.flush()
    assert list(h.core.workers) == [b"c"]


def test_journal_keeps_arguments_until_the_task_finishes_then_keeps_the_result(tmp_path):
    import numpy as np

    from broker.journal import Journal

    journal = Journal(str(tmp_path / "j.db"))
    h = Harness(journal=journal)
    blob, frames = pack_value([[np.arange(4.0)], {}])
    rec = ["a", "square", blob, len(frames), None, 0, None, None, None]
    h.core.on_client(b"c", Message(Command.SUBMIT, {"rid": 1, "session": "s1", "tasks": [rec]}, frames), h.now)
    h.flush()
    journal.commit()
    row = lambda: journal.db.execute("SELECT state, args IS NULL, frames IS NULL, result IS NULL FROM tasks").fetchone()
    assert row() == ("queued", 0, 0, 1)
    h.join(b"w1")
    assert h.dispatched(b"w1") == ["a"]
    journal.commit()
    assert row() == ("running", 0, 0, 1)  # the state changed; the arguments stayed
    h.done(b"w1", "a", 6.0)
    journal.commit()
    assert row() == ("succeeded", 1, 1, 0)
    fresh = Core()
    journal.restore(fresh, 0.0)
    assert unpack_value(fresh.tasks["a"].result[1]) == 6.0 and "a" in fresh.sessions["s1"].outbox
    journal.close()


def test_a_flush_publishes_runs_of_one_topic_with_seqs_in_order_and_each_task_in_order(h):
    workers = [b"w1", b"w2", b"w3", b"w4"]
    h.join(workers[0])
    _run_once(h, workers[0])  # noop is known to be short: the next ones are sent ahead
    for wid in workers[1:]:
        h.join(wid)
    running = [h.submit() for _ in workers]
    queued = [h.submit() for _ in workers]
    first = {h.core.tasks[t].worker: t for t in running}
    ahead = {h.core.tasks[u].worker: u for u in reversed(queued)}  # each worker's first task sent ahead
    assert set(first) == set(workers) and len(ahead) >= 2
    h.events.clear()
    blob, _ = pack_value(None)
    h.core.on_client(b"c1", Message(Command.STATUS, {"rid": 1}), h.now)  # a snapshot before: a fixed point
    for wid in workers:  # each worker: its running task's result, then the start of the one sent ahead
        log = [[first[wid], True, blob, 0, 0.0001]] + ([ahead[wid]] if wid in ahead else [])
        h.core.on_worker(wid, Message(Command.DONE, {"log": log}), h.now)
    out = h.flush()
    seqs = [f["seq"] for _, f in published(out.events)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    snapshot_seq = [m for _, m in h.to_clients if m.command is Command.SNAPSHOT][-1].header["snapshot"]["seq"]
    assert seqs[0] == snapshot_seq + 1
    # four DONEs, eight events, two messages: every start, then every result
    assert [(topic, len(events)) for topic, events in out.events] == [("task.started", len(ahead)),
                                                                      ("task.succeeded", 4)]


def _one_slot_log(sent: list, blob: bytes) -> list:
    """A one-slot worker's DONE log for ``sent`` (the first already running): a result, the next
    task's start, its result, ..."""
    log = []
    for i, t in enumerate(sent):
        if i:
            log.append(t)
        log.append([t, True, blob, 0, 0.0001])
    return log


def test_one_workers_alternating_results_and_starts_go_out_as_two_messages_each_task_in_order(h):
    h.join(b"w1")
    _run_once(h, b"w1")
    ids = [h.submit() for _ in range(6)]
    sent = h.dispatched(b"w1")
    assert sent == ids[: len(sent)] and len(sent) >= 3
    h.events.clear()
    blob, _ = pack_value(None)
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": _one_slot_log(sent, blob)}), h.now)
    out = h.flush()
    assert [topic for topic, _ in out.events][:2] == ["task.started", "task.succeeded"]
    assert [f.task_id for f in out.events[1][1]] == sent  # results in the order the worker gave them
    events = published(out.events)
    seqs = [f["seq"] for _, f in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    position = {(topic, f["task_id"]): f["seq"] for topic, f in events}
    for t in sent[1:]:  # each task: started before succeeded
        assert position[("task.started", t)] < position[("task.succeeded", t)]


def test_starts_that_take_a_gpu_stay_after_the_result_that_freed_it(h):
    h.join(b"g1", resources={"cpu": 1, "gpu": 1})
    blob, _ = pack_value(None)
    first = h.submit(resources={"gpu": 1})
    assert h.dispatched(b"g1") == [first]
    h.core.on_worker(b"g1", Message(Command.DONE, {"log": [[first, True, blob, 0, 0.00001]]}), h.now)
    h.flush()  # now noop is known to be short: the next ones are sent ahead
    ids = [h.submit(resources={"gpu": 1}) for _ in range(4)]
    sent = h.dispatched(b"g1")
    assert sent == ids[: len(sent)] and len(sent) >= 2
    h.events.clear()
    h.core.on_worker(b"g1", Message(Command.DONE, {"log": _one_slot_log(sent, blob)}), h.now)
    events = published(h.flush().events)
    running = peak = 1  # the GPU as a subscriber counts it, event by event: sent[0] holds it
    for topic, _ in events:
        running += {"task.started": 1, "task.succeeded": -1}[topic]
        peak = max(peak, running)
    assert peak == 1 and [f["task_id"] for t, f in events if t == "task.succeeded"] == sent


def test_a_long_run_goes_out_in_messages_of_at_most_max_run_events_seqs_continuing(h):
    from broker.events import MAX_RUN

    blob, _ = pack_value([[], {}])
    count = 2 * MAX_RUN + 88
    tasks = [[f"b{i}", "noop", blob, 0, None, 0, None, None, None] for i in range(count)]
    h.events.clear()
    h.core.on_client(b"c1", Message(Command.SUBMIT, {"rid": 1, "session": "s1", "tasks": tasks}), h.now)
    grouped = h.flush().events
    assert [(topic, len(events)) for topic, events in grouped] == [("task.submitted", MAX_RUN),
                                                                   ("task.submitted", MAX_RUN),
                                                                   ("task.submitted", 88)]
    seqs = [f["seq"] for _, f in published(grouped)]
    assert seqs == list(range(seqs[0], seqs[0] + count))


def test_events_held_across_flushes_go_out_together_by_topic_never_across_a_snapshot(h):
    h.join(b"w1", slots=4)
    blob, _ = pack_value(None)
    h.events.clear()
    submit = lambda tid: h.core.on_client(b"c1", Message(Command.SUBMIT, {"rid": 1, "session": "s1", "tasks": [
        [tid, "noop", blob, 0, None, 0, None, None, None]]}), h.now)
    submit("a")
    first = h.flush(send_events=False)  # the task goes to its worker now; its events wait
    assert first.events == [] and h.core.events_held >= 2 and h.dispatched(b"w1") == ["a"]
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": [["a", True, blob, 0, 0.0001]]}), h.now)
    submit("b")
    h.flush(send_events=False)
    h.core.on_client(b"c1", Message(Command.STATUS, {"rid": 2}), h.now)  # a snapshot: a fixed point
    submit("c")
    out = h.flush()
    assert h.core.events_held == 0
    snap = [m for _, m in out.clients if m.command is Command.SNAPSHOT][0].header["snapshot"]
    events = published(out.events)
    seqs = [f["seq"] for _, f in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[-1] > snap["seq"]
    before = [(t, f["task_id"]) for t, f in events if f["seq"] <= snap["seq"]]
    assert ("task.submitted", "c") not in before and ("task.submitted", "b") in before
    assert [t for t, _ in out.events][:3] == ["task.submitted", "task.started", "task.succeeded"]
    position = {(t, f["task_id"]): f["seq"] for t, f in events}
    assert position[("task.submitted", "a")] < position[("task.started", "a")] < position[("task.succeeded", "a")]


def test_events_never_move_across_a_snapshot_taken_within_the_flush(h):
    h.join(b"w1", slots=2)
    x = h.submit()
    h.dispatched(b"w1")
    blob, _ = pack_value(None)
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": [[x, True, blob, 0, 0.0001]]}), h.now)
    h.core.on_client(b"c1", Message(Command.STATUS, {"rid": 2}), h.now)
    h.core.on_client(b"c1", Message(Command.SUBMIT, {"rid": 3, "session": "s1", "tasks": [
        ["b", "noop", blob, 0, None, 0, None, None, None]]}), h.now)
    out = h.flush()
    snap = [m for _, m in out.clients if m.command is Command.SNAPSHOT][0].header["snapshot"]
    # task.submitted would sort before task.succeeded, but the snapshot already counts x done, not b
    assert [(t, f["task_id"]) for t, f in published(out.events) if f["seq"] <= snap["seq"]] == [("task.succeeded", x)]
    assert snap["done"] == 1 and snap["queued"] == 0
