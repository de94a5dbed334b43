"""Tasks for the chaos tests; workers serve them with --tasks tests.reliability_tasks."""

from __future__ import annotations

import os
import time

from worker import task


@task(name="rel.record")
def record(path: str, i, seconds: float = 0.0):
    """Sleeps, then appends ``"i pid"`` to ``path``: the ground truth of how often each task ran.

    One ``os.write`` on an O_APPEND descriptor per line, so lines from several
    worker processes never interleave.
    """
    if seconds:
        time.sleep(seconds)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{i} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return i


@task(name="rel.crash")
def crash(code: int = 1):
    """Kills the worker process running it, as a segfault or the OOM killer would."""
    os._exit(code)


@task(name="rel.spin")
def spin(seconds: float):
    """Pure Python that holds the GIL for ``seconds`` (no sleep, no C call that releases it)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def executions(path) -> dict:
    """``{i: [pid, ...]}`` from a file written by ``record``: who ran each task, how often."""
    runs: dict = {}
    try:
        with open(path) as f:  # closed at once: an open file left to the garbage collector is a ResourceWarning
            text = f.read()
    except FileNotFoundError:
        return runs
    for line in text.splitlines():
        i, pid = line.split()
        runs.setdefault(int(i), []).append(int(pid))
    return runs
