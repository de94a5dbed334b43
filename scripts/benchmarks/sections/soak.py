"""Soak (``--soak SECONDS``): back-to-back no-op maps with one event subscriber; broker RSS must stay flat.

Samples the broker's RSS every few seconds; after warm-up (``WARM_S``) it may grow
by less than ``MAX_GROWTH_MIB``. Every task must run once: the broker's ``done``
count and the workers' served counts both equal the tasks submitted, every map
returns all its results, and the subscriber sees no seq gap.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from scripts.benchmarks.cluster import GridqCluster
from scripts.benchmarks.common import MIB, BenchConfig
from scripts.benchmarks.measure import EventSubscriber

TITLE = "soak: broker memory under sustained load"
ORDER = 30
#: seconds after the start from which the broker's RSS must stay flat
WARM_S = 150.0
#: most the broker's RSS may grow from WARM_S on, in MiB
MAX_GROWTH_MIB = 30.0
#: tasks per map of the soak
MAP_N = 20_000
#: seconds between two RSS samples
SAMPLE_S = 5.0


def skip_reason(cfg: BenchConfig) -> str | None:
    return None if cfg.soak_s > 0 else "runs with --soak SECONDS only"


def run(cfg: BenchConfig) -> dict:
    import psutil

    samples, maps, total = [], 0, 0
    with tempfile.TemporaryDirectory(prefix="gridq-bench-soak-") as tmp, GridqCluster(Path(tmp)).start() as cluster, \
            EventSubscriber(cluster.events) as sub:
        broker = psutil.Process(cluster.broker_pid)
        client = cluster.client
        started = time.monotonic()
        next_sample = started
        while time.monotonic() - started < cfg.soak_s:
            results = client.map("noop", range(MAP_N))
            if len(results) != MAP_N or any(r is not None for r in results):
                raise RuntimeError(f"soak map {maps} returned {len(results)} results, expected {MAP_N} Nones")
            maps += 1
            total += MAP_N
            now = time.monotonic()
            if now >= next_sample:
                samples.append((round(now - started, 1), broker.memory_info().rss / MIB, total,
                                psutil.getloadavg()[0]))
                next_sample = now + SAMPLE_S
        elapsed = time.monotonic() - started
        sub.settle()
        status = client.status()
    served = sum(w["tasks"] for w in status["workers"])
    warm = [rss for t, rss, _n, _load in samples if t >= WARM_S]
    growth = (max(warm) - warm[0]) if warm else None
    return {"seconds": elapsed, "tasks": total, "rate_tps": total / elapsed, "samples": samples,
            "growth_after_warm_MiB": growth, "broker_done": status["done"], "workers_served": served,
            "seq_gaps": sub.seq_gaps, "every_task_once": status["done"] == served == total and not sub.seq_gaps}


def report(figures: dict, cfg: BenchConfig) -> str:
    samples = figures["samples"]
    first, last = samples[0], samples[-1]
    growth = figures["growth_after_warm_MiB"]
    verdict = "-" if growth is None else ("flat" if growth < MAX_GROWTH_MIB else "GREW")
    lines = [f"{figures['tasks']:,} tasks in {figures['seconds']:.0f} s ({figures['rate_tps']:,.0f}/s), "
             f"1 subscriber, load {first[3]:.1f}..{last[3]:.1f}",
             f"broker RSS {first[1]:.0f} MiB at {first[0]:.0f} s -> {last[1]:.0f} MiB at {last[0]:.0f} s; "
             f"growth from {WARM_S:.0f} s on: {'-' if growth is None else f'{growth:.1f}'} MiB "
             f"(goal < {MAX_GROWTH_MIB:.0f}): {verdict}",
             f"every task once: {figures['every_task_once']} (broker done {figures['broker_done']:,}, workers served "
             f"{figures['workers_served']:,}, submitted {figures['tasks']:,}, seq gaps {figures['seq_gaps']})",
             "RSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{rss:.0f}" for t, rss, _n, _l in samples[::6])]
    return "\n".join(lines)
