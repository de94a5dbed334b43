"""Chaos tests on real processes: kill workers and the broker mid-batch, poison tasks, GIL hogs.

Every test checks each result and counts completion events per task id. Tasks
from tests/reliability_tasks.py append to a file each time they run, so a test
also knows how often each task really executed: more than once only where the
worker holding it died.
"""

from __future__ import annotations

import signal
import socket
import time
from collections import Counter

import pytest
import structlog

from client import TaskLost
from tests.conftest import TEST_HEARTBEAT_S, TEST_LIVENESS, wait_until
from tests.reliability_tasks import executions

pytestmark = pytest.mark.slow

TASKS = "tests.reliability_tasks"
#: how long the broker waits before declaring a silent worker dead, in these tests
SILENCE_S = TEST_HEARTBEAT_S * TEST_LIVENESS
#: liveness for tests where no worker may be declared dead: a loaded 2-core machine can
#: starve a process for a second, and that must not decide the test
PATIENT = 15


def per_id(log, topic: str) -> Counter:
    return Counter(e["task_id"] for e in log.of(topic))


def live_names(client) -> set:
    return {w["name"] for w in client.status()["workers"]}


def submit_batch(c, path, n: int, seconds: float, **options) -> dict:
    """Submit ``rel.record(path, i, seconds)`` for i in range(n); returns {task_id: (i, future)}."""
    futures = [c.submit("rel.record", str(path), i, seconds, **options) for i in range(n)]
    return {f.task_id: (i, f) for i, f in enumerate(futures)}


def assert_each_result_once(batch: dict, log, timeout: float) -> None:
    """Every future returns its own i; every id has exactly one task.succeeded and no task.failed."""
    for task_id, (i, f) in batch.items():
        assert f.result(timeout=timeout) == i
    wait_until(lambda: set(per_id(log, "task.succeeded")) >= set(batch), 10, what="every task.succeeded event")
    succeeded = per_id(log, "task.succeeded")
    assert {t: n for t, n in succeeded.items() if n != 1} == {}
    assert set(succeeded) == set(batch)
    assert per_id(log, "task.failed") == Counter()


def reruns(path, batch: dict) -> set:
    """Task ids that ran more than once."""
    runs = executions(path)
    assert set(runs) == {i for i, _ in batch.values()}, "a task never ran"
    by_i = {i: t for t, (i, _) in batch.items()}
    return {by_i[i] for i, pids in runs.items() if len(pids) > 1}


def test_worker_killed_mid_batch_loses_nothing_and_completes_each_task_once(cluster, events, tmp_path):
    cluster.start_broker()
    workers = [cluster.start_worker("--tasks", TASKS, "--slots", "2") for _ in range(3)]
    cluster.wait_workers(3)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    with cluster.client() as c:
        batch = submit_batch(c, path, 300, 0.01)
        wait_until(lambda: len(log.of("task.succeeded")) >= 60, 30, what="a fifth of the batch done")
        victim = workers[1]
        cluster.kill(victim)
        # its own loss, holding tasks mid-batch: a worker that redialled while the broker was still
        # starting (a loaded machine) leaves an earlier, empty worker.lost of its first registration
        victim_name = f"{socket.gethostname()}-{victim.pid}"
        lost = log.wait_for("worker.lost", lambda e: e["worker"] == victim_name and e["requeued"], timeout=15)
        assert_each_result_once(batch, log, timeout=30)
    # a task ran again only where the worker holding it died with it
    assert reruns(path, batch) <= set(lost["requeued"])
    retried = {e["task_id"] for e in log.of("task.retried")}
    assert retried == set(lost["requeued"])


def test_worker_killed_with_short_tasks_waiting_ahead_of_it_loses_none(cluster, events, tmp_path):
    # tasks this short are sent ahead to busy workers: a dead worker takes those with it too
    cluster.start_broker()
    workers = [cluster.start_worker("--tasks", TASKS) for _ in range(3)]
    cluster.wait_workers(3)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    with cluster.client() as c:
        batch = submit_batch(c, path, 3000, 0.001)  # 1 ms: short enough to be sent ahead
        wait_until(lambda: len(log.of("task.succeeded")) >= 600, 30, what="a fifth of the batch done")
        cluster.kill(workers[0])
        lost = log.wait_for("worker.lost", timeout=15)
        assert len(lost["requeued"]) > 1, "a one-slot worker runs one task: the others waited ahead of it"
        assert_each_result_once(batch, log, timeout=60)
    assert reruns(path, batch) <= set(lost["requeued"])


