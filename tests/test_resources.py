"""Resource-aware routing on real processes, no GPU needed: workers declare ``--resources gpu=1``.

Such a worker is routed GPU tasks as if it drove a GPU, but runs them on its CPU
slots with numpy arguments (SPEC, worker flags). The tasks live in tests/gpu_tasks.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from client import TaskError
from tests.conftest import ROOT, wait_until

GPU_TASKS = "tests.gpu_tasks"


def start_gpu_worker(cluster, name: str, *extra: str, resources: str = "gpu=1"):
    return cluster.start_worker("--tasks", GPU_TASKS, "--resources", resources, "--name", name, *extra)


def start_cpu_worker(cluster, name: str, *extra: str):
    """A worker that serves the GPU task names but offers no GPU."""
    return cluster.start_worker("--tasks", GPU_TASKS, "--name", name, *extra)


def finished(log, futures) -> list[dict]:
    """Wait for the task.succeeded event of every future; return the started and succeeded events."""
    ids = {f.task_id for f in futures}
    wait_until(lambda: {e["task_id"] for e in log.of("task.succeeded")} >= ids, what="task.succeeded of every task")
    return [(t, e) for t, e in log.events if t in ("task.started", "task.succeeded") and e.get("task_id") in ids]


def peak_running(events: list) -> int:
    """Most of these tasks running at once, from the broker's started/succeeded events in seq order."""
    running = peak = 0
    for topic, _ in sorted(events, key=lambda te: te[1]["seq"]):
        running += 1 if topic == "task.started" else -1
        peak = max(peak, running)
    return peak


def test_a_single_gpu_never_runs_two_gpu_tasks_at_once_while_cpu_slots_stay_usable(cluster, events):
    cluster.start_broker()
    start_gpu_worker(cluster, "gpu-a", "--slots", "4")
    cluster.wait_workers(1)
    log = events("task.")
    with cluster.client() as c:
        gpu = [c.submit("fake.gpu", 0.05) for _ in range(6)]
        cpu = [c.submit("square", i) for i in range(8)]
        assert c.gather(cpu, timeout=30) == [i * i for i in range(8)]
        pids = c.gather(gpu, timeout=30)
    assert len(set(pids)) == 1
    assert peak_running(finished(log, gpu)) == 1


def test_gpu_tasks_only_go_to_workers_that_offer_a_gpu(cluster, events):
    cluster.start_broker()
    start_cpu_worker(cluster, "cpu-only", "--slots", "4")
    start_gpu_worker(cluster, "gpu-a")
    cluster.wait_workers(2)
    log = events("task.")
    with cluster.client() as c:
        gpu = [c.submit("fake.gpu", 0.01) for _ in range(8)]
        cpu = [c.submit("square", i) for i in range(8)]
        c.gather(gpu + cpu, timeout=30)
    assert {f.info["worker"] for f in gpu} == {"gpu-a"}
    finished(log, gpu)
    ids = {f.task_id for f in gpu}
    assert {e["worker"] for e in log.of("task.started") if e["task_id"] in ids} == {"gpu-a"}


def test_a_late_joining_gpu_worker_picks_up_the_waiting_gpu_tasks(cluster, events):
    cluster.start_broker("--no-worker-timeout", "60")
    start_cpu_worker(cluster, "cpu-only", "--slots", "2")
    cluster.wait_workers(1)
    log = events("task.")
    with cluster.client() as c:
        waiting = [c.submit("fake.gpu", 0.01) for _ in range(5)]
        wait_until(lambda: c.status()["queued"] == 5, what="five GPU tasks queued")
        assert not log.of("task.started")  # the CPU-only worker took none of them
        start_gpu_worker(cluster, "gpu-late")
        c.gather(waiting, timeout=30)
    assert {f.info["worker"] for f in waiting} == {"gpu-late"}


