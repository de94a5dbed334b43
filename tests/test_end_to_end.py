"""End to end: a real broker, workers and the Python client over loopback TCP; on threads of this
process where no test kills anything (``local``), as processes where one must (``cluster``)."""

from __future__ import annotations

import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from client import BrokerUnavailable, Client, EncodeError, TaskError, TaskLost, TaskTimeout
from tests.conftest import silent_endpoints, wait_until


@pytest.fixture
def running(local):
    local.start_worker(slots=2)
    local.start_worker(slots=2)
    local.wait_workers(2)
    return local


def test_square_returns_its_result_with_info(running):
    with running.client() as c:
        f = c.submit("square", 7)
        assert f.result(timeout=10) == 49
        assert f.info["attempts"] == 1
        assert f.info["worker"] in {w["name"] for w in c.status()["workers"]}
        assert f.info["run_s"] >= 0 and f.info["queued_s"] >= 0


def test_map_of_thousands_returns_every_result_in_order(running):
    with running.client() as c:
        assert c.map("square", range(5000)) == [i * i for i in range(5000)]


def test_map_holds_the_tasks_in_flight_not_every_finished_one(running):
    import gc

    from client.outcomes import MapItem  # a map's handle of each task in flight (a future's stand-in)

    most = 0

    def items():
        nonlocal most
        for i in range(3000):
            if i % 500 == 499:
                gc.collect()  # what only a reference cycle keeps alive does not count
                most = max(most, sum(1 for o in gc.get_objects() if type(o) is MapItem))
            yield i

    with running.client() as c:
        assert c.map("square", items(), max_in_flight=50) == [i * i for i in range(3000)]
    assert 0 < most <= 60, f"{most} tasks held at once with 50 in flight"


def test_a_failing_map_submits_nothing_more_and_raises_the_first_failure_in_input_order(running):
    with running.client() as c:
        ran = []

        def items():
            for i in range(2000):
                ran.append(i)
                yield "x" if i in (30, 31) else 0

        with pytest.raises(TaskError):
            c.map("sleep", items(), max_in_flight=10)
        assert len(ran) < 2000  # stopped submitting after the failure


@pytest.mark.parametrize("dtype", ["float64", "float32", "int8", "uint16", "int64", "complex128", "bool"])
def test_arrays_of_every_dtype_round_trip(running, dtype):
    rng = np.random.default_rng(1)
    a = (rng.random((3, 5, 7)) * 100).astype(dtype)
    with running.client() as c:
        out = c.submit("echo", a).result(timeout=10)
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


def test_fortran_ordered_zero_d_and_empty_arrays_round_trip(running):
    values = [np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.array(3.5), np.zeros((0, 4)),
              np.arange(10)[::2], {"nested": [np.arange(3), {"deep": np.ones((2, 2), np.float32)}]}]
    with running.client() as c:
        outs = c.gather([c.submit("echo", v) for v in values], timeout=20)
    np.testing.assert_array_equal(outs[0], values[0])
    assert outs[1].shape == () and outs[1] == 3.5
    assert outs[2].shape == (0, 4)
    np.testing.assert_array_equal(outs[3], np.arange(0, 10, 2))
    np.testing.assert_array_equal(outs[4]["nested"][1]["deep"], np.ones((2, 2)))


def test_a_64_mib_array_goes_through_and_is_summed(running):
    a = np.ones(8 * 1024 * 1024)  # 64 MiB of float64
    with running.client(timeout=10) as c:
        assert c.submit("sum", a).result(timeout=60) == float(a.size)
        np.testing.assert_array_equal(c.submit("matmul", np.eye(3), np.arange(9.0).reshape(3, 3)).result(10),
                                      np.arange(9.0).reshape(3, 3))


def test_remote_exception_carries_type_message_and_traceback(running):
    with running.client() as c:
        f = c.submit("sleep", "not a number")
        with pytest.raises(TaskError) as info:
            f.result(timeout=10)
    err = info.value
    assert err.type == "ValueError"
    assert "could not convert string to float" in err.message
    assert str(err) == f"ValueError: {err.message}"
    assert "Traceback" in err.traceback and "sleep" in err.traceback


def test_unknown_task_name_fails_after_no_worker_timeout_naming_the_task(running):
    with running.client() as c:
        f = c.submit("no_such_task", 1)
        with pytest.raises(TaskError) as info:
            f.result(timeout=15)
    assert "no_such_task" in str(info.value)
    assert info.value.type == "NoWorkerAvailable"


def test_unencodable_argument_fails_immediately(running):
    with running.client() as c:
        with pytest.raises(EncodeError, match="object"):
            c.submit("echo", object())
        with pytest.raises(EncodeError, match="dtype"):
            c.submit("echo", np.array(["a", "b"], dtype=object))
        assert c.submit("echo", 1).result(timeout=10) == 1  # the client still works


def test_cancel_of_a_queued_task_means_it_never_runs(running, events):
    log = events("task.")
    with running.client() as c:
        blockers = [c.submit("sleep", 1.0) for _ in range(4)]  # fill all four slots
        wait_until(lambda: len(log.of("task.started")) == 4, what="four blockers running")
        queued = c.submit("square", 3)
        log.wait_for("task.submitted", lambda f: f["task_id"] == queued.task_id)
        assert c.cancel(queued) is True
        with pytest.raises(CancelledError):
            queued.result(timeout=5)
        assert c.cancel(blockers[0]) is False  # running: not interrupted
        assert c.gather(blockers, timeout=20) == [1.0] * 4
    log.wait_for("task.cancelled", lambda f: f["task_id"] == queued.task_id)
    assert not [e for e in log.of("task.started") if e["task_id"] == queued.task_id]


