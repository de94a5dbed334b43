"""Tasks for the resource-routing and GPU tests; workers serve them with --tasks tests.gpu_tasks."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from worker import task

GPU = {"gpu": 1}


@task(name="fake.gpu", resources=GPU)
def fake_gpu(seconds: float = 0.05):
    """Holds a GPU briefly; returns the pid of the worker that ran it."""
    time.sleep(seconds)
    return os.getpid()


@task(name="fake.gpu_gate", resources=GPU)
def gpu_gate(path: str, timeout_s: float = 60.0):
    """Holds a GPU until ``path`` exists, so a test decides when it ends; returns the worker's pid."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.01)
    return os.getpid()


@task(name="fake.rendezvous", resources=GPU)
def rendezvous(directory: str, parties: int, timeout_s: float = 30.0) -> bool:
    """Arrives in ``directory`` and waits for ``parties`` arrivals: True only where they ran at once."""
    Path(directory, f"{os.getpid()}-{threading.get_ident()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(directory)) < parties:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@task(name="gpu.inspect", resources=GPU)
def gpu_inspect(a, nested):
    """What a GPU task sees: the type and device of its arguments (needs a --gpu worker)."""
    import cupy

    def describe(x):
        return {"module": type(x).__module__.split(".")[0], "device": int(x.device.id) if hasattr(x, "device") else None}

    return {"a": describe(a), "nested": describe(nested["xs"][0]), "current": int(cupy.cuda.Device().id),
            "double": a * 2, "pair": (nested["xs"][0] + 1, [cupy.zeros(3)])}
