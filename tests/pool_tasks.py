"""Tasks for the process-pool tests; workers serve them with --tasks tests.pool_tasks."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from worker import task

#: what pool.hog keeps alive in its process, so its memory stays resident after it returns
_kept: list = []


@task(name="pool.pid")
def pid():
    return os.getpid()


@task(name="pool.forever")
def forever(path: str | None = None):
    """Pure Python that never returns; writes its pid to ``path`` first (to be killed by it)."""
    if path:
        Path(path).write_text(str(os.getpid()))
    while True:
        pass


@task(name="pool.gate")
def gate(started: str, release: str, *arrays):
    """Writes its pid to ``started``, waits (up to 60 s) until ``release`` exists; returns its pid."""
    Path(started).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@task(name="pool.exit")
def exit_now(code: int = 3):
    """Ends the process running it at once, as a segfault or the OOM killer would."""
    os._exit(code)


@task(name="pool.exit_once")
def exit_once(path: str):
    """Ends its process the first time (creating ``path``), returns its pid the next."""
    if not os.path.exists(path):
        Path(path).touch()
        os._exit(3)
    return os.getpid()


@task(name="pool.hog")
def hog(mib: int):
    """Keeps ``mib`` MiB resident in its process (a leak); returns its pid."""
    _kept.append(np.ones(mib << 17))  # 8-byte floats, all pages touched
    return os.getpid()


@task(name="pool.digest")
def digest(a, small):
    """What arrived: sha256, dtype, shape and whether it is a read-only view, and the pid."""
    return [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(), a.dtype.str, list(a.shape),
            bool(a.flags.writeable), float(np.sum(small)), os.getpid()]
