"""Process pool against thread pool on one 2-slot worker (issue 13's figures), and the child hop alone.

Per pool kind, one broker and one worker with ``--slots 2 --pool KIND``: eight
pure-Python tasks (CPU scaling past the GIL), a no-op ``map``, ``sum`` of a
64 MiB array. Then, in this process, one ``ProcessSlot``: the cost of a hop to
a child (a lone task, and tasks in batches) over calling the task here, and a
child's start. Alone: ``python -m scripts.benchmarks.sections.pools``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchmarks.cluster import GridqCluster
from scripts.benchmarks.common import RESULT_TIMEOUT_S, BenchConfig, median

TITLE = "Process pool against thread pool (one 2-slot worker)"
ORDER = 25
POOLS = ("thread", "process")
SPIN_TURNS = 3_000_000  #: about a second of pure Python per task on this box
GOALS = {"cpu_speedup": 1.8, "noop_throughput": 0.7, "sum_64mib": 0.8}


def skip_reason(cfg: BenchConfig) -> str | None:
    return None


def cpu_seconds(c, tasks: int) -> float:
    start = time.perf_counter()
    c.gather([c.submit("bench.spin", SPIN_TURNS) for _ in range(tasks)], timeout=600)
    return time.perf_counter() - start


def noop_rate(c, n: int) -> float:
    start = time.perf_counter()
    results = c.map("noop", range(n))
    elapsed = time.perf_counter() - start
    if len(results) != n:
        raise RuntimeError(f"map returned {len(results)} results, expected {n}")
    return n / elapsed


def sum_mb_s(c, array, count: int) -> float:
    """``count`` sums of ``array``, two in flight: the worker's bytes-per-second on large arguments."""
    expected = float(array.sum())
    start = time.perf_counter()
    pending = []
    for _ in range(count):
        if len(pending) >= 2 and pending.pop(0).result(timeout=RESULT_TIMEOUT_S) != expected:
            raise RuntimeError("sum of the 64 MiB array came back wrong")
        pending.append(c.submit("sum", array))
    if any(f.result(timeout=RESULT_TIMEOUT_S) != expected for f in pending):
        raise RuntimeError("sum of the 64 MiB array came back wrong")
    return array.nbytes * count / (time.perf_counter() - start) / 1e6


def pool_figures(pool: str, cfg: BenchConfig, logdir: Path) -> dict:
    import numpy as np

    args = ["--slots", "2", "--pool", pool, "--tasks", "scripts.benchmarks.pool_tasks"]
    with GridqCluster(logdir, workers=1, worker_args=args) as cluster:
        cluster.start()
        c = cluster.client
        c.gather([c.submit("bench.spin", 10) for _ in range(8)], timeout=60)  # each child booted: no figure's part
        array = np.ones(64 << 17)  # 64 MiB of float64
        sum_mb_s(c, array, 4)  # each slot's buffers (a process slot's arena) exist already
        out = {"cpu_8_tasks_s": [], "noop_per_s": [], "sum_64mib_mb_s": []}
        for _ in range(cfg.reps):
            out["cpu_8_tasks_s"].append(cpu_seconds(c, 8))
            out["noop_per_s"].append(noop_rate(c, cfg.n))
            out["sum_64mib_mb_s"].append(sum_mb_s(c, array, 4 if cfg.quick else 8))
    return {"samples": out, "median": {name: median(values) for name, values in out.items()}}


