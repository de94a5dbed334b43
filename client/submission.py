"""What one submitted task becomes: its options checked as the broker would, and its SUBMIT record.

Shared by ``Client`` and ``AsyncClient`` (through ``Engine.make_task``) and by their ``map``s,
which split their keyword arguments once for every item (``split_options``).
"""

from __future__ import annotations

from broker.protocol import (MAX_BACKOFF_S, MAX_RETRIES, SubmitRecord, new_record, check_int, check_name,
                             check_resources, check_seconds, pack_value, retry_names)


def _check_options(resources, priority, retries, timeout, key) -> dict | None:
    """Refuse bad task options (ValueError) as the broker would; returns the checked resources."""
    check_int(priority, "priority", -(2**31), 2**31)
    if retries is not None:
        check_int(retries, "retries", 0, MAX_RETRIES)
    if timeout is not None:
        check_seconds(timeout, "timeout")
    if key is not None:
        check_name(key, "key")
    return None if resources is None else check_resources(resources)


def task_record(task_id: str, name: str, args: tuple, kwargs: dict, *, resources: dict | None = None,
                priority: int = 0, retries: int | None = None, timeout: float | None = None, key: str | None = None,
                retry_on=(), backoff: float = 0.0) -> tuple[SubmitRecord, tuple | list]:
    """A checked SUBMIT record and its array frames; bad input raises here. ``retry_on``
    (exception classes or names) and ``backoff`` (seconds, doubling) make the broker run the
    task again after it raised one of those, within ``retries``."""
    if not isinstance(name, str) or not name:
        raise ValueError("task name must be a non-empty string")
    if (type(priority) is not int or priority or retries is not None or timeout is not None or key is not None
            or resources is not None):
        resources = _check_options(resources, priority, retries, timeout, key)  # most tasks have none
    names, backoff_s = None, None  # left off: the broker's defaults
    if retry_on or backoff:
        names, backoff_s = tuple(retry_names(retry_on)), check_seconds(backoff, "backoff", MAX_BACKOFF_S, zero=True)
    blob, frames = pack_value([args, kwargs])  # raises EncodeError for what cannot travel
    # a tuple of atoms, and no empty list: the garbage collector stops tracking them. Made as
    # SubmitRecord(...) makes it, at a plain tuple's cost (its keyword handling was a third of this)
    return new_record(SubmitRecord, (task_id, name, blob, len(frames), resources, priority, retries, timeout, key,
                                      names, backoff_s)), frames or ()


def record_maker(name: str, options: dict, kwargs: dict):
    """For a ``map``: ``make(task_id, item)`` -> the record and frames of ``name(item, **kwargs)``
    with ``options``, checked once (on the first item, where ``submit`` would raise) instead of
    per item."""
    template = None

    def make(task_id: str, item) -> tuple[SubmitRecord, tuple | list]:
        nonlocal template
        if template is None:
            template, frames = task_record(task_id, name, (item,), kwargs, **options)
            return template, frames
        blob, frames = pack_value([(item,), kwargs])
        return new_record(SubmitRecord, (task_id, name, blob, len(frames), *template[4:])), frames or ()

    return make


#: the keyword arguments of ``submit`` (and ``map``) that are the task's options; any other goes to the task
TASK_OPTIONS = ("resources", "priority", "retries", "timeout", "key", "retry_on", "backoff")


def split_options(options: dict) -> tuple[dict, dict]:
    """``submit``'s keyword arguments as (``task_record``'s options, the task's own kwargs)."""
    kwargs = dict(options)
    return {k: kwargs.pop(k) for k in TASK_OPTIONS if k in kwargs}, kwargs


__all__ = ["SubmitRecord", "TASK_OPTIONS", "record_maker", "split_options", "task_record"]
