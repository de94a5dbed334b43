"""gridq against a plain pyzmq load-balancing broker (and dask, where installed), through public interfaces only.

gridq runs as users run it (``python -m broker``, ``python -m worker``,
``from client import Client``); the yardstick is scripts/benchmarks/baseline.py.
Both run on tcp://127.0.0.1 free ports, alternating, several repetitions; the
report gives medians and gridq/baseline ratios, and the raw samples go to JSON.

Measured: no-op throughput with a pipelined client, one-at-a-time round-trip
latency, payload bandwidth (64 MiB and 1 MiB float64 arrays in, a float out)
with the broker's peak RSS, and what gridq's features cost: journal on vs off,
one event subscriber vs none, 200 connected workers vs 2.
"""

from __future__ import annotations

import collections
import contextlib
import tempfile
import time
from pathlib import Path

from scripts.benchmarks import baseline, dask_runs
from scripts.benchmarks.baseline import BaselineClient
from scripts.benchmarks.cluster import GridqCluster, mkdir
from scripts.benchmarks.common import SMALL_PAYLOAD_WINDOW, THROUGHPUT_WINDOW, BenchConfig, median
from scripts.benchmarks.measure import (RssSampler, gridq_events_throughput, gridq_latency, gridq_payload,
                                        gridq_throughput)

TITLE = "gridq vs a plain pyzmq broker"
ORDER = 10


def skip_reason(cfg: BenchConfig) -> str | None:
    return None  # needs nothing beyond gridq's own dependencies


#: (key, label, unit, better) of the report rows; better is "higher" or "lower". A row's samples are
#: runs[system][key], except where GRIDQ_SAME_AS says gridq's come from another row.
ROWS = [
    ("throughput_tps", "no-op throughput, 2 workers", "tasks/s", "higher"),
    ("throughput_1credit_tps", "  vs baseline at 1 credit/worker", "tasks/s", "higher"),
    ("latency_p50_ms", "round trip p50", "ms", "lower"),
    ("latency_p99_ms", "round trip p99", "ms", "lower"),
    ("payload_big_MBps", "payload 64 MiB -> sum", "MB/s", "higher"),
    ("payload_small_MBps", "payload 1 MiB -> sum, window 8", "MB/s", "higher"),
    ("broker_peak_rss_MiB", "broker peak RSS during payload", "MiB", "lower"),
    ("broker_rss_growth_MiB", "  of which growth during payload", "MiB", "lower"),
    ("throughput_events_tps", "throughput, 1 event subscriber", "tasks/s", "higher"),
    ("throughput_journal_tps", "throughput, journal on", "tasks/s", "higher"),
    ("scale_throughput_tps", "throughput, {scale} sim workers", "tasks/s", "higher"),
    ("scale_throughput_events_tps", "  with 1 event subscriber", "tasks/s", "higher"),
    ("scale_throughput_journal_tps", "  with journal on", "tasks/s", "higher"),
]

#: (key, numerator, denominator, label) of gridq's throughput against itself
COSTS = [
    ("journal_on_over_off", "throughput_journal_tps", "throughput_tps", "journal on / off, 2 workers"),
    ("events_sub_over_none", "throughput_events_tps", "throughput_tps", "1 event subscriber / none, 2 workers"),
    ("scale_journal_on_over_off", "scale_throughput_journal_tps", "scale_throughput_tps",
     "journal on / off, {scale} sim workers"),
    ("scale_events_sub_over_none", "scale_throughput_events_tps", "scale_throughput_tps",
     "1 event subscriber / none, {scale} sim workers"),
    ("scale_over_2_workers", "scale_throughput_tps", "throughput_tps", "{scale} sim workers / 2 real workers"),
]

#: rows whose gridq samples are another row's: gridq has one configuration, compared with two baselines
GRIDQ_SAME_AS = {"throughput_1credit_tps": "throughput_tps"}


def _baseline_rep(cluster, client: BaselineClient, client1: BaselineClient, cfg: BenchConfig, arrays: dict,
                  out: dict) -> None:
    out["throughput_tps"].append(baseline.measure_throughput(client, cfg.n, THROUGHPUT_WINDOW))
    out["throughput_1credit_tps"].append(baseline.measure_throughput(client1, cfg.n, THROUGHPUT_WINDOW))
    lat = baseline.measure_latency(client, cfg.latency_n)
    out["latency_p50_ms"].append(lat["p50_ms"])
    out["latency_p99_ms"].append(lat["p99_ms"])
    with RssSampler(cluster.broker_pid) as rss:
        out["payload_big_MBps"].append(baseline.measure_payload(
            client, arrays["big"], cfg.big_payload_count, window=1))
        out["payload_small_MBps"].append(baseline.measure_payload(
            client, arrays["small"], cfg.small_payload_count, window=SMALL_PAYLOAD_WINDOW))
    out["broker_peak_rss_MiB"].append(rss.peak_mib)
    out["broker_rss_growth_MiB"].append(rss.growth_mib)


