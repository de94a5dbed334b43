"""What every part of the benchmark shares: its configuration and constants."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

#: repository root: where ``python -m broker`` and ``python -m worker`` are run from
ROOT = Path(__file__).resolve().parents[2]
#: longest wait for any single result, in seconds
RESULT_TIMEOUT_S = 60.0
#: longest wait for a started cluster to show all its workers, in seconds
JOIN_TIMEOUT_S = 30.0
#: how long a stopping gridq process gets after SIGTERM before SIGKILL, in seconds
STOP_TIMEOUT_S = 10.0
#: in-flight window of the baseline's pipelined client for the no-op runs (the issue: >= 1,000)
THROUGHPUT_WINDOW = 2000
#: in-flight window of both systems for the 1 MiB payload runs
SMALL_PAYLOAD_WINDOW = 8

MIB = 1 << 20


@dataclass
class BenchConfig:
    reps: int = 3
    n: int = 10_000  #: no-op tasks per throughput run
    latency_n: int = 500  #: round trips per latency run
    big_payload_bytes: int = 64 * MIB
    big_payload_count: int = 3
    small_payload_bytes: int = MIB
    small_payload_count: int = 64
    scale_workers: int = 200
    scale_small_n: int = 10_000  #: the small map of the scale section
    scale_large_n: int = 1_000_000  #: the large map of the scale section
    soak_s: float = 0.0  #: seconds of back-to-back maps for the soak section (0: no soak)
    batch_lines: int = 0  #: lines of the batch section's gridq-submit run (0: no batch run)
    soak_keyed: bool = False  #: the soak submits keyed tasks twice, with a journal
    quick: bool = False

    @classmethod
    def quick_config(cls) -> "BenchConfig":
        return cls(reps=1, n=5000, latency_n=200, big_payload_count=1, small_payload_count=16, scale_large_n=100_000,
                   quick=True)


def median(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
