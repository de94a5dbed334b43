"""A lone task on a process slot: the worker's socket thread sends it to the idle child and reads
its result itself, so the slot thread sleeps through the round trip; a child that dies meanwhile
still loses only that task, which runs again.

The worker runs on a thread of this process (tests/harness.py LocalCluster), so its slot's
methods can be counted; its child is a real process.
"""

from __future__ import annotations

import pytest

from tests.conftest import wait_until

TASKS = "tests.pool_tasks"


@pytest.fixture
def patient(monkeypatch):
    """No watched batch goes to its slot thread for running long: a loaded machine may hold a
    child off a core for milliseconds, and these tests are about who reads the result."""
    import worker.executors

    monkeypatch.setattr(worker.executors, "RELEASE_AFTER_S", 30.0)


def counted(slot, name: str, calls: list) -> None:
    """Record every call of ``slot.name`` and what it returned in ``calls``."""
    method = getattr(slot, name)

    def wrapper(*args, **kwargs):
        out = method(*args, **kwargs)
        calls.append(out)
        return out

    setattr(slot, name, wrapper)


def start_process_worker(local):
    import tests.pool_tasks  # noqa: F401  (registers pool.* in this process, where the worker runs)
    from worker.pool import PoolOptions

    worker = local.start_worker(pool="process", pool_options=PoolOptions((TASKS,)))
    with local.client() as c:
        wait_until(lambda: len(c.status()["workers"]) == 1, 30, what="the worker joined")
        c.submit("noop").result(timeout=30)  # the child said hello (read by its slot thread)
    return worker


def test_a_lone_tasks_result_is_read_and_sent_by_the_socket_thread_while_the_slot_thread_sleeps(local, patient):
    worker = start_process_worker(local)
    slot = worker.runner.children[0]
    by_socket_thread: list = []
    by_slot_thread: list = []
    wakes: list = []
    counted(slot, "read_handed", by_socket_thread)
    counted(slot, "collect", by_slot_thread)
    counted(slot, "run", by_slot_thread)
    counted(worker.runner.waker, "wake", wakes)
    with local.client() as c:
        results = [c.submit("square", i).result(timeout=30) for i in range(30)]
    assert results == [i * i for i in range(30)]
    assert by_socket_thread.count(True) == 30  # each batch of one read to its end there
    assert None not in by_socket_thread
    assert by_slot_thread == [] and wakes == []  # its slot thread never collected, nobody woke the loop


def test_a_child_that_dies_under_the_socket_threads_watch_loses_its_task_which_runs_again(local, patient, tmp_path):
    worker = start_process_worker(local)
    slot = worker.runner.children[0]
    by_socket_thread: list = []
    counted(slot, "read_handed", by_socket_thread)
    first_child = slot._proc.pid
    with local.client() as c:
        f = c.submit("pool.exit_once", str(tmp_path / "died"), retries=1)
        pid = f.result(timeout=30)
        assert f.info["attempts"] == 2
        assert c.submit("square", 7).result(timeout=30) == 49
    assert None in by_socket_thread  # the child's end was seen there first, then its slot thread took over
    assert pid != first_child and pid == worker.runner.children[0]._proc.pid  # the retry ran in its replacement


def test_a_kill_for_a_task_under_the_socket_threads_watch_goes_to_its_slot_thread_which_kills_it(local, patient,
                                                                                                tmp_path):
    from concurrent.futures import CancelledError

    worker = start_process_worker(local)
    slot = worker.runner.children[0]
    by_slot_thread: list = []
    counted(slot, "collect", by_slot_thread)
    started = tmp_path / "spinning"
    with local.client() as c:
        f = c.submit("pool.forever", str(started))
        spinner = int(wait_until(lambda: started.exists() and started.read_text(), 30, what="the task started"))
        assert by_slot_thread == []  # watched by the socket thread (no deadline here)
        assert c.cancel(f, terminate=True) is True
        with pytest.raises(CancelledError):
            f.result(timeout=10)
        assert c.submit("square", 4).result(timeout=30) == 16
    assert len(by_slot_thread) == 1 and spinner != worker.runner.children[0]._proc.pid