def _gridq_rep(cluster: GridqCluster, journal: GridqCluster | None, cfg: BenchConfig, arrays: dict, out: dict) -> None:
    c = cluster.client
    out["throughput_tps"].append(gridq_throughput(c, cfg.n))
    lat = gridq_latency(c, cfg.latency_n)
    out["latency_p50_ms"].append(lat["p50_ms"])
    out["latency_p99_ms"].append(lat["p99_ms"])
    with RssSampler(cluster.broker_pid) as rss:
        out["payload_big_MBps"].append(gridq_payload(c, arrays["big"], cfg.big_payload_count, window=1))
        out["payload_small_MBps"].append(gridq_payload(c, arrays["small"], cfg.small_payload_count,
                                                       window=SMALL_PAYLOAD_WINDOW))
    out["broker_peak_rss_MiB"].append(rss.peak_mib)
    out["broker_rss_growth_MiB"].append(rss.growth_mib)
    ev = gridq_events_throughput(cluster, cfg.n)
    out["throughput_events_tps"].append(ev["tps"])
    out["events_during_run"].append(ev["events_during_run"])
    out["events_seq_gaps"].append(ev["seq_gaps"])
    if journal is not None:
        out["throughput_journal_tps"].append(gridq_throughput(journal.client, cfg.n))


def _gridq_scale_rep(cluster: GridqCluster, journal: GridqCluster | None, cfg: BenchConfig, out: dict) -> None:
    out["scale_throughput_tps"].append(gridq_throughput(cluster.client, cfg.n))
    ev = gridq_events_throughput(cluster, cfg.n)
    out["scale_throughput_events_tps"].append(ev["tps"])
    out["scale_events_during_run"].append(ev["events_during_run"])
    out["scale_events_seq_gaps"].append(ev["seq_gaps"])
    if journal is not None:
        out["scale_throughput_journal_tps"].append(gridq_throughput(journal.client, cfg.n))


def run(cfg: BenchConfig) -> dict:
    runs = {"baseline": collections.defaultdict(list), "gridq": collections.defaultdict(list)}
    arrays = {"big": baseline.payload_array(cfg.big_payload_bytes),
              "small": baseline.payload_array(cfg.small_payload_bytes)}
    errors: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gridq-bench-") as tmp:
        tmpdir = Path(tmp)
        # Phase 1: both systems with 2 real workers, plus a journaled gridq, measured in alternation.
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(baseline.start_cluster(workers=2))
            base_client = stack.enter_context(BaselineClient(base.frontend))
            # a baseline that never sends a worker more than it runs: what prefetching is worth on its own
            base1 = stack.enter_context(baseline.start_cluster(workers=2, credits=1))
            base1_client = stack.enter_context(BaselineClient(base1.frontend))
            gridq = stack.enter_context(GridqCluster(mkdir(tmpdir / "plain")).start())
            journal = None
            try:
                journal = stack.enter_context(GridqCluster(
                    mkdir(tmpdir / "journal"), journal=str(tmpdir / "journal" / "journal.sqlite")).start())
            except RuntimeError as exc:  # report the rest even where the journal cannot start
                errors["journal"] = str(exc)
            baseline.measure_throughput(base_client, 200)  # warm-up: connections up, code paths hot
            baseline.measure_throughput(base1_client, 200)
            gridq_throughput(gridq.client, 200)
            if journal is not None:
                gridq_throughput(journal.client, 200)
            for rep in range(cfg.reps):
                order = [lambda: _baseline_rep(base, base_client, base1_client, cfg, arrays, runs["baseline"]),
                         lambda: _gridq_rep(gridq, journal, cfg, arrays, runs["gridq"])]
                for fn in order if rep % 2 == 0 else reversed(order):
                    fn()
        # Phase 2: scale, both brokers with many simulated one-slot workers that answer at once, so
        # the broker is the bottleneck and gridq's journal and events costs show undiluted.
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(baseline.start_cluster(workers=0))
            base.add_sim_workers(cfg.scale_workers)
            base_client = stack.enter_context(BaselineClient(base.frontend))
            gridq = stack.enter_context(GridqCluster(mkdir(tmpdir / "scale"), workers=0,
                                                     sim_workers=cfg.scale_workers).start())
            journal = None
            try:
                journal = stack.enter_context(GridqCluster(
                    mkdir(tmpdir / "scale-journal"), workers=0, sim_workers=cfg.scale_workers,
                    journal=str(tmpdir / "scale-journal" / "journal.sqlite")).start())
            except RuntimeError as exc:
                errors["scale_journal"] = str(exc)
            baseline.measure_throughput(base_client, 500)
            gridq_throughput(gridq.client, 500)
            if journal is not None:
                gridq_throughput(journal.client, 500)
            for rep in range(cfg.reps):
                order = [lambda: runs["baseline"]["scale_throughput_tps"].append(
                             baseline.measure_throughput(base_client, cfg.n, THROUGHPUT_WINDOW)),
                         lambda: _gridq_scale_rep(gridq, journal, cfg, runs["gridq"])]
                for fn in order if rep % 2 == 0 else reversed(order):
                    fn()
    if dask_runs.available():
        try:
            runs["dask"] = dask_runs.run(cfg)
        except Exception as exc:  # an optional comparison must not sink the report
            runs["dask"] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"elapsed_s": time.perf_counter() - started, "runs": {k: dict(v) for k, v in runs.items()},
            "summary": summarize(runs), "errors": errors}