def hop_figures(n: int) -> dict:
    """In this process: one ProcessSlot, tasks alone and in batches, against calling them here."""
    import worker.builtins  # noqa: F401  (registers noop)
    from broker.protocol import DispatchRecord, pack_value
    from worker.pool import CHILD_BATCH, PoolOptions, ProcessSlot, context
    from worker.registry import REGISTRY
    from worker.run import run_task

    blob, _ = pack_value([[], {}])
    records = [(DispatchRecord(f"t{i}", "noop", blob, 0, 1, None, True), []) for i in range(n)]

    def emit(entry, frames, started) -> None:
        pass

    def give_back(tasks) -> None:  # a batch stalled past the slot's release time (a busy machine): run them again
        records.extend(tasks)

    start = time.perf_counter()
    for record, frames in records:
        run_task(REGISTRY, record.task_id, record.name, record.args, frames)
    here_us = (time.perf_counter() - start) / n * 1e6

    slot = ProcessSlot(0, PoolOptions(), context(()))
    try:
        begin = time.perf_counter()
        slot.start()
        slot.run(records[:1], emit, give_back)  # waits for a child whose forkserver boots first
        first_start_s = slot.start_s if slot.start_s is not None else time.perf_counter() - begin
        starts = []
        for _ in range(5):
            slot._replace("bench")  # a fresh child from the warm forkserver
            slot.run(records[:1], emit, give_back)
            starts.append(slot.start_s)
        start = time.perf_counter()
        for rec in records:
            slot.run([rec], emit, give_back)
        single_us = (time.perf_counter() - start) / n * 1e6
        start = time.perf_counter()
        for i in range(0, n, CHILD_BATCH):
            slot.run(records[i:i + CHILD_BATCH], emit, give_back)
        batched_us = (time.perf_counter() - start) / n * 1e6
    finally:
        slot.close()
    return {"noop_here_us": here_us, "hop_single_us": single_us - here_us, "hop_batched_us": batched_us - here_us,
            "child_first_start_ms": first_start_s * 1000, "child_start_ms": median(starts) * 1000}


def run(cfg: BenchConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="gridq-bench-pools-") as tmp:
        figures = {pool: pool_figures(pool, cfg, Path(tmp)) for pool in POOLS}
    figures["hop"] = hop_figures(2000 if cfg.quick else 10_000)
    t, p = figures["thread"]["median"], figures["process"]["median"]
    figures["ratios"] = {"cpu_speedup": t["cpu_8_tasks_s"] / p["cpu_8_tasks_s"],
                         "noop_throughput": p["noop_per_s"] / t["noop_per_s"],
                         "sum_64mib": p["sum_64mib_mb_s"] / t["sum_64mib_mb_s"]}
    return figures


def report(figures: dict, cfg: BenchConfig) -> str:
    t, p, h, r = figures["thread"]["median"], figures["process"]["median"], figures["hop"], figures["ratios"]
    return "\n".join([
        f"medians of {cfg.reps} rep(s)",
        f"  8 pure-Python tasks: thread {t['cpu_8_tasks_s']:.2f} s, process {p['cpu_8_tasks_s']:.2f} s "
        f"-> {r['cpu_speedup']:.2f}x faster (goal >= {GOALS['cpu_speedup']})",
        f"  no-op map ({cfg.n:,}): thread {t['noop_per_s']:,.0f}/s, process {p['noop_per_s']:,.0f}/s "
        f"-> {r['noop_throughput']:.2f}x (goal >= {GOALS['noop_throughput']})",
        f"  sum of 64 MiB: thread {t['sum_64mib_mb_s']:,.0f} MB/s, process {p['sum_64mib_mb_s']:,.0f} MB/s "
        f"-> {r['sum_64mib']:.2f}x (goal >= {GOALS['sum_64mib']})",
        f"  child hop per no-op: {h['hop_single_us']:.0f} us alone, {h['hop_batched_us']:.1f} us batched "
        f"(the call itself {h['noop_here_us']:.1f} us)",
        f"  child start: {h['child_start_ms']:.1f} ms from the warm forkserver, "
        f"{h['child_first_start_ms']:.0f} ms the first (forkserver boot)",
    ])


if __name__ == "__main__":
    config = BenchConfig.quick_config() if "--quick" in sys.argv else BenchConfig()
    result = run(config)
    print(report(result, config))
    print(json.dumps({pool: result[pool]["samples"] for pool in POOLS}))
