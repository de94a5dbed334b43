"""Batch (``--batch N``): a ``gridq-submit`` run of N lines (every line a keyed task) against a
broker with a journal; the broker's peak RSS must stay under ``MAX_BROKER_MIB``.

SPEC: with ``--journal`` keyed results live in the journal, not in memory, so a
million-line run keeps the broker under 300 MiB. ``gridq-submit`` runs as a user runs it
(its own process, results to a file); every result line is read back and checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchmarks.cluster import GridqCluster
from scripts.benchmarks.common import ROOT, BenchConfig
from scripts.benchmarks.measure import RssSampler

TITLE = "batch: a gridq-submit run against a broker with a journal"
ORDER = 35
TIMEOUT_S = 7200.0
#: the most the broker's RSS may reach during the run, in MiB
MAX_BROKER_MIB = 300.0


def skip_reason(cfg: BenchConfig) -> str | None:
    return None if cfg.batch_lines > 0 else "runs with --batch N only"


def run(cfg: BenchConfig) -> dict:
    n = cfg.batch_lines
    with tempfile.TemporaryDirectory(prefix="gridq-bench-batch-") as tmp:
        lines, out = Path(tmp) / "tasks.jsonl", Path(tmp) / "results.jsonl"
        with lines.open("w") as f:
            for i in range(n):
                f.write(f'{{"id": {i}, "task": "square", "args": [{i}]}}\n')
        with GridqCluster(Path(tmp), journal=str(Path(tmp) / "journal.db")).start() as cluster, \
                RssSampler(cluster.broker_pid) as rss:
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "client.batch", "--broker", cluster.frontend,
                                   "--out", str(out), "--quiet", str(lines)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
            elapsed = time.monotonic() - started
            status = cluster.client.status()
        if proc.returncode != 0:
            raise RuntimeError(f"gridq-submit exited {proc.returncode}: {proc.stderr[-2000:]}")
        wrong = seen = 0
        with out.open() as f:
            for line in f:
                row = json.loads(line)
                seen += 1
                wrong += row.get("result") != row["id"] ** 2
    return {"lines": n, "seconds": elapsed, "rate_tps": n / elapsed, "broker_start_MiB": rss.start / 2**20,
            "broker_peak_MiB": rss.peak_mib, "results": seen, "wrong": wrong, "broker_done": status["done"],
            "summary": [line.strip() for line in proc.stderr.strip().splitlines()[-3:]]}


def report(figures: dict, cfg: BenchConfig) -> str:
    peak = figures["broker_peak_MiB"]
    return (f"{figures['lines']:,} keyed lines in {figures['seconds']:.0f} s ({figures['rate_tps']:,.0f}/s); "
            f"broker RSS {figures['broker_start_MiB']:.0f} MiB at start, peak {peak:.0f} MiB "
            f"(goal < {MAX_BROKER_MIB:.0f}): {'ok' if peak < MAX_BROKER_MIB else 'OVER'}\n"
            f"result lines {figures['results']:,} ({figures['wrong']} wrong), broker done {figures['broker_done']:,}; "
            f"gridq-submit said: {' | '.join(figures['summary'])}")