def summarize(runs: dict) -> dict:
    summary = {}
    for key, _label, _unit, _better in ROWS:
        row = {system: median(samples.get(GRIDQ_SAME_AS.get(key, key) if system == "gridq" else key, []))
               for system, samples in runs.items() if isinstance(samples, dict)}
        g, b = row.get("gridq"), row.get("baseline")
        row["ratio"] = g / b if g is not None and b else None
        summary[key] = row
    def ratio(num: str, den: str):
        n, d = median(runs["gridq"].get(num, [])), median(runs["gridq"].get(den, []))
        return n / d if n and d else None

    summary["gridq_costs"] = {key: ratio(num, den) for key, num, den, _label in COSTS}
    return summary


def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("tasks/s", "MB/s"):
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def report(result: dict, cfg: BenchConfig) -> str:
    summary = result["summary"]
    has_dask = "dask" in result["runs"] and "error" not in result["runs"]["dask"]
    head = f"{'metric':<40} {'unit':>8} {'gridq':>10} {'baseline':>10} {'gridq/base':>11}"
    if has_dask:
        head += f" {'dask':>10}"
    lines = [f"{cfg.reps} rep(s), medians; n={cfg.n:,} no-op tasks, latency n={cfg.latency_n}", "", head,
             "-" * len(head)]
    for key, label, unit, better in ROWS:
        row = summary[key]
        ratio = row.get("ratio")
        line = (f"{label.format(scale=cfg.scale_workers):<40} {unit:>8} {_fmt(row.get('gridq'), unit):>10} "
                f"{_fmt(row.get('baseline'), unit):>10} {(f'{ratio:.2f}' if ratio else '-'):>11}")
        if has_dask:
            line += f" {_fmt(row.get('dask'), unit):>10}"
        lines.append(line)
    costs = summary["gridq_costs"]
    lines += ["", "gridq against itself (throughput ratios):"]
    for key, _num, _den, label in COSTS:
        lines.append(f"  {label.format(scale=cfg.scale_workers):<46} {(f'{costs[key]:.2f}' if costs[key] else '-')}")
    g = result["runs"]["gridq"]
    gaps = [*g.get("events_seq_gaps", []), *g.get("scale_events_seq_gaps", [])]
    if any(gaps):
        lines.append(f"  WARNING: event seq gaps seen by the subscriber: {gaps}")
    heard = [*g.get("events_during_run", []), *g.get("scale_events_during_run", [])]
    if any(count < 3 * cfg.n for count in heard):  # submitted, started, succeeded: at least 3 per task
        lines.append(f"  WARNING: fewer than 3 events per task reached the subscriber: {heard} for {cfg.n} tasks")
    for what, error in result["errors"].items():
        lines.append(f"  {what} skipped: {error.splitlines()[0][:300]}")
    if "dask" in result["runs"] and "error" in result["runs"]["dask"]:
        lines.append(f"  dask skipped: {result['runs']['dask']['error']}")
    lines.append(f"\nratios are gridq/baseline: above 1 is better for rates, worse for latency and RSS. "
                 f"took {result['elapsed_s']:.1f} s")
    return "\n".join(lines)