def test_resources_come_back_when_a_worker_dies_mid_task_and_the_task_reruns_elsewhere(cluster, events, tmp_path):
    cluster.start_broker()
    procs = {name: start_gpu_worker(cluster, name) for name in ("gpu-a", "gpu-b")}
    cluster.wait_workers(2)
    log = events("task.", "worker.")
    gate = tmp_path / "gate"
    with cluster.client() as c:
        f = c.submit("fake.gpu_gate", str(gate))
        first = log.wait_for("task.started", lambda e: e["task_id"] == f.task_id)["worker"]
        survivor = next(n for n in procs if n != first)
        cluster.kill(procs[first])  # SIGKILL: no goodbye, the broker finds out by silence
        lost = log.wait_for("worker.lost", lambda e: e["worker"] == first)
        assert f.task_id in lost["requeued"]
        log.wait_for("task.started", lambda e: e["task_id"] == f.task_id and e["attempt"] == 2)
        gate.touch()
        assert f.result(timeout=30) == procs[survivor].pid
        assert f.info["worker"] == survivor and f.info["attempts"] == 2

        def settled():
            snap = c.status()
            return snap if snap["running"] == 0 and [w["name"] for w in snap["workers"]] == [survivor] else None

        snap = wait_until(settled, what="dead worker gone and nothing running")
    (worker,) = snap["workers"]
    assert worker["free"] == worker["resources"] == {"cpu": 1, "gpu": 1}


@pytest.fixture
def gpu_mem_cluster(cluster):
    cluster.start_broker("--no-worker-timeout", "1.5")
    start_gpu_worker(cluster, "gpu-8g", "--slots", "2", resources="gpu=1,gpu_mem=8e9")
    cluster.wait_workers(1)
    return cluster


def test_a_task_asking_more_gpu_mem_than_any_worker_offers_fails_naming_gpu_mem(gpu_mem_cluster):
    with gpu_mem_cluster.client() as c:
        f = c.submit("fake.gpu", resources={"gpu": 1, "gpu_mem": 16e9})
        with pytest.raises(TaskError) as info:
            f.result(timeout=20)
        assert c.submit("fake.gpu", resources={"gpu": 1, "gpu_mem": 4e9}).result(timeout=20) > 0
    assert info.value.type == "NoWorkerAvailable"
    assert "gpu_mem=1.6e+10" in info.value.message and "gpu_mem=8e+09" in info.value.message
    assert "gpu=" not in info.value.message  # the GPU count was never the problem


def test_two_tasks_whose_gpu_mem_does_not_fit_together_never_overlap(gpu_mem_cluster, events):
    log = events("task.")
    with gpu_mem_cluster.client() as c:
        # no "gpu" in the request: only gpu_mem keeps them apart on this two-slot worker
        pair = [c.submit("fake.gpu", 0.2, resources={"gpu_mem": 5e9}) for _ in range(2)]
        c.gather(pair, timeout=30)
    assert peak_running(finished(log, pair)) == 1


def test_two_tasks_whose_gpu_mem_fits_together_run_at_once(gpu_mem_cluster, tmp_path):
    with gpu_mem_cluster.client() as c:
        pair = [c.submit("fake.rendezvous", str(tmp_path), 2, resources={"gpu_mem": 4e9}) for _ in range(2)]
        assert c.gather(pair, timeout=60) == [True, True]


def test_errors_name_the_missing_resource(cluster):
    cluster.start_broker("--no-worker-timeout", "1")
    start_cpu_worker(cluster, "cpu-only")
    cluster.wait_workers(1)
    with cluster.client() as c:
        no_gpu = c.submit("fake.gpu")
        no_tpu = c.submit("square", 3, resources={"cpu": 1, "tpu": 2})
        errors = []
        for f in (no_gpu, no_tpu):
            with pytest.raises(TaskError) as info:
                f.result(timeout=20)
            errors.append(info.value)
    assert all(e.type == "NoWorkerAvailable" for e in errors)
    assert "gpu=1" in errors[0].message and "fake.gpu" in errors[0].message
    assert "tpu=2" in errors[1].message and "cpu" not in errors[1].message.split("offers")[1]


def run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", "--broker", "tcp://127.0.0.1:1", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_worker_without_cupy_refuses_to_start_saying_so():
    proc = run_worker("--gpu", "0")
    assert proc.returncode != 0
    assert "CuPy is not installed: pip install gridq[gpu]" in proc.stderr


def test_gpu_worker_on_a_missing_device_refuses_to_start_naming_it():
    proc = run_worker("--gpu", "99")
    assert proc.returncode != 0
    assert ("CUDA device 99 not found" in proc.stderr) or ("CuPy is not installed" in proc.stderr)
