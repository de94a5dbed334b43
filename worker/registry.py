"""@task and the name -> function table that a worker serves."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

from broker.protocol import DEFAULT_RESOURCES, OUR_PACKAGES, check_resources, retry_names



@dataclass(frozen=True)
class TaskSpec:
    name: str
    fn: Callable
    resources: dict  #: what one run holds on its worker; announced to the broker
    retry_on: tuple = ()  #: exception type names the broker retries it on (announced)
    backoff_s: float = 0.0  #: first wait before such a retry, doubling each time (announced)

    @property
    def needs_gpu(self) -> bool:
        return self.resources.get("gpu", 0) > 0


#: every @task seen in this process, by name
REGISTRY: dict[str, TaskSpec] = {}


def task(fn: Callable | None = None, *, name: str | None = None, resources: dict | None = None, retry_on=(),
         backoff: float = 0.0):
    """Register a function as a gridq task: ``@task`` or ``@task(name=..., resources=...,
    retry_on=(ValueError, "MyError"), backoff=0.5)``; a submission's own retry_on/backoff win."""
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not backoff >= 0:
        raise ValueError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
    names = tuple(retry_names(retry_on))

    def register(f: Callable) -> Callable:
        spec = TaskSpec(name or f.__name__, f, check_resources(DEFAULT_RESOURCES if resources is None else resources),
                        names, float(backoff))
        REGISTRY[spec.name] = spec
        f.gridq_task = spec
        return f

    return register(fn) if fn is not None else register


def working_directory_last() -> None:
    """``python -m``/``-c`` put the working directory first on sys.path: move it to the END, so a
    user's file named like a library module (``client.py``) shadows nothing, here or in a child."""
    here = os.getcwd()
    front = [p for p in sys.path if p in ("", here)]
    if front:
        sys.path[:] = [p for p in sys.path if p not in ("", here)] + front


def load_modules(names: list[str]) -> None:
    """Import the modules given to --tasks so that their @task functions register."""
    for module in names:
        if module in OUR_PACKAGES:
            raise ImportError(f"task module {module!r} is named like gridq's own package {module!r}: rename it "
                              f"(gridq's import names are {', '.join(OUR_PACKAGES)})")
        importlib.import_module(module)
