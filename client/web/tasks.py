"""A bounded window of recent tasks: fed by the event stream and by HTTP submissions, newest first."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import math
import time
from collections import OrderedDict
from concurrent.futures import CancelledError
from dataclasses import dataclass

import numpy as np

from client.errors import TaskError

#: tasks the window keeps (the oldest is forgotten first); results of HTTP-submitted tasks live here too
DEFAULT_WINDOW = 20_000
#: how long a finished HTTP-submitted task's result is kept (SPEC: an hour)
RESULT_TTL_S = 3600.0
#: states after which nothing changes
FINAL = frozenset({"succeeded", "failed", "cancelled"})

#: event topic -> the state it moves a task to
_EVENT_STATE = {"task.submitted": "queued", "task.started": "running", "task.succeeded": "succeeded",
                "task.failed": "failed", "task.retried": "queued", "task.cancelled": "cancelled"}


@dataclass(eq=False, slots=True)
class TaskRecord:
    task_id: str
    name: str
    order: int  #: position in submission order: the list cursor
    via: str  #: "http" (submitted here, result kept) or "events" (seen on the stream)
    state: str = "queued"
    submitted_at: float | None = None
    worker: str | None = None
    run_s: float | None = None
    result: object = None
    error: dict | None = None
    info: dict | None = None
    finished_at: float | None = None  #: local monotonic time it reached a final state
    done: asyncio.Event | None = None  #: made when someone waits on it

    def summary(self) -> dict:
        out = {"task_id": self.task_id, "name": self.name, "state": self.state, "submitted_at": self.submitted_at,
               "worker": self.worker, "run_s": self.run_s, "via": self.via}
        if self.error is not None:
            out["error"] = self.error
        return out

    def full(self) -> dict:
        out = self.summary()
        if self.state in FINAL:
            if self.state == "succeeded" and self.via == "http":
                out["result"] = to_json(self.result)  # converted when read, not for every result that comes
            info = self.info
            if info is None and self.via == "events":  # an event told how it ended
                info = {"worker": self.worker, "run_s": self.run_s}
            out["info"] = to_json(info)
        return out


class TaskWindow:
    """The most recent ``size`` tasks by submission; memory is bounded by ``size``."""

    def __init__(self, size: int = DEFAULT_WINDOW, result_ttl_s: float = RESULT_TTL_S) -> None:
        self.size = size
        self.result_ttl_s = result_ttl_s
        self._tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self._order = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        if record is not None and record.via == "http" and record.finished_at is not None \
                and time.monotonic() - record.finished_at > self.result_ttl_s:
            record.result = None  # kept for its state; the result itself has had its hour
        return record

    def _add(self, task_id: str, name: str, via: str) -> TaskRecord:
        self._order += 1
        tasks = self._tasks
        record = tasks[task_id] = TaskRecord(task_id, name, self._order, via)
        while len(tasks) > self.size:
            _, old = tasks.popitem(last=False)
            if old.done is not None:
                old.done.set()  # a waiter on a forgotten task answers with what it has
        return record

    # ------------------------------------------------------------ feeding

    def submitted(self, futures: list, tasks: list) -> None:
        """Tasks submitted through the gateway (their futures, and what was submitted: ``.task`` is the
        name): each future brings its task's result."""
        now, context, settle = time.time(), contextvars.copy_context(), self._settled  # one context for all
        for future, t in zip(futures, tasks):
            record = self._tasks.get(future.task_id) or self._add(future.task_id, t.task, "http")
            record.via = "http"
            record.submitted_at = record.submitted_at or now
            future.add_done_callback(settle, context=context)

    def _settled(self, future) -> None:
        record = self._tasks.get(future.task_id)
        if record is not None:  # else forgotten already (the window moved on)
            self._settle(record, future)

    def _settle(self, record: TaskRecord, future) -> None:
        record.info = future.info or record.info
        if future.cancelled():
            self._finish(record, "cancelled")
            return
        exc = future.exception()
        if exc is None:
            record.result = future.result()
            self._finish(record, "succeeded")
        elif isinstance(exc, TaskError):
            record.error = {"type": exc.type, "message": exc.message, "traceback": exc.traceback}
            self._finish(record, "failed")
        elif isinstance(exc, CancelledError):
            self._finish(record, "cancelled")
        else:  # BrokerUnavailable, a closed client: the gateway cannot tell how it ends
            record.error = {"type": type(exc).__name__, "message": str(exc), "traceback": ""}
            self._finish(record, "failed")
        if record.info:
            record.worker = record.worker or record.info.get("worker")
            record.run_s = record.run_s if record.run_s is not None else record.info.get("run_s")

    def _finish(self, record: TaskRecord, state: str, now: float | None = None) -> None:
        record.state = state
        record.finished_at = time.monotonic() if now is None else now
        if record.done is not None:
            record.done.set()

    def event(self, topic: str, ev: dict) -> None:
        """One task event off the stream."""
        self.events(topic, [ev])

    def events(self, topic: str, evs: list) -> None:
        """A run of one topic's task events off the stream, in order (called for every run: a few
        lookups per event)."""
        state = _EVENT_STATE.get(topic)
        if state is None:
            return
        tasks, final, now = self._tasks, state in FINAL, None
        submitted, succeeded = topic == "task.submitted", topic == "task.succeeded"
        for ev in evs:
            task_id = ev.get("task_id")
            if type(task_id) is not str:
                continue
            record = tasks.get(task_id)
            if record is None:
                if submitted:  # else submitted before the window saw it (or already forgotten)
                    record = self._add(task_id, str(ev.get("name", "")), "events")
                    record.submitted_at = ev.get("ts")
                    record.worker = ev.get("worker")
                continue
            if submitted:
                record.submitted_at = ev.get("ts") or record.submitted_at
            if record.state in FINAL:
                continue  # the future said so first; events do not move a finished task back
            if "worker" in ev:
                record.worker = ev["worker"]
            if not final:
                record.state = state
                continue
            if succeeded:
                record.run_s = ev.get("run_s")
            if record.via == "http":
                record.state = state  # shown at once; the future brings result and info
                continue
            if topic == "task.failed":
                record.error = {"type": str(ev.get("error_type", "Error")), "message": str(ev.get("error", "")),
                                "traceback": ""}
            # info ({"worker", "run_s"}) is made when the task is read: most never are
            self._finish(record, state, now := now or time.monotonic())

    # ------------------------------------------------------------ reading

    async def wait(self, record: TaskRecord, timeout_s: float) -> None:
        """Until ``record`` finishes or ``timeout_s`` pass."""
        if record.finished_at is not None or timeout_s <= 0:
            return
        if record.done is None:
            record.done = asyncio.Event()
        try:
            await asyncio.wait_for(record.done.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def list(self, *, state: str | None = None, name: str | None = None, limit: int = 100,
             cursor: int | None = None) -> tuple[list[dict], int | None]:
        """Newest first; ``cursor`` is the ``order`` below which to continue."""
        out, last = [], None
        for record in reversed(self._tasks.values()):
            if cursor is not None and record.order >= cursor:
                continue
            if (state is None or record.state == state) and (name is None or record.name == name):
                if len(out) == limit:
                    return out, last
                out.append(record.summary())
                last = record.order
        return out, None


_PLAIN = (str, int, bool)


def to_json(value):
    """A task's value as JSON can carry it: arrays as nested lists, bytes as base64, NaN as text."""
    if value is None or type(value) in _PLAIN:
        return value
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no such numbers
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, complex):
        return [value.real, value.imag]
    return value


__all__ = ["TaskWindow", "TaskRecord", "to_json", "FINAL", "DEFAULT_WINDOW"]
