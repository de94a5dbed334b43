"""A clear error where an import of gridq's finds a module of the user's named like gridq's.

gridq's import names (``broker``, ``worker``, ``client``) are generic: a ``broker.py``
beside the user's script comes first on ``sys.path`` and hides gridq's package.
Only the standard library is imported here, so this works whatever is shadowed;
``worker`` loads this file by its path (importing ``client`` would run its __init__).
"""

from __future__ import annotations

import os
import sys

#: the directory that holds gridq's packages
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def explain(exc: ImportError, importer: str) -> ImportError:
    """``exc`` as a message that names the foreign module, where a foreign module caused it."""
    name = (exc.name or "").partition(".")[0]
    ours = bool(name) and os.path.isfile(os.path.join(ROOT, name, "__init__.py"))
    found = getattr(sys.modules.get(name), "__file__", None) or ""
    if not ours or not found or os.path.abspath(found).startswith(os.path.join(ROOT, name) + os.sep):
        return exc
    return ImportError(f"gridq's {importer!r} imports gridq's {name!r} package, but {name!r} is {found}, a module "
                       f"of yours named like it: rename that file (gridq's import names are broker, worker and "
                       f"client) or run from another directory", name=exc.name)
