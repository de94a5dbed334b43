"""Process pools: tasks in child processes, killed past their timeout, crashes that lose one task only.

Real broker and worker processes (tests/conftest.py); psutil finds a worker's
children and proves none outlives it. The broker's side (KILL, the "lost"
outcome, terminate-cancel) is also driven on the pure core with a fake clock.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import psutil
import pytest

from broker.protocol import LOST, Command, DispatchRecord, Message
from broker.states import TaskState
from client import TaskLost, TaskTimeout
from tests.conftest import wait_until
from tests.harness import Harness

TASKS = "tests.pool_tasks"
#: liveness where a test asserts that no worker was lost: a loaded 2-core machine may starve a
#: process (or start the broker late) for a second, and that must not decide the test
PATIENT = 15


def descendants(proc) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_file(path: Path, timeout: float = 30.0) -> str:
    return wait_until(lambda: path.exists() and path.read_text(), timeout, what=f"{path.name} written")


def start_steady_worker(cluster, name: str):
    """A broker and a patient 2-slot process-pool worker (no test here may see it declared lost)."""
    cluster.start_broker(liveness=PATIENT)
    worker = cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", name, liveness=PATIENT)
    cluster.wait_workers(1)
    return worker


def assert_all_gone(procs: list[psutil.Process], timeout: float = 15.0) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert alive == [], f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"


# ==================================================================== real processes


def test_tasks_run_in_child_processes_of_the_worker_one_per_slot(cluster):
    cluster.start_broker()
    worker = cluster.start_worker("--tasks", TASKS, "--slots", "2")
    cluster.wait_workers(1)
    with cluster.client() as c:
        pids = set(c.gather([c.submit("pool.pid") for _ in range(20)], timeout=30))
        children = {p.pid for p in descendants(worker)}
        killable = c.status()["workers"][0]
    assert worker.pid not in pids
    assert pids <= children and 1 <= len(pids) <= 2
    assert killable["slots"] == 2


def test_one_slot_worker_serves_the_next_task_within_seconds_after_a_while_true_task_times_out(cluster, events, tmp_path):
    cluster.start_broker()
    worker = cluster.start_worker("--tasks", TASKS, "--slots", "1", "--name", "solo")
    cluster.wait_workers(1)
    log = events("task.")
    started = tmp_path / "spinning"
    with cluster.client() as c:
        # the child is up first, and the timeout leaves room: it counts from dispatch, and on a
        # loaded machine a task killed before its child started it never writes ``started``
        assert c.submit("square", 3).result(timeout=30) == 9
        f = c.submit("pool.forever", str(started), timeout=2.0)
        spinner = int(wait_file(started))
        with pytest.raises(TaskTimeout):
            f.result(timeout=15)
        t0 = time.monotonic()
        assert c.submit("square", 7).result(timeout=10) == 49
        assert time.monotonic() - t0 < 5.0
        wait_until(lambda: gone(spinner), 10, what="the timed-out task's child gone")
        snap = c.status()
    assert [w["name"] for w in snap["workers"]] == ["solo"] and snap["running"] == 0
    assert snap["workers"][0]["free"] == {"cpu": 1}
    assert worker.poll() is None
    assert [e["task_id"] for e in log.of("task.failed")] == [f.task_id]


def test_task_calling_os_exit_loses_only_itself_and_the_worker_stays_in_status(cluster, events, tmp_path):
    worker = start_steady_worker(cluster, "sturdy")
    log = events("task.", "worker.")
    release = tmp_path / "release"
    with cluster.client() as c:
        neighbour = c.submit("pool.gate", str(tmp_path / "started"), str(release))
        wait_file(tmp_path / "started")
        poison = c.submit("pool.exit", 3, retries=1)
        with pytest.raises(TaskLost) as info:
            poison.result(timeout=30)
        assert "sturdy" in str(info.value)
        release.touch()
        assert neighbour.result(timeout=15) != worker.pid  # its slot ran on, untouched
        assert c.submit("square", 5).result(timeout=10) == 25
        assert [w["name"] for w in c.status()["workers"]] == ["sturdy"]
    assert worker.poll() is None and not log.of("worker.lost")
    retried = [e for e in log.of("task.retried") if e["task_id"] == poison.task_id]
    assert len(retried) == 1 and "child process of worker sturdy" in retried[0]["reason"]
    assert [e["task_id"] for e in log.of("task.failed")] == [poison.task_id]


def test_children_are_replaced_after_max_tasks_per_child(cluster):
    cluster.start_broker()
    cluster.start_worker("--tasks", TASKS, "--max-tasks-per-child", "2")
    cluster.wait_workers(1)
    with cluster.client() as c:
        pids = [c.submit("pool.pid").result(timeout=15) for _ in range(6)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
    assert len(set(pids)) == 3


def test_children_are_replaced_after_a_task_leaves_them_over_max_memory_per_child(cluster):
    cluster.start_broker()
    cluster.start_worker("--tasks", TASKS, "--max-memory-per-child", "200")
    cluster.wait_workers(1)
    with cluster.client() as c:
        first = c.submit("pool.hog", 1).result(timeout=15)
        assert c.submit("pool.hog", 1).result(timeout=15) == first  # well under the limit: same child
        assert c.submit("pool.hog", 256).result(timeout=15) == first  # the task that crosses it finishes
        after = c.submit("pool.pid").result(timeout=15)
    assert after != first


def test_terminate_cancel_kills_the_running_task_and_frees_its_slot(cluster, events, tmp_path):
    cluster.start_broker()
    cluster.start_worker("--tasks", TASKS, "--slots", "1", "--name", "proc")
    cluster.wait_workers(1)
    log = events("task.")
    started = tmp_path / "spinning"
    with cluster.client() as c:
        f = c.submit("pool.forever", str(started))
        spinner = int(wait_file(started))
        assert c.cancel(f) is False  # running, no terminate: not interrupted
        assert c.cancel(f, terminate=True) is True
        with pytest.raises(CancelledError):
            f.result(timeout=5)
        assert c.submit("square", 4).result(timeout=10) == 16
    wait_until(lambda: gone(spinner), 10, what="the cancelled task's child gone")
    log.wait_for("task.cancelled")
    assert [e["task_id"] for e in log.of("task.cancelled")] == [f.task_id]
    assert not log.of("task.failed")


def test_terminate_cancel_cannot_stop_a_task_on_a_thread_slot(cluster, tmp_path):
    cluster.start_broker()
    cluster.start_worker("--tasks", TASKS, "--pool", "thread")
    cluster.wait_workers(1)
    release = tmp_path / "release"
    with cluster.client() as c:
        f = c.submit("pool.gate", str(tmp_path / "started"), str(release))
        wait_file(tmp_path / "started")
        assert c.cancel(f, terminate=True) is False
        release.touch()
        assert f.result(timeout=10) > 0


def test_a_16_mib_array_reaches_a_child_intact_through_shared_memory(cluster):
    cluster.start_broker()
    worker = cluster.start_worker("--tasks", TASKS)
    cluster.wait_workers(1)
    rng = np.random.default_rng(7)
    big = rng.standard_normal(2 * 1024 * 1024)  # 16 MiB of float64
    fortran = np.asfortranarray(rng.integers(0, 1000, size=(300, 500), dtype=np.int32))
    import hashlib

    with cluster.client() as c:
        sha, dtype, shape, writeable, small, pid = c.submit("pool.digest", big, np.arange(10)).result(timeout=30)
        assert sha == hashlib.sha256(big.tobytes()).hexdigest() and dtype == "<f8" and shape == [2 * 1024 * 1024]
        assert writeable is False and small == 45.0 and pid != worker.pid
        sha, _, shape, _, _, _ = c.submit("pool.digest", fortran, np.zeros(0)).result(timeout=30)
        assert sha == hashlib.sha256(np.ascontiguousarray(fortran).tobytes()).hexdigest() and shape == [300, 500]


def test_sigterm_drains_busy_children_then_leaves_nothing_running(cluster, events, tmp_path):
    worker = start_steady_worker(cluster, "leaving")
    log = events("worker.")
    release = tmp_path / "release"
    with cluster.client() as c:
        fs = [c.submit("pool.gate", str(tmp_path / f"started-{k}"), str(release)) for k in range(2)]
        for k in range(2):
            wait_file(tmp_path / f"started-{k}")
        family = descendants(worker)
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: c.status()["workers"][0]["state"] == "draining", 10, what="the worker draining")
        release.touch()
        assert all(f.result(timeout=15) > 0 for f in fs)
        assert worker.wait(timeout=15) == 0
    log.wait_for("worker.left", lambda e: e["worker"] == "leaving")
    assert not log.of("worker.lost")
    assert_all_gone(family)


# ---------------------------------------------------------------- chaos


def test_child_killed_with_sigkill_mid_task_loses_that_task_only_which_runs_again(cluster, events, tmp_path):
    worker = start_steady_worker(cluster, "steady")
    log = events("task.", "worker.")
    release = tmp_path / "release"
    with cluster.client() as c:
        f = c.submit("pool.gate", str(tmp_path / "started"), str(release))
        victim = int(wait_file(tmp_path / "started"))
        others = [c.submit("square", i) for i in range(50)]
        os.kill(victim, signal.SIGKILL)
        log.wait_for("task.retried", lambda e: e["task_id"] == f.task_id)
        release.touch()
        rerun_by = f.result(timeout=30)
        assert [o.result(timeout=15) for o in others] == [i * i for i in range(50)]
        assert rerun_by != victim and f.info["attempts"] == 2 and f.info["worker"] == "steady"
        assert [w["name"] for w in c.status()["workers"]] == ["steady"]
    assert worker.poll() is None and not log.of("worker.lost")


def test_worker_killed_with_busy_children_leaves_no_process_and_no_shared_memory_behind(cluster, tmp_path):
    cluster.start_broker()
    worker = cluster.start_worker("--tasks", TASKS, "--slots", "2")
    cluster.wait_workers(1)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    with cluster.client() as c:
        # one child holds a large argument (an arena of shared memory), the other spins in pure Python
        c.submit("pool.gate", str(tmp_path / "started"), str(tmp_path / "never"), np.ones(1 << 20))
        c.submit("pool.forever", str(tmp_path / "spinning"))
        wait_file(tmp_path / "started")
        wait_file(tmp_path / "spinning")
        family = descendants(worker)
        assert len(family) >= 3  # the forkserver and two children at least
        cluster.kill(worker)  # SIGKILL: no chance to clean up
    assert_all_gone(family)
    if shm_before or os.path.isdir("/dev/shm"):
        leaked = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("psm_")}
        assert leaked == set()


# ==================================================================== the broker's side, pure core


def join_pool(h: Harness, wid: bytes, pool="process", killable=("sleep", "noop", "square")) -> None:
    h.core.on_worker(wid, Message(Command.READY, {"name": wid.decode(), "slots": 1, "tasks": {"sleep": {"cpu": 1}},
                                                  "pool": pool, "killable": list(killable)}), h.now)
    h.flush()


def kills(h: Harness, wid: bytes) -> list:
    return [(m.header["ids"], m.header["reason"]) for m in h.to_workers.get(wid, []) if m.command is Command.KILL]


def test_core_tells_the_worker_to_kill_a_task_past_its_timeout_and_frees_the_slot_on_its_answer():
    h = Harness()
    join_pool(h, b"w")
    t = h.submit("sleep", 100, timeout_s=1.0)
    assert h.dispatched(b"w") == [t]
    h.tick(1.5)
    assert h.state(t) is TaskState.FAILED and kills(h, b"w") == [([t], "timeout")]
    assert h.core.workers[b"w"].running  # held until the worker says the child is gone
    h.done(b"w", t, ok=False)
    assert not h.core.workers[b"w"].running
    t2 = h.submit("sleep", 1)
    assert h.dispatched(b"w") == [t2]


def test_core_retries_a_task_whose_child_died_and_fails_it_as_lost_naming_the_worker_past_its_retries():
    h = Harness()
    join_pool(h, b"w")
    t = h.submit("sleep", 1, retries=1)
    lost = [t, LOST, {"type": "ChildDied", "message": "exit code 3", "traceback": ""}, 0, 0.1]
    for attempt in (1, 2):
        assert h.dispatched(b"w") == [t] and h.core.tasks[t].attempts == attempt
        h.core.on_worker(b"w", Message(Command.DONE, {"log": [lost]}), h.now)
        h.flush()
    assert h.state(t) is TaskState.FAILED
    status, error = h.fetch()[t][1:3]
    assert status == "failed" and error["type"] == "TaskLost" and "w, w" in error["message"]
    assert b"w" in h.core.workers  # the worker itself is fine
    assert [e["reason"] for t_, e in h.events if t_ == "task.retried"] == ["lost with a child process of worker w: exit code 3"]


def test_core_terminate_cancels_a_running_task_only_where_a_child_runs_it():
    h = Harness()
    join_pool(h, b"p")
    t = h.submit("sleep", 100)
    assert h.dispatched(b"p") == [t]
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 1, "session": "s1", "ids": [t]}), h.now)
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 2, "session": "s1", "ids": [t], "terminate": True}), h.now)
    h.flush()
    replies = [m.header for _, m in h.to_clients if m.command is Command.CANCELLED]
    assert replies == [{"rid": 1, "cancelled": [], "refused": [t]}, {"rid": 2, "cancelled": [t], "refused": []}]
    assert h.state(t) is TaskState.CANCELLED and kills(h, b"p") == [([t], "cancelled")]
    assert [e["task_id"] for topic, e in h.events if topic == "task.cancelled"] == [t]
    assert h.core.counts["running"] == 0 and h.core.counts["cancelled"] == 1

    thread = Harness()
    join_pool(thread, b"t", pool="thread", killable=())
    t = thread.submit("sleep", 100)
    thread.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 1, "session": "s1", "ids": [t], "terminate": True}),
                          thread.now)
    thread.flush()
    assert thread.state(t) is TaskState.RUNNING and kills(thread, b"t") == []


# ==================================================================== the worker's side, in this process


def test_tasks_behind_a_long_one_in_a_childs_batch_go_back_and_run_on_the_other_slot(tmp_path):
    import tests.pool_tasks  # noqa: F401  (registers pool.* here too)
    from broker.protocol import pack_value
    from worker.executors import Runner
    from worker.pool import PoolOptions
    from worker.registry import REGISTRY

    gate, _ = pack_value([[str(tmp_path / "started"), str(tmp_path / "release")], {}])
    noop, _ = pack_value([[], {}])
    runner = Runner(REGISTRY, 2, {"cpu": 2}, pool=PoolOptions(("tests.pool_tasks",)))
    try:
        # queued before the children are up: the first slot takes the gate and those sent ahead behind it
        runner.submit(DispatchRecord("long", "pool.gate", gate, 0, 1, None, False), [])
        for i in range(6):
            runner.submit(DispatchRecord(f"short-{i}", "pool.pid", noop, 0, 1, None, True), [])
        done: dict = {}

        def collect():
            entries, _ = runner.take_output()
            done.update((e.task_id, e) for e in entries if not isinstance(e, str))
            return {f"short-{i}" for i in range(6)} <= set(done)

        wait_until(collect, 30, what="every short task while the long one still runs")
        assert "long" not in done
        (tmp_path / "release").touch()
        wait_until(lambda: collect() and "long" in done, 30, what="the long task")
        assert all(e.ok is True for e in done.values())
    finally:
        runner.close()


def test_a_child_handing_back_batches_at_random_moments_runs_each_task_once_in_order(monkeypatch):
    import worker.builtins  # noqa: F401
    from broker.protocol import pack_value
    from worker import pool

    monkeypatch.setattr(pool, "RELEASE_AFTER_S", 0.0001)  # ask for the rest of nearly every batch back
    slot = pool.ProcessSlot(0, pool.PoolOptions(), pool.context(()))
    blob, _ = pack_value([[], {}])
    try:
        slot.start()
        queue = [(DispatchRecord(f"t{i}", "noop", blob, 0, 1, None, True), []) for i in range(1000)]
        ran: list = []
        while queue:
            batch, queue = queue[:32], queue[32:]
            back: list = []
            slot.run(batch, lambda outcomes: ran.extend(entry.task_id for entry, _, _ in outcomes), back.extend)
            ids = [r.task_id for r, _ in batch]
            assert ran[len(ran) - (len(ids) - len(back)):] == ids[:len(ids) - len(back)]  # a prefix ran
            assert [r.task_id for r, _ in back] == ids[len(ids) - len(back):]  # the rest came back
            queue = back + queue
        assert ran == [f"t{i}" for i in range(1000)]
    finally:
        slot.close()


def test_a_child_dying_while_it_holds_results_loses_only_its_task_and_the_ones_it_held_run_again(monkeypatch):
    import tests.pool_tasks  # noqa: F401  (registers pool.* here too)
    from broker.protocol import pack_value
    from worker import pool

    # no release: on a loaded machine a child slower than 3 ms to reach the poison task would hand it
    # back (correctly) instead of dying on it, and this test is about the death
    monkeypatch.setattr(pool, "RELEASE_AFTER_S", 30.0)

    slot = pool.ProcessSlot(0, pool.PoolOptions(("tests.pool_tasks",)), pool.context(("tests.pool_tasks",)))
    noop, _ = pack_value([[], {}])
    poison, _ = pack_value([[3], {}])
    try:
        slot.start()
        held_and_lost = 0
        for attempt in range(5):
            answered: list = []
            deadline = time.monotonic() + 30
            while not answered and time.monotonic() < deadline:  # a booting child hands its first batches back
                slot.run([(DispatchRecord("warm", "noop", noop, 0, 1, None, True), [])],
                         lambda done: answered.extend(e for e, _, _ in done), lambda tasks: None)
            # no-ops finish within the child's hold time: their results wait for the next tasks
            before = [f"a{attempt}-{i}" for i in range(8)]
            after = [f"b{attempt}-{i}" for i in range(3)]
            batch = [(DispatchRecord(t, "noop", noop, 0, 1, None, True), []) for t in before]
            batch.append((DispatchRecord(f"x{attempt}", "pool.exit", poison, 0, 1, None, True), []))
            batch += [(DispatchRecord(t, "noop", noop, 0, 1, None, True), []) for t in after]
            outcomes: list = []
            back: list = []
            slot.run(batch, lambda done: outcomes.extend((entry.task_id, entry.ok) for entry, _, _ in done), back.extend)
            ran = [t for t, ok in outcomes if ok is True]
            assert [t for t, ok in outcomes if ok is not True] == [(f"x{attempt}")]
            assert dict(outcomes)[f"x{attempt}"] == LOST
            returned = [r.task_id for r, _ in back]
            assert ran + returned == before + after  # each once: answered, or back in line in order
            assert returned[-3:] == after
            held_and_lost += len(returned) > len(after)
        assert held_and_lost  # (8 no-ops take far less than the hold time: once at least, the child held them)
    finally:
        slot.close()
