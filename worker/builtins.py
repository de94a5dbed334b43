"""Built-in tasks every worker serves (CPU; the GPU ones live in worker/gpu.py)."""

from __future__ import annotations

import time

import numpy as np

from worker.registry import task


@task
def noop(*args, **kwargs):
    return None


@task
def echo(x):
    return x


@task
def sleep(seconds):
    time.sleep(float(seconds))
    return seconds


@task
def square(x):
    return x * x


@task(name="sum")
def array_sum(a):
    return float(np.sum(a))


@task
def matmul(a, b):
    return np.asarray(a) @ np.asarray(b)