def test_sigterm_worker_with_short_tasks_waiting_ahead_hands_them_back_and_none_runs_twice(cluster, events, tmp_path):
    cluster.start_broker()
    workers = [cluster.start_worker("--tasks", TASKS) for _ in range(2)]
    cluster.wait_workers(2)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    with cluster.client() as c:
        batch = submit_batch(c, path, 3000, 0.001)  # 1 ms: short enough to be sent ahead
        wait_until(lambda: len(log.of("task.succeeded")) >= 600, 30, what="a fifth of the batch done")
        cluster.kill(workers[0], signal.SIGTERM)
        log.wait_for("worker.left", timeout=15)
        assert_each_result_once(batch, log, timeout=60)
    assert workers[0].returncode == 0 and not log.of("worker.lost")
    assert reruns(path, batch) == set(), "a worker that stops gracefully hands back unstarted work only"


def test_result_finished_while_the_broker_was_down_reaches_its_successor_after_a_long_outage(cluster, tmp_path):
    # liveness 3: the worker redials every few hundred ms, each redial a fresh socket whose queue dies
    # with it; the result it finished meanwhile must survive them all and not be run again
    journal = str(tmp_path / "j.db")
    cluster.start_broker("--journal", journal, liveness=3)
    cluster.start_worker("--tasks", TASKS, "--name", "steady", liveness=3)
    cluster.wait_workers(1)
    path = tmp_path / "runs"
    with cluster.client(timeout=1.0, retries=30) as c:
        f = c.submit("rel.record", str(path), 0, 1.0)
        wait_until(lambda: c.status()["running"] == 1, 10, what="the task to start")
        cluster.kill(cluster.broker)
        wait_until(lambda: executions(path), 10, what="the task to finish with no broker")
        time.sleep(4.0)  # the outage: the worker's reconnect backoff reaches its cap meanwhile
        cluster.start_broker("--journal", journal, liveness=3)
        assert f.result(timeout=30) == 0
    assert executions(path) == {0: [executions(path)[0][0]]}, "finished once; the worker never died"


def test_workers_killed_every_second_during_a_long_batch_while_replacements_join(cluster, events, tmp_path):
    cluster.start_broker("--max-retries", "10")
    names = iter(f"chaos-{k}" for k in range(100))
    workers = {(n := next(names)): cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", n) for _ in range(3)}
    cluster.wait_workers(3)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    kills = []
    with cluster.client() as c:
        batch = submit_batch(c, path, 600, 0.02)
        for fraction in (0.1, 0.3, 0.5, 0.7):
            wait_until(lambda: len(log.of("task.succeeded")) >= fraction * len(batch), 60, what=f"{fraction:.0%} done")
            if kills:
                time.sleep(max(0.0, kills[-1][1] + 1.0 - time.monotonic()))  # about a second between kills
            victim = next(iter(workers))  # the oldest: it has surely joined
            wait_until(lambda: victim in live_names(c), 15, what=f"{victim} live")
            cluster.kill(workers.pop(victim))
            kills.append((victim, time.monotonic()))
            n = next(names)
            workers[n] = cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", n)
        assert_each_result_once(batch, log, timeout=60)
        killed = {name for name, _ in kills}
        wait_until(lambda: {e["worker"] for e in log.of("worker.lost")} >= killed, 15, what="every kill noticed")
    lost = log.of("worker.lost")
    # on a loaded machine a starved replacement may be declared dead too: that costs a requeue, never a result
    assert {e["worker"] for e in lost} >= killed
    assert reruns(path, batch) <= {t for e in lost for t in e["requeued"]}


def test_broker_killed_mid_batch_restarts_on_its_journal_and_every_task_completes_once(cluster, events, tmp_path):
    journal = str(tmp_path / "j.db")
    cluster.start_broker("--journal", journal, liveness=PATIENT)
    workers = [cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", f"steady-{k}", liveness=PATIENT)
               for k in range(2)]
    cluster.wait_workers(2)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    # patient enough for the broker to come back: its retries span many of its timeouts
    with cluster.client(timeout=1.0, retries=20) as c:
        batch = submit_batch(c, path, 300, 0.02)
        wait_until(lambda: len(log.of("task.succeeded")) >= 60, 30, what="a fifth of the batch done")
        cluster.kill(cluster.broker)
        cluster.start_broker("--journal", journal, liveness=PATIENT)
        for task_id, (i, f) in batch.items():
            assert f.result(timeout=60) == i
        # the same worker processes, never restarted, joined the new broker and served it
        assert all(w.poll() is None for w in workers)
        assert live_names(c) == {"steady-0", "steady-1"}
        assert {f.info["worker"] for _, f in batch.values()} <= {"steady-0", "steady-1"}
    succeeded = per_id(log, "task.succeeded")
    assert {t: n for t, n in succeeded.items() if n > 1} == {}
    assert not log.of("task.failed") and not log.of("worker.lost")
    assert reruns(path, batch) == set(), "no worker died, so no task may run twice"


def test_sigterm_worker_mid_batch_finishes_its_tasks_and_leaves_without_losing_any(cluster, events, tmp_path):
    cluster.start_broker(liveness=PATIENT)
    leaving = cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", "leaving", liveness=PATIENT)
    cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", "staying", liveness=PATIENT)
    cluster.wait_workers(2)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    with cluster.client() as c:
        batch = submit_batch(c, path, 30, 0.2)
        wait_until(lambda: any(e["worker"] == "leaving" for e in log.of("task.started")), 10, what="leaving busy")
        cluster.kill(leaving, signal.SIGTERM)
        assert leaving.returncode == 0
        log.wait_for("worker.left", lambda e: e["worker"] == "leaving")
        assert_each_result_once(batch, log, timeout=30)
        assert live_names(c) == {"staying"}
    assert not log.of("worker.lost")
    assert reruns(path, batch) == set()


def test_sigterm_worker_past_its_drain_timeout_hands_back_what_it_holds_for_an_immediate_requeue(cluster, events, tmp_path):
    cluster.start_broker(liveness=PATIENT)
    leaving = cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", "leaving", "--drain-timeout", "0.1",
                                   liveness=PATIENT)
    cluster.wait_workers(1)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    with cluster.client() as c:
        batch = submit_batch(c, path, 6, 2.0)
        wait_until(lambda: len(log.of("task.started")) == 2, 10, what="leaving busy with two tasks")
        held = {e["task_id"] for e in log.of("task.started")}
        cluster.kill(leaving, signal.SIGTERM)
        assert leaving.returncode == 0
        log.wait_for("worker.left", lambda e: e["worker"] == "leaving")
        handed_back = {e["task_id"] for e in log.of("task.retried") if "handed back by leaving" in e["reason"]}
        assert handed_back == held
        cluster.start_worker("--tasks", TASKS, "--slots", "6", "--name", "taker", liveness=PATIENT)
        assert_each_result_once(batch, log, timeout=30)
        assert {f.info["attempts"] for t, (_, f) in batch.items() if t in held} == {2}
    assert not log.of("worker.lost")
    assert reruns(path, batch) == set()  # the abandoned runs never finished


