"""Real GPU workers end to end (broker + ``--gpu 0`` worker) and GpuPool itself; skipped without CuPy/CUDA.

Run them with ``scripts/gpu-check`` on a machine with a GPU.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from client import TaskError
from tests.test_resources import GPU_TASKS, finished, peak_running

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
try:
    DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver or no device: CuPy imports but cannot run
    DEVICES = 0
if DEVICES < 1:
    pytest.skip("no CUDA device visible", allow_module_level=True)

from worker.gpu import STAGING_CHUNK_BYTES, GpuPool  # noqa: E402  (after the skip: needs CuPy)

#: a CuPy import and CUDA start-up take seconds: wait longer than for CPU workers
GPU_WORKER_START_S = 90


@pytest.fixture
def gpu_cluster(cluster):
    cluster.start_broker("--no-worker-timeout", "1.5")
    cluster.start_worker("--gpu", "0", "--slots", "4", "--tasks", GPU_TASKS, "--name", "gpu0")
    cluster.wait_workers(1, timeout=GPU_WORKER_START_S)
    return cluster


@pytest.fixture
def pool():
    p = GpuPool([0])
    yield p
    p.close()


def test_gpu_builtins_match_numpy_and_the_worker_announces_its_gpu(gpu_cluster):
    rng = np.random.default_rng(0)
    # 9 MB operands and result: more than one staging chunk each way
    a = rng.random((1500, 1500), dtype=np.float32)
    b = rng.random((1500, 1500), dtype=np.float32)
    x = rng.standard_normal(4096)
    with gpu_cluster.client(timeout=10) as c:
        product = c.submit("gpu.matmul", a, b).result(timeout=60)
        total = c.submit("gpu.sum", x).result(timeout=60)
        spectrum = c.submit("gpu.fft", x).result(timeout=60)
        (worker,) = c.status()["workers"]
    assert isinstance(product, np.ndarray) and product.dtype == np.float32 and product.shape == (1500, 1500)
    np.testing.assert_allclose(product, a @ b, rtol=2e-3)
    assert isinstance(total, float) and total == pytest.approx(float(x.sum()), rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(spectrum, np.fft.fft(x), rtol=1e-7, atol=1e-9)
    device_mem = cupy.cuda.runtime.getDeviceProperties(0)["totalGlobalMem"]
    assert worker["resources"]["gpu"] == 1 and worker["resources"]["gpu_mem"] == device_mem


def test_gpu_task_arguments_arrive_as_cupy_on_the_workers_device_and_results_leave_as_numpy(gpu_cluster):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    with gpu_cluster.client() as c:
        seen = c.submit("gpu.inspect", a, {"xs": [np.ones(5, np.int64)]}).result(timeout=60)
    assert seen["a"] == {"module": "cupy", "device": 0}
    assert seen["nested"] == {"module": "cupy", "device": 0}
    assert seen["current"] == 0
    np.testing.assert_array_equal(seen["double"], a * 2)
    assert isinstance(seen["double"], np.ndarray)
    np.testing.assert_array_equal(seen["pair"][0], np.full(5, 2))
    np.testing.assert_array_equal(seen["pair"][1][0], np.zeros(3))


def test_two_gpu_tasks_never_overlap_on_one_device(gpu_cluster, events):
    log = events("task.")
    with gpu_cluster.client() as c:
        futures = [c.submit("fake.gpu", 0.1) for _ in range(4)]
        c.gather(futures, timeout=60)
    assert peak_running(finished(log, futures)) == 1


def test_gpu_mem_beyond_the_device_fails_naming_gpu_mem(gpu_cluster):
    device_mem = cupy.cuda.runtime.getDeviceProperties(0)["totalGlobalMem"]
    with gpu_cluster.client() as c:
        f = c.submit("gpu.sum", np.ones(4), resources={"gpu": 1, "gpu_mem": 2 * device_mem})
        with pytest.raises(TaskError) as info:
            f.result(timeout=30)
        assert c.submit("gpu.sum", np.ones(4), resources={"gpu": 1, "gpu_mem": device_mem // 2}).result(60) == 4.0
    assert info.value.type == "NoWorkerAvailable" and "gpu_mem" in info.value.message


def test_pool_runs_one_task_at_a_time_per_device(pool):
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def task():
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        cupy.cuda.Device().synchronize()
        threading.Event().wait(0.02)
        with lock:
            state["now"] -= 1

    threads = [threading.Thread(target=pool.run, args=(task, [], {})) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert state["peak"] == 1


def test_pinned_staging_buffers_are_reused_and_results_are_copied_out_before_reuse(pool):
    rng = np.random.default_rng(1)
    big = rng.random(3 * STAGING_CHUNK_BYTES // 8 + 123)  # three chunks and a bit
    small = rng.random((7, 9)).astype(np.float32)

    def task(x, nested):
        return [x * 2, {"y": nested["y"] + 1, "same": x}]

    first = pool.run(task, [big, {"y": small}], {})
    (stats,) = pool.staging_stats()
    assert stats["allocations"] == 2 and stats["capacity"] == [STAGING_CHUNK_BYTES] * 2
    for _ in range(3):
        again = pool.run(task, [big, {"y": small}], {})
    assert pool.staging_stats() == [stats]  # no new pinned memory, same buffers
    for out in (first, again):
        np.testing.assert_array_equal(out[0], big * 2)
        np.testing.assert_array_equal(out[1]["same"], big)
        np.testing.assert_array_equal(out[1]["y"], small + 1)
    assert isinstance(again[0], np.ndarray) and not np.shares_memory(again[0], again[1]["same"])


def test_pool_keeps_dtype_order_and_shape(pool):
    values = [np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.array(2.5), np.zeros((0, 4), np.int16),
              np.arange(10)[::3], (np.arange(4) + 1j).astype(np.complex64), np.array([True, False])]
    out = pool.run(lambda *xs: [cupy.asarray(x) for x in xs], values, {})
    for got, want in zip(out, values):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert out[0].flags.f_contiguous


def test_pool_refuses_a_missing_device():
    with pytest.raises(RuntimeError, match=f"CUDA device {DEVICES} not found \\({DEVICES} devices visible"):
        GpuPool([DEVICES])
