"""Process pool against thread pool: CPU scaling, no-op throughput, large arrays, the child hop.

    .venv/bin/python scripts/bench_pool.py [--quick] [--json OUT]

Starts a broker and one 2-slot worker per pool kind (subprocesses on loopback
ports, ended by PID), and measures in this process the cost of one hop to a
child and the start of a child. The worker imports this file as a --tasks
module (it adds scripts/ to PYTHONPATH), for the pure-Python task below.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker import task

ROOT = Path(__file__).resolve().parent.parent


@task(name="bench.spin")
def spin(n: int) -> int:
    """Pure Python holding the GIL: ``n`` loop turns."""
    total = 0
    for i in range(n):
        total += i & 7
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A broker and one worker of the given pool kind; ``close()`` ends both by PID."""

    def __init__(self, pool: str, slots: int, logdir: Path) -> None:
        from client import Client

        self.front, back, events = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts"),
                                                            os.environ.get("PYTHONPATH", "")])}
        self.procs = []
        for label, args in (("broker", ["-m", "broker", "--frontend", self.front, "--backend", back, "--events", events]),
                            (f"worker-{pool}", ["-m", "worker", "--broker", back, "--slots", str(slots), "--pool", pool,
                                                "--tasks", "bench_pool"])):
            with open(logdir / f"{label}.log", "wb") as log:
                self.procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        self.client = Client(self.front, timeout=5.0)
        deadline = time.monotonic() + 60
        while not self.client.status()["workers"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not join within 60 s")
            time.sleep(0.05)
        # the first task of each slot waits for its child to boot: not part of any figure
        self.client.gather([self.client.submit("bench.spin", 10) for _ in range(4 * slots)], timeout=60)

    def close(self) -> None:
        self.client.close()
        for proc in reversed(self.procs):  # the worker first: it drains and says goodbye
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def cpu_seconds(c, tasks: int, turns: int) -> float:
    start = time.perf_counter()
    c.gather([c.submit("bench.spin", turns) for _ in range(tasks)], timeout=600)
    return time.perf_counter() - start


def noop_rate(c, n: int) -> float:
    start = time.perf_counter()
    assert len(c.map("noop", range(n))) == n
    return n / (time.perf_counter() - start)


def sum_mb_s(c, array, count: int) -> float:
    expected = float(array.sum())
    start = time.perf_counter()
    pending = []
    for _ in range(count):
        if len(pending) >= 2:
            assert pending.pop(0).result(timeout=120) == expected
        pending.append(c.submit("sum", array))
    for f in pending:
        assert f.result(timeout=120) == expected
    return array.nbytes * count / (time.perf_counter() - start) / 1e6


def cluster_figures(pool: str, cfg, logdir: Path) -> dict:
    import numpy as np

    cluster = Cluster(pool, 2, logdir)
    try:
        c = cluster.client
        array = np.ones(64 << 17)  # 64 MiB of float64
        sum_mb_s(c, array, 4)  # steady state: each slot's buffers (a process slot's arena) exist already
        out = {"cpu_8_tasks_s": [], "noop_per_s": [], "sum_64mib_mb_s": []}
        for _ in range(cfg.reps):
            out["cpu_8_tasks_s"].append(cpu_seconds(c, 8, cfg.spin_turns))
            out["noop_per_s"].append(noop_rate(c, cfg.noops))
            out["sum_64mib_mb_s"].append(sum_mb_s(c, array, cfg.arrays))
        return {k: statistics.median(v) for k, v in out.items()} | {"samples": out}
    finally:
        cluster.close()


def hop_figures(n: int) -> dict:
    """In this process: one ProcessSlot, tasks alone and in batches, against calling them here."""
    import worker.builtins  # noqa: F401
    from broker.protocol import DispatchRecord, pack_value
    from worker.pool import CHILD_BATCH, PoolOptions, ProcessSlot, context
    from worker.registry import REGISTRY
    from worker.run import run_task

    blob, _ = pack_value([[], {}])
    records = [(DispatchRecord(f"t{i}", "noop", blob, 0, 1, None, True), []) for i in range(n)]
    emitted = []

    def emit(entry, frames, started):
        emitted.append(entry)

    def give_back(tasks):  # a batch stalled past RELEASE_AFTER_S (a busy machine): run those again
        records.extend(tasks)

    start = time.perf_counter()
    for record, frames in records:
        run_task(REGISTRY, record.task_id, record.name, record.args, frames)
    here_us = (time.perf_counter() - start) / n * 1e6

    slot = ProcessSlot(0, PoolOptions(), context(()))
    try:
        begin = time.perf_counter()
        slot.start()
        slot.run(records[:1], emit, give_back)  # waits for the hello of a child whose forkserver boots first
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
            "child_first_start_ms": first_start_s * 1000,
            "child_start_ms": statistics.median(s for s in starts if s is not None) * 1000}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repetition, smaller batches")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the figures as JSON")
    cfg = p.parse_args(argv)
    from broker.logs import configure_logging

    configure_logging("console", "warning")
    cfg.reps = 1 if cfg.quick else 3
    cfg.noops = 5_000 if cfg.quick else 20_000
    cfg.arrays = 4 if cfg.quick else 8
    cfg.spin_turns = 3_000_000
    figures = {"machine": {"cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="gridq-bench-pool-") as tmp:
        for pool in ("thread", "process"):
            figures[pool] = cluster_figures(pool, cfg, Path(tmp))
    figures["hop"] = hop_figures(2000 if cfg.quick else 10_000)
    t, pr = figures["thread"], figures["process"]
    figures["ratios"] = {
        "cpu_speedup": t["cpu_8_tasks_s"] / pr["cpu_8_tasks_s"],  # goal >= 1.8
        "noop_throughput": pr["noop_per_s"] / t["noop_per_s"],  # goal >= 0.7
        "sum_64mib": pr["sum_64mib_mb_s"] / t["sum_64mib_mb_s"],  # goal >= 0.8
    }
    figures["machine"]["load_1m_after"] = os.getloadavg()[0]
    h, r = figures["hop"], figures["ratios"]
    print(f"8 pure-Python tasks, 2 slots: thread {t['cpu_8_tasks_s']:.2f} s, process {pr['cpu_8_tasks_s']:.2f} s "
          f"-> {r['cpu_speedup']:.2f}x (goal >= 1.8)")
    print(f"no-op map: thread {t['noop_per_s']:.0f}/s, process {pr['noop_per_s']:.0f}/s -> {r['noop_throughput']:.2f}x "
          f"(goal >= 0.7)")
    print(f"sum of 64 MiB: thread {t['sum_64mib_mb_s']:.0f} MB/s, process {pr['sum_64mib_mb_s']:.0f} MB/s "
          f"-> {r['sum_64mib']:.2f}x (goal >= 0.8)")
    print(f"child hop per no-op: {h['hop_single_us']:.0f} us alone, {h['hop_batched_us']:.1f} us batched "
          f"(the call itself: {h['noop_here_us']:.1f} us)")
    print(f"child start: {h['child_start_ms']:.1f} ms from the warm forkserver, {h['child_first_start_ms']:.0f} ms "
          f"for the first (forkserver boot)")
    print(f"load average (1 min) before/after: {figures['machine']['load_1m']:.1f}/{figures['machine']['load_1m_after']:.1f}"
          f" on {figures['machine']['cpus']} CPUs")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