def test_task_that_kills_its_worker_fails_with_task_lost_naming_them_while_others_are_served(cluster, events):
    # on thread slots the task runs in the worker process itself: the worker dies with it
    # (on process slots only a child dies: tests/test_pool.py)
    cluster.start_broker()
    for name in ("victim-a", "victim-b"):
        cluster.start_worker("--tasks", TASKS, "--name", name, "--pool", "thread")
    cluster.start_worker("--name", "bystander")  # built-ins only: never gets rel.crash
    cluster.wait_workers(3)
    log = events("task.", "worker.")
    with cluster.client() as c:
        poison = c.submit("rel.crash", retries=1)
        served, deadline = 0, time.monotonic() + 30
        while not poison.done() and time.monotonic() < deadline:
            assert c.submit("square", served).result(timeout=10) == served * served
            served += 1
            time.sleep(0.01)
        with pytest.raises(TaskLost) as info:
            poison.result(timeout=1)
        assert "victim-a" in str(info.value) and "victim-b" in str(info.value)
        assert c.submit("square", 12).result(timeout=10) == 144
        assert live_names(c) == {"bystander"}
    lost = log.of("worker.lost")
    assert {e["worker"] for e in lost} == {"victim-a", "victim-b"}
    failed = log.of("task.failed")
    assert [e["task_id"] for e in failed] == [poison.task_id]
    # squares kept being answered while the poison task took down one worker after the other
    assert any(lost[0]["seq"] < e["seq"] < failed[0]["seq"] for e in log.of("task.succeeded"))


def test_worker_running_gil_holding_python_keeps_heartbeating_and_is_not_declared_dead(cluster, events):
    cluster.start_broker()
    cluster.start_worker("--tasks", TASKS, "--name", "spinner", "--pool", "thread")  # the GIL of the worker itself
    cluster.wait_workers(1)
    log = events("worker.")
    spin_s = 4 * SILENCE_S
    ages = []
    with cluster.client() as c:
        f = c.submit("rel.spin", spin_s)
        deadline = time.monotonic() + spin_s * 10
        while not f.done() and time.monotonic() < deadline:
            for w in c.status()["workers"]:
                if w["name"] == "spinner" and w["running"]:
                    ages.append(w["heartbeat_age_s"])
            time.sleep(0.02)
        assert f.result(timeout=10) > 0
        assert live_names(c) == {"spinner"}
    assert not log.of("worker.lost")
    assert len(ages) > 10
    print(f"\nGIL hog: {spin_s:.1f} s of pure Python; heartbeat {TEST_HEARTBEAT_S} s x liveness {TEST_LIVENESS}; "
          f"{len(ages)} samples; max heartbeat age {max(ages):.3f} s (dead at {SILENCE_S:.1f} s)")
    assert max(ages) < SILENCE_S


