#!/usr/bin/env python3
"""AsyncClient figures, one run: round-trip p50 against the plain pyzmq baseline, map rate against Client.map.

Starts the baseline (client.bench_baseline: broker and 2 workers) and a gridq
cluster (broker and 2 workers of 1 slot, as scripts/bench does), measures, and
prints a table and, with --json, the samples. Every process it starts is ended
by PID. Usage: .venv/bin/python scripts/bench_aio.py [--reps 3] [-n 10000] [--latency-n 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import AsyncClient  # noqa: E402
from client import bench_baseline  # noqa: E402
from client.bench import GridqCluster, gridq_latency, gridq_throughput  # noqa: E402


async def aio_latency(c: AsyncClient, n: int) -> dict:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await asyncio.wait_for(c.submit("noop"), 10)
        samples.append(time.perf_counter() - start)
    return bench_baseline.latency_summary(samples)


async def aio_throughput(c: AsyncClient, n: int) -> float:
    start = time.perf_counter()
    results = await c.map("noop", range(n))
    elapsed = time.perf_counter() - start
    if len(results) != n or any(r is not None for r in results):
        raise RuntimeError(f"AsyncClient.map returned {len(results)} results, expected {n} Nones")
    return n / elapsed


def measure(reps: int, n: int, latency_n: int) -> dict:
    out: dict = {k: [] for k in ("baseline_p50_ms", "client_p50_ms", "aio_p50_ms", "client_map_tps", "aio_map_tps")}
    with bench_baseline.start_cluster(workers=2) as cluster, bench_baseline.BaselineClient(cluster.frontend) as base:
        bench_baseline.measure_throughput(base, 200)  # warm-up: both workers joined
        for _ in range(reps):
            out["baseline_p50_ms"].append(bench_baseline.measure_latency(base, latency_n)["p50_ms"])
    with tempfile.TemporaryDirectory() as logdir, GridqCluster(Path(logdir)) as cluster:
        cluster.start()
        sync = cluster.client

        async def run_async() -> None:
            async with AsyncClient(cluster.frontend) as c:
                await c.map("noop", range(200))  # warm-up
                for _ in range(reps):  # the two clients take turns, so load drifts hit both alike
                    out["aio_p50_ms"].append((await aio_latency(c, latency_n))["p50_ms"])
                    out["aio_map_tps"].append(await aio_throughput(c, n))
                    out["client_p50_ms"].append(gridq_latency(sync, latency_n)["p50_ms"])
                    out["client_map_tps"].append(gridq_throughput(sync, n))

        gridq_throughput(sync, 200)  # warm-up
        asyncio.run(run_async())
    return out


def report(out: dict, n: int) -> str:
    med = {k: statistics.median(v) for k, v in out.items()}
    base = med["baseline_p50_ms"]
    return "\n".join([
        f"{'metric':<34} {'value':>10} {'ratio':>8}",
        f"{'round trip p50, pyzmq baseline':<34} {base:>8.3f}ms {1.0:>8.2f}",
        f"{'round trip p50, Client':<34} {med['client_p50_ms']:>8.3f}ms {med['client_p50_ms'] / base:>8.2f}",
        f"{'round trip p50, AsyncClient':<34} {med['aio_p50_ms']:>8.3f}ms {med['aio_p50_ms'] / base:>8.2f}",
        f"{f'Client.map of {n:,} no-ops':<34} {med['client_map_tps']:>7,.0f}/s {1.0:>8.2f}",
        f"{f'AsyncClient.map of {n:,} no-ops':<34} {med['aio_map_tps']:>7,.0f}/s "
        f"{med['aio_map_tps'] / med['client_map_tps']:>8.2f}",
        f"(medians of {len(out['aio_p50_ms'])} reps; latency ratios against the baseline, rates against Client.map)",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("-n", type=int, default=10_000, help="no-op tasks per map")
    p.add_argument("--latency-n", type=int, default=500, help="round trips per latency sample")
    p.add_argument("--json", action="store_true", help="print every sample as JSON too")
    args = p.parse_args(argv)
    out = measure(args.reps, args.n, args.latency_n)
    print(report(out, args.n))
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
