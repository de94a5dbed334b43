"""@task and the name -> function table that a worker serves."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

#: what a task needs when its @task names nothing
DEFAULT_RESOURCES = {"cpu": 1}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fn: Callable
    resources: dict  #: what one run holds on its worker; announced to the broker

    @property
    def needs_gpu(self) -> bool:
        return self.resources.get("gpu", 0) > 0


#: every @task seen in this process, by name
REGISTRY: dict[str, TaskSpec] = {}


def task(fn: Callable | None = None, *, name: str | None = None, resources: dict | None = None):
    """Register a function as a gridq task: ``@task`` or ``@task(name=..., resources=...)``."""

    def register(f: Callable) -> Callable:
        spec = TaskSpec(name or f.__name__, f, _checked(dict(DEFAULT_RESOURCES if resources is None else resources)))
        REGISTRY[spec.name] = spec
        f.gridq_task = spec
        return f

    return register(fn) if fn is not None else register


def _checked(resources: dict) -> dict:
    for key, qty in resources.items():
        if not isinstance(key, str) or isinstance(qty, bool) or not isinstance(qty, (int, float)) or not (0 <= qty < math.inf):
            raise ValueError(f"resource {key!r}={qty!r}: resources map names to non-negative numbers")
    return resources


def load_modules(names: list[str]) -> None:
    """Import the modules given to --tasks so that their @task functions register."""
    for module in names:
        importlib.import_module(module)
