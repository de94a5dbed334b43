"""The pure core's resource accounting with a fake clock: counted capacity held, returned, admitted."""

from __future__ import annotations

import random

import pytest

from broker.protocol import Command, Message
from broker.states import TaskState
from tests.harness import Harness

GPU_TASKS = {"noop": {"cpu": 1}, "fake.gpu": {"gpu": 1}, "frac": {"acc": 0.1}}


@pytest.fixture
def h():
    return Harness()


def advance(h: Harness, seconds: float, alive: list) -> None:
    """Let fake time pass in heartbeat-sized steps; only the workers in ``alive`` heartbeat."""
    for _ in range(round(seconds / 0.1)):
        for wid in alive:
            h.core.on_worker(wid, Message(Command.HEARTBEAT, {}), h.now)
        h.tick(0.1)


def test_fractional_holds_leave_no_float_drift_in_free_capacity(h):
    h.join(b"w", slots=100, tasks=GPU_TASKS, resources={"acc": 1})
    worker = h.core.workers[b"w"]
    rng = random.Random(1)
    for _ in range(50):
        ids = [h.submit("frac", resources={"acc": rng.choice([0.1, 0.2, 0.3, 0.7])}) for _ in range(6)]
        while any(h.state(t) is not TaskState.SUCCEEDED for t in ids):
            running = list(worker.running)
            h.done(b"w", rng.choice(running))
            if worker.running:  # mid-way, free is what the held tasks leave, to the last decimal
                assert worker.free["acc"] == round(1 - sum(n["acc"] for n in worker.running.values()), 9)
        assert worker.free == worker.resources
    whole = h.submit("frac", resources={"acc": 1})
    assert h.state(whole) is TaskState.RUNNING


def test_gpu_task_waits_for_the_gpu_while_cpu_tasks_use_the_other_slots(h):
    h.join(b"g", slots=4, tasks=GPU_TASKS, resources={"gpu": 1})
    first, second = h.submit("fake.gpu"), h.submit("fake.gpu")
    cpu = [h.submit("noop") for _ in range(3)]
    assert h.state(first) is TaskState.RUNNING and h.state(second) is TaskState.QUEUED
    assert all(h.state(t) is TaskState.RUNNING for t in cpu)
    assert h.core.workers[b"g"].free == {"cpu": 1, "gpu": 0}
    h.done(b"g", first)
    assert h.state(second) is TaskState.RUNNING


def test_gpu_mem_is_admitted_against_what_is_free(h):
    h.join(b"g", slots=4, tasks=GPU_TASKS, resources={"gpu": 4, "gpu_mem": 8_000_000_000})
    a = h.submit("fake.gpu", resources={"gpu": 1, "gpu_mem": 5e9})
    b = h.submit("fake.gpu", resources={"gpu": 1, "gpu_mem": 5e9})
    c = h.submit("fake.gpu", resources={"gpu": 1, "gpu_mem": 3e9})
    assert [h.state(t) for t in (a, b, c)] == [TaskState.RUNNING, TaskState.QUEUED, TaskState.RUNNING]
    h.done(b"g", a)
    h.done(b"g", c)
    assert h.state(b) is TaskState.RUNNING
    h.done(b"g", b)
    assert h.core.workers[b"g"].free == {"cpu": 4, "gpu": 4, "gpu_mem": 8_000_000_000}


def test_resources_of_a_dead_workers_tasks_go_with_them_and_the_task_runs_elsewhere(h):
    h.join(b"a", tasks=GPU_TASKS, resources={"gpu": 1})
    t = h.submit("fake.gpu")
    assert h.state(t) is TaskState.RUNNING
    h.join(b"b", tasks=GPU_TASKS, resources={"gpu": 1})
    advance(h, 4.0, alive=[b"b"])  # a stays silent past heartbeat x liveness
    assert b"a" not in h.core.workers
    assert h.core.tasks[t].worker == b"b" and h.state(t) is TaskState.RUNNING
    h.done(b"b", t)
    snap = h.core.snapshot(h.now)
    assert [w["free"] for w in snap["workers"]] == [w["resources"] for w in snap["workers"]]


def test_unoffered_resource_fails_after_the_timeout_naming_it(h):
    h.join(b"g", tasks=GPU_TASKS, resources={"gpu": 1, "gpu_mem": 8e9})
    t = h.submit("fake.gpu", resources={"gpu": 1, "gpu_mem": 16e9})
    advance(h, h.core.no_worker_timeout_s + 0.5, alive=[b"g"])
    assert h.state(t) is TaskState.FAILED
    error = h.fetch()[t][2]
    assert "gpu_mem" in error["message"] and "gpu=" not in error["message"]