def test_late_result_from_a_worker_declared_dead_does_not_complete_the_task_twice(cluster, events, tmp_path):
    cluster.start_broker()
    frozen = cluster.start_worker("--tasks", TASKS, "--name", "frozen")
    cluster.wait_workers(1)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    with cluster.client() as c:
        f = c.submit("rel.record", str(path), 0, 1.0)
        log.wait_for("task.started", lambda e: e["worker"] == "frozen")
        frozen.send_signal(signal.SIGSTOP)  # busy or cut off: silent past heartbeat x liveness
        try:
            log.wait_for("worker.lost", lambda e: e["worker"] == "frozen" and e["requeued"] == [f.task_id])
            cluster.start_worker("--tasks", TASKS, "--name", "rescuer")
            log.wait_for("task.started", lambda e: e["worker"] == "rescuer")
        finally:
            frozen.send_signal(signal.SIGCONT)
        assert f.result(timeout=20) == 0
        assert f.info["worker"] == "rescuer" and f.info["attempts"] == 2
        # both ran it to the end; the frozen one's result came late and was ignored
        wait_until(lambda: len(executions(path).get(0, ())) == 2, 10, what="the frozen worker's late run")
        log.wait_for("worker.joined", lambda e: e["worker"] == "frozen")  # it announced itself again
        c.status()  # one more round trip: anything the late result caused has happened
    assert per_id(log, "task.succeeded") == Counter({f.task_id: 1})
    assert not log.of("task.failed")


def test_client_resending_after_a_timeout_does_not_duplicate_tasks(cluster, events, tmp_path):
    broker = cluster.start_broker(liveness=PATIENT)
    cluster.start_worker("--tasks", TASKS, "--slots", "2", liveness=PATIENT)
    cluster.wait_workers(1)
    log = events("task.")
    path = tmp_path / "runs"
    with cluster.client(timeout=0.3, retries=20) as c, structlog.testing.capture_logs() as logs:
        c.status()  # connected
        broker.send_signal(signal.SIGSTOP)  # the broker hears the SUBMIT but cannot answer in time
        try:
            batch = submit_batch(c, path, 20, 0.0)
            wait_until(lambda: sum(e["event"] == "broker_silent_resending" for e in logs) >= 2, 10,
                       what="the client resending on fresh sockets")
        finally:
            broker.send_signal(signal.SIGCONT)
        assert_each_result_once(batch, log, timeout=30)
    assert per_id(log, "task.submitted") == Counter({t: 1 for t in batch})
    assert per_id(log, "task.started") == Counter({t: 1 for t in batch})
    assert reruns(path, batch) == set()


def test_idempotency_keys_and_results_survive_broker_restarts(cluster, events, tmp_path):
    journal = str(tmp_path / "j.db")
    broker = cluster.start_broker("--journal", journal, liveness=PATIENT)
    # thread slots: the task runs in the worker process, whose pid proves it never restarted
    worker = cluster.start_worker("--tasks", TASKS, "--name", "keeper", "--pool", "thread", liveness=PATIENT)
    cluster.wait_workers(1)
    path = tmp_path / "runs"
    with cluster.client(timeout=1.0, retries=20) as c:
        assert c.submit("rel.record", str(path), 7, key="once").result(timeout=10) == 7
        cluster.kill(broker, signal.SIGTERM)  # graceful: tells the worker, flushes the journal
        assert broker.returncode == 0
        broker = cluster.start_broker("--journal", journal, liveness=PATIENT)
        log = events("task.")
        wait_until(lambda: "keeper" in live_names(c), 15, what="the worker back, never restarted")
        again = c.submit("rel.record", str(path), 7, key="once")
        assert again.result(timeout=10) == 7
        cluster.kill(broker)  # kill -9 this time
        cluster.start_broker("--journal", journal, liveness=PATIENT)
        with cluster.client(timeout=1.0, retries=20) as other:  # another client, same key
            assert other.submit("rel.record", str(path), 7, key="once").result(timeout=30) == 7
        assert worker.poll() is None  # the same worker process throughout
    assert executions(path) == {7: [worker.pid]}
    assert not log.of("task.submitted") and not log.of("task.started")
