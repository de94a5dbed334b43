"""Scale: a 10,000-item map against a 1,000,000-item one on one cluster: rate, client and broker RSS.

The map runs in a child process of its own (``--child``), so its peak RSS is the
client's alone. The broker's peak is sampled during each map; its RSS after the
large map, against before the small one, is what finished work left behind.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchmarks.cluster import GridqCluster
from scripts.benchmarks.common import MIB, ROOT, BenchConfig
from scripts.benchmarks.measure import RssSampler

TITLE = "scale: a small map against a large one"
ORDER = 20
TIMEOUT_S = 3600.0
#: repetitions of the small map in its child (the median is reported)
SMALL_REPS = 3


def skip_reason(cfg: BenchConfig) -> str | None:
    return None


def run(cfg: BenchConfig) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="gridq-bench-scale-") as tmp, GridqCluster(Path(tmp)).start() as cluster:
        cluster.client.map("noop", range(2000))  # warm-up: workers known to be short, code paths hot
        import psutil

        broker = psutil.Process(cluster.broker_pid)
        out["broker_rss_before_MiB"] = broker.memory_info().rss / MIB
        for label, n, reps in (("small", cfg.scale_small_n, SMALL_REPS), ("large", cfg.scale_large_n, 1)):
            load = psutil.getloadavg()[0]
            broker_cpu_s = sum(broker.cpu_times()[:2])
            with RssSampler(cluster.broker_pid) as rss:
                child = _child(cluster.frontend, n, reps)
            broker_us = (sum(broker.cpu_times()[:2]) - broker_cpu_s) / (n * reps + 1000) * 1e6
            out[label] = {**child, "n": n, "broker_peak_rss_MiB": rss.peak_mib, "load_1min": load,
                          "broker_cpu_us_per_task": broker_us, "broker_rss_after_MiB": broker.memory_info().rss / MIB}
    out["large_over_small_rate"] = out["large"]["rate_tps"] / out["small"]["rate_tps"]
    return out


def _child(frontend: str, n: int, reps: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "scripts.benchmarks.sections.scale", "--child", frontend, str(n),
                           str(reps)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"scale child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(frontend: str, n: int, reps: int) -> dict:
    """In the child: ``reps`` maps of ``n`` no-ops; the median rate, CPU per task and this process's peak RSS."""
    from client import Client

    with Client(frontend) as client:
        client.map("noop", range(1000))
        rates, cpu_s = [], 0.0
        for _ in range(reps):
            start, cpu = time.perf_counter(), time.process_time()
            results = client.map("noop", range(n))
            rates.append(n / (time.perf_counter() - start))
            cpu_s += time.process_time() - cpu
            if len(results) != n or any(r is not None for r in results):
                raise RuntimeError(f"map returned {len(results)} results, expected {n} Nones")
            del results
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"rate_tps": statistics.median(rates), "rates_tps": rates, "client_peak_rss_MiB": peak_kib / 1024,
            "client_cpu_us_per_task": cpu_s / (n * reps) * 1e6}


def report(figures: dict, cfg: BenchConfig) -> str:
    lines = ["", f"{'map size':>10} {'tasks/s':>9} {'CPU us/task client':>19} {'broker':>7} {'client peak RSS':>16} "
             f"{'broker peak RSS':>16} {'broker RSS after':>17} {'load':>5}"]
    for label in ("small", "large"):
        f = figures[label]
        lines.append(f"{f['n']:>10,} {f['rate_tps']:>9,.0f} {f['client_cpu_us_per_task']:>19.1f} "
                     f"{f['broker_cpu_us_per_task']:>7.1f} {f['client_peak_rss_MiB']:>12.0f} MiB "
                     f"{f['broker_peak_rss_MiB']:>12.0f} MiB {f['broker_rss_after_MiB']:>13.0f} MiB {f['load_1min']:>5.1f}")
    grown = figures["large"]["broker_rss_after_MiB"] - figures["broker_rss_before_MiB"]
    lines.append(f"large/small rate {figures['large_over_small_rate']:.2f} (goal >= 0.90); client peak with the "
                 f"large map {figures['large']['client_peak_rss_MiB']:.0f} MiB (goal < 300); broker RSS "
                 f"{grown:+.0f} MiB after {cfg.scale_small_n * SMALL_REPS + cfg.scale_large_n:,} tasks (goal <= 100)")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(child_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
