"""scripts/bench: run the benchmark's sections, print their reports, keep every sample as JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
from pathlib import Path

import zmq

from broker.logs import configure_logging
from scripts.benchmarks import sections
from scripts.benchmarks.common import BenchConfig


class Watchdog:
    """Ends the bench, and every process it started, should a run outlast ``limit_s``: a bench never hangs."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watchdog", daemon=True)

    def _run(self) -> None:
        if self._done.wait(self.limit_s):
            return
        import psutil

        for child in psutil.Process().children(recursive=True):  # ours alone: we started each of them
            try:
                child.kill()
            except psutil.Error:
                pass
        sys.stderr.write(f"scripts/bench: gave up after {self.limit_s:.0f} s (see --timeout); stopped its processes\n")
        sys.stderr.flush()
        os._exit(3)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "platform": platform.platform()}


def parse_args(argv, names: list[str]) -> tuple[argparse.Namespace, BenchConfig]:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, smaller runs (about a minute)")
    p.add_argument("--reps", type=int, help="repetitions of each measurement (default 3, quick 1)")
    p.add_argument("-n", type=int, help="no-op tasks per throughput run (default 10000, quick 5000)")
    p.add_argument("--latency-n", type=int, help="round trips per latency run (default 500, quick 200)")
    p.add_argument("--scale-workers", type=int, help="simulated workers for the scale run (default 200)")
    p.add_argument("--scale-n", type=int, dest="scale_large_n", metavar="N",
                   help="tasks of the scale section's large map (default 1000000, quick 100000)")
    p.add_argument("--soak", type=float, dest="soak_s", metavar="SECONDS",
                   help="run the soak section (alone, unless --only names others) for this long")
    p.add_argument("--keyed", action="store_true",
                   help="the soak submits 100,000 keyed tasks per round, twice, to a broker with a journal")
    p.add_argument("--batch", type=int, dest="batch_lines", metavar="N",
                   help="run the batch section (alone, unless --only names others): gridq-submit of N keyed lines")
    p.add_argument("--only", action="append", choices=names, metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(names)}")
    p.add_argument("--json", default="bench-results.json", metavar="PATH", help="where to write all samples")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up on a section, stopping every process started, after this long "
                        "(default 120 quick, 900 otherwise; a section may set its own)")
    args = p.parse_args(argv)
    if args.keyed and args.soak_s is None:
        p.error("--keyed goes with --soak SECONDS")
    cfg = BenchConfig.quick_config() if args.quick else BenchConfig()
    cfg.soak_keyed = args.keyed
    if args.soak_s is not None and not args.only:
        args.only = ["soak"]
    if args.batch_lines is not None and not args.only:
        args.only = ["batch"]
    for name, flag in (("reps", "--reps"), ("n", "-n"), ("latency_n", "--latency-n"), ("scale_workers", "--scale-workers"),
                       ("scale_large_n", "--scale-n"), ("soak_s", "--soak"), ("batch_lines", "--batch")):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                p.error(f"{flag} must be >= 1")
            setattr(cfg, name, value)
    return args, cfg


def main(argv=None) -> int:
    found = sections.discover()
    args, cfg = parse_args(argv, list(found))
    configure_logging("console", "warning")  # the client's info lines would drown the report
    result: dict = {"config": vars(cfg), "machine": machine(), "skipped": {}}
    reports = []
    for name, section in found.items():
        if args.only and name not in args.only:
            continue
        reason = section.skip_reason(cfg)
        if reason is not None:
            result["skipped"][name] = reason
            reports.append(f"{section.TITLE}: skipped ({reason})")
            continue
        limit_s = args.timeout or getattr(section, "TIMEOUT_S", None) or (120.0 if cfg.quick else 900.0)
        if name == "soak":
            limit_s = max(limit_s, cfg.soak_s + 300.0)
        with Watchdog(limit_s):
            result[name] = figures = section.run(cfg)
        reports.append(f"{section.TITLE}: {section.report(figures, cfg)}")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"gridq bench: {m['cpus']} CPUs, python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}\n")
    print("\n\n".join(reports))
    print(f"samples written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
