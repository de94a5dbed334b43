"""AsyncClient: round-trip p50 against the plain pyzmq broker's, and its map rate against Client.map, one run.

Issue 14's figures: the round trip through ``AsyncClient`` (no thread hand-off)
beside ``Client``'s, both as ratios of the baseline's; ``AsyncClient.map``
against ``Client.map`` on the same cluster, the two clients taking turns so
that load drifts hit both alike. Alone: ``python -m scripts.benchmarks.sections.aio``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchmarks import baseline
from scripts.benchmarks.cluster import GridqCluster
from scripts.benchmarks.common import BenchConfig, median
from scripts.benchmarks.measure import gridq_latency, gridq_throughput

TITLE = "AsyncClient against Client and the pyzmq baseline"
ORDER = 20
#: every sample list this section fills
SAMPLES = ("baseline_p50_ms", "client_p50_ms", "aio_p50_ms", "client_map_tps", "aio_map_tps")


def skip_reason(cfg: BenchConfig) -> str | None:
    return None


async def aio_latency(client, n: int) -> dict:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await asyncio.wait_for(client.submit("noop"), 10)
        samples.append(time.perf_counter() - start)
    return baseline.latency_summary(samples)


async def aio_throughput(client, n: int) -> float:
    start = time.perf_counter()
    results = await client.map("noop", range(n))
    elapsed = time.perf_counter() - start
    if len(results) != n or any(r is not None for r in results):
        raise RuntimeError(f"AsyncClient.map returned {len(results)} results, expected {n} Nones")
    return n / elapsed


def run(cfg: BenchConfig) -> dict:
    from client import AsyncClient

    out: dict = {name: [] for name in SAMPLES}
    with baseline.start_cluster(workers=2) as cluster, baseline.BaselineClient(cluster.frontend) as base:
        baseline.measure_throughput(base, 200)  # warm-up: both workers joined
        for _ in range(cfg.reps):
            out["baseline_p50_ms"].append(baseline.measure_latency(base, cfg.latency_n)["p50_ms"])
    with tempfile.TemporaryDirectory() as logdir, GridqCluster(Path(logdir)) as cluster:
        cluster.start()
        sync = cluster.client
        gridq_throughput(sync, 200)  # warm-up

        async def turns() -> None:
            async with AsyncClient(cluster.frontend) as c:
                await c.map("noop", range(200))  # warm-up
                for _ in range(cfg.reps):
                    out["aio_p50_ms"].append((await aio_latency(c, cfg.latency_n))["p50_ms"])
                    out["client_p50_ms"].append(gridq_latency(sync, cfg.latency_n)["p50_ms"])
                    out["aio_map_tps"].append(await aio_throughput(c, cfg.n))
                    out["client_map_tps"].append(gridq_throughput(sync, cfg.n))

        asyncio.run(turns())
    med = {name: median(values) for name, values in out.items()}
    return {"samples": out, "median": med,
            "aio_p50_over_baseline": med["aio_p50_ms"] / med["baseline_p50_ms"],
            "client_p50_over_baseline": med["client_p50_ms"] / med["baseline_p50_ms"],
            "aio_map_over_client_map": med["aio_map_tps"] / med["client_map_tps"]}


def report(figures: dict, cfg: BenchConfig) -> str:
    med = figures["median"]
    return "\n".join([
        f"medians of {cfg.reps} rep(s); {cfg.latency_n} round trips per latency sample, {cfg.n:,} no-ops per map",
        f"  round trip p50: pyzmq baseline {med['baseline_p50_ms']:.3f} ms, Client {med['client_p50_ms']:.3f} ms "
        f"({figures['client_p50_over_baseline']:.2f}x), AsyncClient {med['aio_p50_ms']:.3f} ms "
        f"({figures['aio_p50_over_baseline']:.2f}x)",
        f"  map rate: Client {med['client_map_tps']:,.0f}/s, AsyncClient {med['aio_map_tps']:,.0f}/s "
        f"({figures['aio_map_over_client_map']:.2f}x)",
    ])


if __name__ == "__main__":
    config = BenchConfig.quick_config() if "--quick" in sys.argv else BenchConfig()
    result = run(config)
    print(report(result, config))
    print(json.dumps(result["samples"]))
