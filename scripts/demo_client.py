"""The client side of scripts/demo: submit a few hundred tasks, arrays included, show results and status."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from client import Client, TaskError


def main(frontend: str, events: str, work: str) -> int:
    with Client(frontend, timeout=2.5) as c:
        deadline = time.monotonic() + 20
        while len(c.status()["workers"]) < 2:
            if time.monotonic() > deadline:
                print("workers did not join in 20 s", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print("== squares of 0..299 with map (batched submission and result collection)")
        started = time.perf_counter()
        squares = c.map("square", range(300))
        print(f"   first ten: {squares[:10]}  ({300 / (time.perf_counter() - started):,.0f} tasks/s)")

        print("== numpy arrays travel as zero-copy frames")
        rng = np.random.default_rng(0)
        arrays = [rng.random((256, 256)) for _ in range(8)]
        sums = c.gather([c.submit("sum", a) for a in arrays])
        print(f"   sums: {[round(s, 2) for s in sums]}")
        a, b = rng.random((64, 64)), rng.random((64, 64))
        product = c.submit("matmul", a, b).result(timeout=30)
        print(f"   matmul 64x64 matches numpy: {np.allclose(product, a @ b)}")

        print("== a failing task raises TaskError with the remote traceback")
        try:
            c.submit("sleep", "not-a-number").result(timeout=10)
        except TaskError as exc:
            print(f"   {exc}")

        print("== priorities and info")
        f = c.submit("sleep", 0.05, priority=5)
        f.result(timeout=10)
        print(f"   ran on {f.info['worker']} after {f.info['queued_s'] * 1000:.1f} ms in queue, {f.info['run_s'] * 1000:.1f} ms run")

        batch = f"{work}/batch.jsonl"
        with open(batch, "w") as fh:
            for i in range(200):
                fh.write(json.dumps({"id": f"job-{i}", "task": "square", "args": [i]}) + "\n")
        print("== gridq-submit: a 200-line batch file")
        rc = subprocess.call([sys.executable, "-m", "client.batch", batch, "--broker", frontend, "--out", f"{work}/results.jsonl"])
        if rc == 0:
            with open(f"{work}/results.jsonl") as fh:
                print(f"   {sum(1 for _ in fh)} result lines written")

        print("== status (gridq-status --once)")
        subprocess.call([sys.executable, "-m", "client.console", "--broker", frontend, "--events", events, "--once"])
        snap = c.status()
        print(f"== done={snap['done']} failed={snap['failed']} queued={snap['queued']} workers={len(snap['workers'])}")
        return 0 if rc == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main(*sys.argv[1:4]))
    except KeyboardInterrupt:  # Ctrl-C: scripts/demo stops everything it started
        sys.exit(130)
