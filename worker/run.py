"""Running one task where it is: arguments decoded, the function called, a DONE entry out."""

from __future__ import annotations

import time

from broker.protocol import DoneRecord, EncodeError, ProtocolError, error_map, new_record, pack_value, unpack_value
from worker.registry import TaskSpec


def run_task(registry: dict[str, TaskSpec], task_id: str, name: str, args_blob, frames: list, gpu=None) -> tuple:
    """Run one task here and now: ``(DoneRecord, result frames)``."""
    started = time.perf_counter()
    try:
        spec = registry.get(name)
        if spec is None:
            raise LookupError(f"this worker does not serve task {name!r}")
        try:
            args, kwargs = unpack_value(args_blob, frames)
        except (ProtocolError, ValueError, TypeError) as exc:
            raise ProtocolError(f"arguments of {name!r} could not be decoded: {exc}") from None
        if gpu is not None and spec.needs_gpu:
            value = gpu.run(spec.fn, args, kwargs)
        else:
            value = spec.fn(*args, **kwargs)
        blob, out_frames = pack_value(value)
        # as DoneRecord(...) makes it, at a plain tuple's cost (the NamedTuple constructor takes keywords)
        return new_record(DoneRecord, (task_id, True, blob, len(out_frames), time.perf_counter() - started)), out_frames
    except BaseException as exc:  # a task may raise anything; it must not kill the slot
        if isinstance(exc, EncodeError):
            exc = EncodeError(f"result of {name!r} cannot be sent back: {exc}")
        return failure(task_id, False, exc, time.perf_counter() - started)


def failure(task_id: str, ok, exc: BaseException, run_s: float, traceback_text: str | None = None) -> tuple:
    """A DONE entry for a task that did not succeed; ``ok`` is False, or LOST where its child died."""
    error = error_map(exc)
    if traceback_text is not None:
        error["traceback"] = traceback_text
    return DoneRecord(task_id, ok, error, 0, run_s), []