def test_cancel_right_after_submit_still_reaches_the_broker_and_is_published(cluster, events):
    cluster.start_broker()  # no worker: the task can only wait in the queue
    log = events("task.")
    with cluster.client() as c:
        f = c.submit("square", 3)
        assert c.cancel(f) is True
        with pytest.raises(CancelledError):
            f.result(timeout=5)
    log.wait_for("task.cancelled", lambda e: e["task_id"] == f.task_id)


def test_running_task_is_not_cancelled(running, events):
    log = events("task.started")
    with running.client() as c:
        f = c.submit("sleep", 0.5)
        log.wait_for("task.started", lambda e: e["task_id"] == f.task_id)
        assert c.cancel(f) is False
        assert f.result(timeout=10) == 0.5


def test_task_past_its_timeout_raises_task_timeout(running):
    with running.client() as c:
        f = c.submit("sleep", 3, timeout=0.3)
        with pytest.raises(TaskTimeout):
            f.result(timeout=10)
        assert c.submit("square", 2).result(timeout=10) == 4


def test_priority_runs_higher_first(cluster, events):
    cluster.start_broker()
    log = events("task.started")
    with cluster.client() as c:
        low = [c.submit("noop", i) for i in range(20)]
        high = [c.submit("noop", i, priority=5) for i in range(5)]
        wait_until(lambda: c.status()["queued"] == 25, what="all 25 queued before any worker")
        cluster.start_worker()
        c.gather(low + high, timeout=30)
    wait_until(lambda: len(log.of("task.started")) == 25, what="every task.started event")  # events trail results
    order = [e["task_id"] for e in sorted(log.of("task.started"), key=lambda e: e["seq"])]
    assert set(order[:5]) == {f.task_id for f in high}
    assert order[5:] == [f.task_id for f in low]  # FIFO within a priority


def test_idempotency_key_runs_once_and_returns_the_same_result(running, events):
    log = events("task.")
    with running.client() as c:
        a = c.submit("square", 9, key="k-1")
        b = c.submit("square", 9, key="k-1")
        assert a.result(10) == b.result(10) == 81
    with running.client() as other:
        assert other.submit("square", 9, key="k-1").result(10) == 81
        barrier = other.submit("square", 1)  # events arrive in order: once its are in, all earlier are
        barrier.result(10)
    log.wait_for("task.succeeded", lambda e: e["task_id"] == barrier.task_id)
    assert len(log.of("task.submitted")) == 2
    assert len(log.of("task.succeeded")) == 2


def test_client_used_from_many_threads(running):
    from concurrent.futures import ThreadPoolExecutor

    with running.client() as c, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: c.submit("square", i).result(timeout=20), range(400)))
    assert results == [i * i for i in range(400)]


def test_broker_down_raises_broker_unavailable_without_hanging():
    with silent_endpoints() as [address], Client(address, timeout=0.3, retries=2) as c:
        started = time.monotonic()
        f = c.submit("square", 2)
        with pytest.raises(BrokerUnavailable):
            f.result(timeout=10)
        with pytest.raises(BrokerUnavailable):
            c.status()
    assert time.monotonic() - started < 8


def test_tasks_of_a_broker_restarted_without_a_journal_fail_instead_of_waiting_forever(cluster):
    cluster.start_broker()  # no --journal, no worker: the task waits in the queue
    with cluster.client(timeout=1.0, retries=10) as c:
        f = c.submit("square", 3)
        wait_until(lambda: c.status()["queued"] == 1, what="the task accepted")
        cluster.kill(cluster.broker)
        cluster.start_broker()
        with pytest.raises(TaskLost, match="without a journal"):
            f.result(timeout=30)
        assert c.status()["queued"] == 0  # the new broker never had it; the client goes on with it


def test_a_second_worker_with_a_taken_name_is_refused_and_exits(cluster):
    cluster.start_broker()
    first = cluster.start_worker("--name", "only-one")
    cluster.wait_workers(1)
    second = cluster.start_worker("--name", "only-one")
    assert second.wait(timeout=20) == 2
    assert first.poll() is None
    with cluster.client() as c:
        assert [w["name"] for w in c.status()["workers"]] == ["only-one"]
        assert c.submit("square", 4).result(timeout=10) == 16


def test_map_and_gather_put_errors_in_place_with_return_exceptions(running):
    with running.client() as c:
        out = c.map("sleep", [0, "x", 0], return_exceptions=True)
        assert out[0] == 0 and out[2] == 0 and isinstance(out[1], TaskError)
        out = c.gather([c.submit("square", 3), c.submit("sleep", "y")], timeout=10, return_exceptions=True)
        assert out[0] == 9 and isinstance(out[1], TaskError)


def test_closing_a_client_cancels_its_queued_tasks_without_a_key_unless_told_not_to(cluster, events):
    cluster.start_broker()  # no worker: every task stays queued
    log = events("task.")
    with cluster.client() as c:
        plain, keyed = c.submit("square", 1), c.submit("square", 2, key="stays")
        wait_until(lambda: c.status()["queued"] == 2, what="both tasks accepted")
    assert plain.cancelled()
    log.wait_for("task.cancelled", lambda e: e["task_id"] == plain.task_id)
    with cluster.client(cancel_on_close=False) as c:
        kept = c.submit("square", 3)
        wait_until(lambda: c.status()["queued"] == 2, what="the task accepted")
    with cluster.client() as c:
        assert c.status()["queued"] == 2  # the keyed one, and the one of cancel_on_close=False
    assert [e["task_id"] for e in log.of("task.cancelled")] == [plain.task_id]
    assert kept.task_id != keyed.task_id
