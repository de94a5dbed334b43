"""The comparison's measurements on a 2-process dask LocalCluster, only where ``distributed`` is installed."""

from __future__ import annotations

import collections
import importlib.util
import time
import warnings

import numpy as np

from scripts.benchmarks import baseline
from scripts.benchmarks.common import RESULT_TIMEOUT_S, BenchConfig


def available() -> bool:
    return importlib.util.find_spec("distributed") is not None


def _noop(*_args):
    return None


def _sum(a):
    return float(np.sum(a))


def run(cfg: BenchConfig) -> dict:
    from distributed import Client as DaskClient, LocalCluster

    n = min(cfg.n, 500) if cfg.quick else cfg.n  # dask is ~100x slower per task; keep --quick quick
    out: dict = collections.defaultdict(list)
    big = baseline.payload_array(cfg.big_payload_bytes)
    small = baseline.payload_array(cfg.small_payload_bytes)
    with warnings.catch_warnings(), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            DaskClient(lc) as dc:
        warnings.simplefilter("ignore")  # dask warns that a 64 MiB argument is large: here that is the point
        dc.gather(dc.map(_noop, range(200), pure=False))
        for _ in range(cfg.reps):
            start = time.perf_counter()
            dc.gather(dc.map(_noop, range(n), pure=False))
            out["throughput_tps"].append(n / (time.perf_counter() - start))
            samples = []
            for _ in range(cfg.latency_n):
                t0 = time.perf_counter()
                dc.submit(_noop, pure=False).result(timeout=10)
                samples.append(time.perf_counter() - t0)
            lat = baseline.latency_summary(samples)
            out["latency_p50_ms"].append(lat["p50_ms"])
            out["latency_p99_ms"].append(lat["p99_ms"])
            start = time.perf_counter()
            for _ in range(cfg.big_payload_count):
                dc.submit(_sum, big, pure=False).result(timeout=RESULT_TIMEOUT_S)
            out["payload_big_MBps"].append(big.nbytes * cfg.big_payload_count / (time.perf_counter() - start) / 1e6)
            start = time.perf_counter()
            dc.gather([dc.submit(_sum, small, pure=False) for _ in range(cfg.small_payload_count)])
            out["payload_small_MBps"].append(
                small.nbytes * cfg.small_payload_count / (time.perf_counter() - start) / 1e6)
    return dict(out)
