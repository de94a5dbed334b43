"""Soak (``--soak SECONDS``): back-to-back no-op maps with one event subscriber; broker RSS must stay flat.

With ``--keyed`` each round submits ``KEYED_N`` keyed ``square`` tasks (new keys each round)
to a broker with a journal, then the same keys again: the second pass must return the same
results without running anything (keyed results live in the journal, not in memory).

Samples the broker's RSS every few seconds; after warm-up (``WARM_S``) it may grow
by less than ``MAX_GROWTH_MIB``. Every task must run once: the broker's ``done``
count and the workers' served counts both equal the tasks run, every result is the
right one, and the subscriber sees no seq gap.
"""

from __future__ import annotations

import tempfile
import threading
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
#: keyed tasks per round of the keyed soak (each submitted twice)
KEYED_N = 100_000
#: log events that explain a worker count that differs from the tasks run (a rejoin starts a new count)
TELLING_EVENTS = ("worker_joined", "worker_expired", "broker_silent", "broker_disconnect", "worker_refused")
#: seconds between two RSS samples
SAMPLE_S = 5.0


def skip_reason(cfg: BenchConfig) -> str | None:
    return None if cfg.soak_s > 0 else "runs with --soak SECONDS only"


def map_round(client, n_round: int) -> int:
    """One no-op map; returns the tasks that ran."""
    results = client.map("noop", range(MAP_N))
    if len(results) != MAP_N or any(r is not None for r in results):
        raise RuntimeError(f"soak map {n_round} returned {len(results)} results, expected {MAP_N} Nones")
    return MAP_N


def keyed_round(client, n_round: int) -> int:
    """``KEYED_N`` keyed squares, then the same keys again; returns the tasks that ran (the first pass)."""
    for attempt in ("first", "again"):
        expected: dict = {}  #: future in flight -> the square it must return

        def note(future, item) -> None:
            expected[future] = item[1][0] ** 2

        items = (("square", (i,), {}, {"key": f"soak-{n_round}-{i}"}) for i in range(KEYED_N))
        wrong = sum(1 for f in client.stream(None, items, on_submit=note) if f.result() != expected.pop(f))
        if wrong:
            raise RuntimeError(f"keyed soak round {n_round} ({attempt}): {wrong} wrong results")
    return KEYED_N


def run(cfg: BenchConfig) -> dict:
    import psutil

    keyed = cfg.soak_keyed
    one_round = keyed_round if keyed else map_round
    samples, rounds, total = [], 0, 0
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="gridq-bench-soak-") as tmp, \
            GridqCluster(Path(tmp), journal=str(Path(tmp) / "journal.db") if keyed else None).start() as cluster, \
            EventSubscriber(cluster.events) as sub:
        broker = psutil.Process(cluster.broker_pid)
        client = cluster.client
        started = time.monotonic()

        def sample() -> None:  # on a timer, not per round: a keyed round takes about a minute
            while True:
                samples.append((round(time.monotonic() - started, 1), broker.memory_info().rss / MIB, total,
                                psutil.getloadavg()[0]))
                if stop.wait(SAMPLE_S):
                    return

        sampler = threading.Thread(target=sample, name="soak-sampler", daemon=True)
        sampler.start()
        try:
            while time.monotonic() - started < cfg.soak_s:
                total += one_round(client, rounds)
                rounds += 1
        finally:
            stop.set()
            sampler.join(timeout=SAMPLE_S + 5)
        elapsed = time.monotonic() - started
        sub.settle()
        status = client.status()
        told = log_events(Path(tmp))
    served = sum(w["tasks"] for w in status["workers"])
    warm = [rss for t, rss, _n, _load in samples if t >= WARM_S]
    growth = (max(warm) - warm[0]) if warm else None
    return {"seconds": elapsed, "keyed": keyed, "tasks": total, "submitted": total * (2 if keyed else 1),
            "rate_tps": total / elapsed, "samples": samples,
            "growth_after_warm_MiB": growth, "broker_done": status["done"], "workers_served": served,
            "log_events": told, "seq_gaps": sub.seq_gaps, "every_task_once": status["done"] == served == total and not sub.seq_gaps}


def log_events(logdir: Path) -> dict:
    """How often each of ``TELLING_EVENTS`` appears in the cluster's logs."""
    counts = dict.fromkeys(TELLING_EVENTS, 0)
    for log in logdir.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            for name in TELLING_EVENTS:
                if f"] {name} " in line:
                    counts[name] += 1
    return counts


def report(figures: dict, cfg: BenchConfig) -> str:
    samples = figures["samples"]
    first, last = samples[0], samples[-1]
    growth = figures["growth_after_warm_MiB"]
    verdict = "-" if growth is None else ("flat" if growth < MAX_GROWTH_MIB else "GREW")
    what = (f"{figures['tasks']:,} keyed tasks, each submitted twice, with a journal" if figures.get("keyed")
            else f"{figures['tasks']:,} tasks")
    lines = [f"{what} in {figures['seconds']:.0f} s ({figures['rate_tps']:,.0f}/s run), "
             f"1 subscriber, load {first[3]:.1f}..{last[3]:.1f}",
             f"broker RSS {first[1]:.0f} MiB at {first[0]:.0f} s -> {last[1]:.0f} MiB at {last[0]:.0f} s; "
             f"growth from {WARM_S:.0f} s on: {'-' if growth is None else f'{growth:.1f}'} MiB "
             f"(goal < {MAX_GROWTH_MIB:.0f}): {verdict}",
             f"every task once: {figures['every_task_once']} (broker done {figures['broker_done']:,}, workers served "
             f"{figures['workers_served']:,}, run {figures['tasks']:,}, seq gaps {figures['seq_gaps']})",
             "log: " + ", ".join(f"{k} {v}" for k, v in figures.get("log_events", {}).items()),
             "RSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{rss:.0f}" for t, rss, _n, _l in samples[::6])]
    return "\n".join(lines)
