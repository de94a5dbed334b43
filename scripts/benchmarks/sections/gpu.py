"""GPU part: gpu.matmul end to end against the same CuPy work in one process, and the worker's staging.

Runs where CuPy sees a CUDA device; ``scripts/gpu-check`` runs it alone
(``python -m scripts.benchmarks.sections.gpu``). Needs no psutil: the lent GPU
machine has none.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scripts.benchmarks.common import MIB, BenchConfig

TITLE = "GPU part"
ORDER = 90
#: the GPU part's own limit: a cold CUDA start and cuBLAS warm-up take a while
TIMEOUT_S = 1800.0
#: repetitions of each timing; the median is reported
REPS = 5


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU part here"
        return False


def skip_reason(cfg: BenchConfig) -> str | None:
    if gpu_available():
        return None
    return "no CuPy or no CUDA device here; scripts/gpu-check runs it on a GPU machine"


def staging_bandwidth(nbytes: int, device: int = 0, repeats: int = REPS) -> float:
    """Host->device GB/s of the worker's staging path (its PinnedStaging, as a --gpu worker uses it):
    a pageable numpy array into a cupy array."""
    import cupy

    from worker.gpu import PinnedStaging

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream(non_blocking=True)
        staging = PinnedStaging(cupy, stream)
        staging.to_device(src, cupy.empty(nbytes, np.uint8).data.ptr)  # warm: buffers allocated, memory pool filled
        times = []
        for _ in range(repeats):  # as the worker stages an argument: a new device array, filled (to_device waits)
            started = time.perf_counter()
            staging.to_device(src, cupy.empty(nbytes, np.uint8).data.ptr)
            times.append(time.perf_counter() - started)
    return nbytes / float(np.median(times)) / 1e9


def direct_matmul_seconds(n: int = 4096, repeats: int = REPS, device: int = 0) -> float:
    """Median seconds of the same float32 matmul done in-process with CuPy, host<->device copies included."""
    import cupy

    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    times = []
    with cupy.cuda.Device(device):
        for i in range(repeats + 1):
            started = time.perf_counter()
            cupy.asnumpy(cupy.asarray(a) @ cupy.asarray(b))
            if i:  # the first one warms up cuBLAS and the memory pool
                times.append(time.perf_counter() - started)
    return float(np.median(times))


def run(cfg: BenchConfig | None = None, n: int = 4096, reps: int = REPS) -> dict:
    """Figures: end-to-end vs in-process matmul of two n x n float32 arrays, staging GB/s."""
    import cupy

    from scripts.benchmarks.cluster import GridqCluster

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    staging = {mib: staging_bandwidth(mib * MIB) for mib in (1, 64, 256)}
    src = np.ones(64 * MIB, np.uint8)
    cupy.asarray(src)
    pageable = []
    for _ in range(reps):
        started = time.perf_counter()
        cupy.asarray(src)
        cupy.cuda.Device().synchronize()
        pageable.append(time.perf_counter() - started)
    direct = direct_matmul_seconds(n, reps)

    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    times = []
    with tempfile.TemporaryDirectory() as tmp, \
            GridqCluster(Path(tmp), workers=1, worker_args=["--gpu", "0", "--name", "bench-gpu0"]).start() as cluster:
        first = cluster.client.submit("gpu.matmul", a, b).result(timeout=300)  # warm: cuBLAS, pools, buffers
        np.testing.assert_allclose(first[:8], a[:8] @ b, rtol=2e-3)
        for _ in range(reps):
            started = time.perf_counter()
            cluster.client.submit("gpu.matmul", a, b).result(timeout=300)
            times.append(time.perf_counter() - started)
    end_to_end = statistics.median(times)
    return {
        "device": name.decode() if isinstance(name, bytes) else name,
        "matmul_n": n, "matmul_end_to_end_s": round(end_to_end, 4), "matmul_direct_s": round(direct, 4),
        "matmul_ratio": round(end_to_end / direct, 2),
        "staging_h2d_gb_s": {f"{k}MiB": round(v, 2) for k, v in staging.items()},
        "pageable_h2d_64MiB_gb_s": round(64 * MIB / statistics.median(pageable) / 1e9, 2),
    }


def report(figures: dict, cfg: BenchConfig | None = None) -> str:
    staging = ", ".join(f"{k} {v:.1f} GB/s" for k, v in figures["staging_h2d_gb_s"].items())
    n = figures["matmul_n"]
    return "\n".join([
        f"on {figures['device']}: gpu.matmul {n}x{n} float32, median of {REPS}",
        f"  end to end (client -> broker -> --gpu worker -> client): {figures['matmul_end_to_end_s'] * 1e3:8.1f} ms",
        f"  in-process CuPy incl. host<->device copies:              {figures['matmul_direct_s'] * 1e3:8.1f} ms",
        f"  ratio end-to-end / direct:                               {figures['matmul_ratio']:8.2f} x",
        f"  staging host->device through the worker's pinned buffers: {staging}",
        f"  (plain cupy.asarray from pageable memory, 64 MiB: {figures['pageable_h2d_64MiB_gb_s']:.1f} GB/s)",
    ])


def main() -> int:
    """The GPU part alone, for scripts/gpu-check: exit 2 without a usable GPU."""
    if not gpu_available():
        print("bench gpu: CuPy or a CUDA device is not usable here", file=sys.stderr)
        return 2
    from broker.logs import configure_logging

    configure_logging("console", "warning")
    figures = run(n=int(os.environ.get("GRIDQ_GPU_BENCH_N", "4096")))
    print(f"{TITLE} {report(figures)}")
    if os.environ.get("GRIDQ_GPU_REPORT"):
        Path(os.environ["GRIDQ_GPU_REPORT"]).write_text(json.dumps(figures, indent=2))
    print("FIGURES " + json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
