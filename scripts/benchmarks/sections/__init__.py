"""The benchmark's sections: each module here is one, found by ``discover()``; a new one is one new module.

A section module defines:

- ``TITLE``: the heading of its report;
- ``ORDER``: where it runs among the others (lower first);
- ``skip_reason(cfg) -> str | None``: why it cannot run here (no GPU, a missing package), or None;
- ``run(cfg) -> dict``: its figures, JSON-serialisable; they go to the JSON file under the module's name;
- ``report(figures, cfg) -> str``: its lines of the printed report;
- optionally ``TIMEOUT_S``: the longest it may take when ``--timeout`` is not given.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

#: what every section module must define
REQUIRED = ("TITLE", "ORDER", "skip_reason", "run", "report")


def discover() -> dict[str, ModuleType]:
    """Section name (its module's name) -> module, in running order."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [name for name in REQUIRED if not hasattr(module, name)]
        if missing:
            raise TypeError(f"benchmark section {info.name} lacks {', '.join(missing)}")
        found[info.name] = module
    return dict(sorted(found.items(), key=lambda item: item[1].ORDER))
