"""The rules for a message's fields: limits, and the checks that turn a bad value into a ValueError.

Shared by everyone who reads or writes a field (the broker's decoding, the
client's submit, the worker's registry, the gateway's models); ``broker.protocol``
re-exports them, so the wire's vocabulary is imported from one place. This module
imports nothing of gridq.
"""

from __future__ import annotations

import math
import traceback

#: what a task needs when nobody declared anything
DEFAULT_RESOURCES = {"cpu": 1}
#: largest quantity of any one resource a request or an announcement may name
MAX_RESOURCE_QTY = 1e15
#: longest name of a task, worker, session, key or resource
MAX_NAME_LEN = 256
#: highest retries a submission may ask for
MAX_RETRIES = 100
#: longest wait before a task that raised runs again (its backoff doubles up to this)
MAX_BACKOFF_S = 3600.0
#: most exception type names one retry_on may list
MAX_RETRY_ON = 32


def check_resources(value) -> dict:
    """A copy of ``value`` if it is a valid resource map (name -> quantity), else ValueError."""
    if not isinstance(value, dict) or len(value) > 64:
        raise ValueError("resources must be a map of at most 64 name -> quantity")
    out = {}
    for name, qty in value.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise ValueError(f"resource name must be a non-empty string of at most {MAX_NAME_LEN} characters")
        if isinstance(qty, bool) or not isinstance(qty, (int, float)) or not (0 <= qty <= MAX_RESOURCE_QTY):
            raise ValueError(f"resource {name!r} must be a number in [0, {MAX_RESOURCE_QTY:g}], got {qty!r}")
        out[name] = qty
    return out


def check_name(value, what: str) -> str:
    """``value`` if it is a valid name (task, worker, session, key, id), else ValueError."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN:
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_NAME_LEN} characters")
    return value


def check_int(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_seconds(value, what: str, most: float = math.inf, zero: bool = False) -> float:
    """A positive (with ``zero``: non-negative) number of seconds, below ``most`` (at most, where finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (0 <= value if zero else 0 < value) and (value <= most if most < math.inf else value < most)):
        low = "non-negative" if zero else "positive"
        raise ValueError(f"{what} must be a {low} number of seconds" + (f" up to {most:g}" if most < math.inf else "")
                         + f", got {value!r}")
    return float(value)


def retry_names(retry_on) -> list[str]:
    """``retry_on`` (exception classes or their names) as a list of names, else ValueError."""
    if isinstance(retry_on, (str, type)):
        retry_on = (retry_on,)
    try:
        items = list(retry_on or ())
    except TypeError:
        raise ValueError(f"retry_on must be exception classes or names, got {retry_on!r}") from None
    names = []
    for item in items:
        if isinstance(item, type) and issubclass(item, BaseException):
            item = item.__name__
        if not isinstance(item, str) or not item or len(item) > MAX_NAME_LEN:
            raise ValueError(f"retry_on must be exception classes or names, got {item!r}")
        names.append(item)
    if len(names) > MAX_RETRY_ON:
        raise ValueError(f"retry_on may name at most {MAX_RETRY_ON} exception types")
    return names


def error_map(exc: BaseException) -> dict:
    """How a task's exception travels: ``type``, ``message``, ``traceback`` (text) and ``types``,
    the names of its classes (so that ``retry_on=(OSError,)`` also retries a ConnectionError)."""
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(traceback.format_exception(exc)),
            "types": [c.__name__ for c in type(exc).__mro__ if c is not object]}
