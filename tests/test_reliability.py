"""Chaos tests on real processes: kill workers and the broker mid-batch, poison tasks, GIL hogs.

Every test checks each result and counts completion events per task id. Tasks
from tests/reliability_tasks.py append to a file each time they run, so a test
also knows how often each task really executed: more than once only where the
worker holding it died.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.conftest import TEST_HEARTBEAT_S, TEST_LIVENESS, wait_until
from tests.reliability_tasks import executions

pytestmark = pytest.mark.slow

TASKS = "tests.reliability_tasks"
#: how long the broker waits before declaring a silent worker dead, in these tests
SILENCE_S = TEST_HEARTBEAT_S * TEST_LIVENESS


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


def test_broker_killed_mid_batch_restarts_on_its_journal_and_every_task_completes_once(cluster, events, tmp_path):
    journal = str(tmp_path / "j.db")
    cluster.start_broker("--journal", journal)
    workers = [cluster.start_worker("--tasks", TASKS, "--slots", "2", "--name", f"steady-{k}") for k in range(2)]
    cluster.wait_workers(2)
    log = events("task.", "worker.")
    path = tmp_path / "runs"
    # patient enough for the broker to come back: its retries span many of its timeouts
    with cluster.client(timeout=1.0, retries=20) as c:
        batch = submit_batch(c, path, 300, 0.02)
        wait_until(lambda: len(log.of("task.succeeded")) >= 60, 30, what="a fifth of the batch done")
        cluster.kill(cluster.broker)
        cluster.start_broker("--journal", journal)
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
