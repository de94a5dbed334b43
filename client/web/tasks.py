"""A bounded window of recent tasks: fed by the event stream and by HTTP submissions, newest first."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import math
import time
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass
from itertools import islice, repeat
from operator import itemgetter, methodcaller

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
    """A task as the API shows it: kept for one submitted through the gateway (its result comes by
    its future), made when read for one seen only on the event stream."""

    task_id: str
    name: str
    via: str  #: "http" (submitted here, result kept) or "events" (seen on the stream)
    state: str = "queued"
    submitted_at: float | None = None
    worker: str | None = None
    run_s: float | None = None
    result: object = None
    error: dict | None = None
    info: dict | None = None
    finished_at: float | None = None  #: local monotonic time it reached a final state (its future: "http")
    done: asyncio.Event | None = None  #: made when someone waits on it ("http")

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


_task_id = itemgetter("task_id")
_maybe_task_id = methodcaller("get", "task_id")


def _seq_of(event: dict) -> int:
    seq = event.get("seq")
    return seq if type(seq) is int else 0


class TaskWindow:
    """The most recent ``size`` tasks by submission; memory is bounded by ``size``.

    The event stream brings a few events a task, thousands a second, and most tasks are never
    read: a run of events costs a dict ``update`` (a loop in C), not a step per event, and where
    the window ``follow``s the event hub's ring it takes the runs from there only when it is read.
    The window keeps, per task, its ``task.submitted`` event (the window's order: a dict's) and
    its latest event of each later topic; a task's record is made from those when it is read.
    Tasks submitted through the gateway also keep a TaskRecord, which their future settles
    (result, error, info)."""

    def __init__(self, size: int = DEFAULT_WINDOW, result_ttl_s: float = RESULT_TTL_S) -> None:
        self.size = size
        self.result_ttl_s = result_ttl_s
        #: task id -> its task.submitted event (or a stand-in for one submitted here), oldest first
        self._submitted: dict = {}
        #: per topic after the submission: task id -> its latest event of that topic (the one of the
        #: highest seq among them is where the task is; no tuple made per event)
        self._after: dict[str, dict] = {topic: {} for topic in _EVENT_STATE if topic != "task.submitted"}
        self._http: dict[str, TaskRecord] = {}  #: tasks submitted through the gateway
        self._waiters: dict[str, asyncio.Event] = {}  #: tasks seen on the stream that a request waits on
        self._forgotten = 0  #: tasks dropped off the old end: with a position, a task's place in the order
        #: tasks held beyond ``size`` before the oldest go (read answers trim to ``size`` first)
        self._slack = max(size // 8, 1)
        self._ring = None  #: the event hub's ring (client/web/ring.py), when followed
        self._seen: int | None = None  #: seq of the last ring event taken in (None: take the whole ring)

    def __len__(self) -> int:
        self._current()
        return len(self._submitted)

    def get(self, task_id: str) -> TaskRecord | None:
        self._current()
        event = self._submitted.get(task_id)
        if event is None:
            return None
        return self._record(task_id, event)

    def _latest(self, task_id: str) -> tuple[str | None, dict | None]:
        """The task's latest event after its submission, and its topic."""
        topic, ev, seq = None, None, -1
        for name, events in self._after.items():
            found = events.get(task_id)
            if found is not None and _seq_of(found) >= seq:  # (no seq: the later in the lifecycle)
                topic, ev, seq = name, found, _seq_of(found)
        return topic, ev

    def _record(self, task_id: str, submitted: dict) -> TaskRecord:
        topic, ev = self._latest(task_id)
        record = self._http.get(task_id)
        if record is None:  # seen on the stream only: made from its events
            record = TaskRecord(task_id, str(submitted.get("name", "")), "events", submitted_at=submitted.get("ts"))
            if ev is not None:
                record.state = _EVENT_STATE[topic]
                record.worker = ev.get("worker")
                if topic == "task.succeeded":
                    record.run_s = ev.get("run_s")
                elif topic == "task.failed":
                    record.error = {"type": str(ev.get("error_type", "Error")), "message": str(ev.get("error", "")),
                                    "traceback": ""}
            return record
        record.submitted_at = submitted.get("ts") or record.submitted_at
        if record.finished_at is not None:
            if record.result is not None and time.monotonic() - record.finished_at > self.result_ttl_s:
                record.result = None  # kept for its state; the result itself has had its hour
            return record
        if ev is not None:  # its future has not settled: its events say where it is
            record.state = _EVENT_STATE[topic]
            record.worker = ev.get("worker", record.worker)
            if topic == "task.succeeded":
                record.run_s = ev.get("run_s")
        return record

    # ------------------------------------------------------------ feeding

    def submitted(self, futures: list, tasks: list) -> None:
        """Tasks submitted through the gateway (their futures, and what was submitted: ``.task`` is the
        name): each future brings its task's result."""
        self._catch_up()  # the stream's tasks submitted before these take their places first
        now, context, settle = time.time(), contextvars.copy_context(), self._settled  # one context for all
        known, http = self._submitted, self._http
        for future, t in zip(futures, tasks):
            task_id = future.task_id
            if task_id not in known:  # its event has not come yet: a stand-in keeps its place in the order
                known[task_id] = {"task_id": task_id, "name": t.task, "ts": now}
            http[task_id] = TaskRecord(task_id, t.task, "http", submitted_at=now)
            future.add_done_callback(settle, context=context)
        self._trim(self.size + self._slack)

    def _settled(self, future) -> None:
        record = self._http.get(future.task_id)
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

    def _finish(self, record: TaskRecord, state: str) -> None:
        record.state = state
        record.finished_at = time.monotonic()
        if record.done is not None:
            record.done.set()

    # ------------------------------------------------------------ the event stream, lazily

    def follow(self, ring) -> None:
        """Take the stream's task events from ``ring`` (the event hub's), when the window is read
        (or a task submitted), not as they come: a flood that nobody looks at costs the window
        nothing. Where the ring has moved past what the window took, the window starts again from
        the ring (tasks submitted through the gateway stay): no task shows a state that an event it
        missed has changed since."""
        self._ring, self._seen = ring, None

    def notice(self, topic: str, evs: list) -> None:
        """A run of events as it comes (the event hub calls it for every run): wakes the requests
        waiting on a task it finishes, and nothing else."""
        if self._waiters and topic in _FINAL_TOPICS:
            try:
                ids = set(map(_maybe_task_id, evs))
            except TypeError:  # an unhashable id
                ids = {ev.get("task_id") for ev in evs if type(ev.get("task_id")) is str}
            for task_id in self._waiters.keys() & ids:
                self._waiters.pop(task_id).set()

    def ring_cleared(self) -> None:
        """The hub is about to empty its ring (a snapshot after a gap or a restart): take it in first."""
        self._catch_up()
        self._seen = None  # what comes next starts the ring again

    def _current(self) -> None:
        self._catch_up()
        self._trim(self.size)

    def _catch_up(self) -> None:
        ring = self._ring
        if not ring:
            return
        first, last = ring.first, ring.last
        if self._seen is not None and self._seen >= last:
            return
        seen = self._seen
        if seen is None or seen < first - 1:  # events the window never took are gone: start again from the ring
            if seen is not None:
                self._restart()
            seen = first - 1
        for topic, events in ring.after(seen):
            self.events(topic, events)
        self._seen = last

    def _restart(self) -> None:
        """Forget what the stream said (not the tasks submitted here): the ring says it again."""
        http = self._http
        self._forgotten += len(self._submitted)
        self._submitted = {task_id: ev for task_id, ev in self._submitted.items() if task_id in http}
        self._forgotten -= len(self._submitted)
        for events in self._after.values():
            events.clear()

    def event(self, topic: str, ev: dict) -> None:
        """One task event off the stream."""
        self.events(topic, [ev])

    def events(self, topic: str, evs: list) -> None:
        """A run of one topic's events off the stream, in order (called for every run): one dict
        update. A task's later events replace its earlier ones; those of a task the window does not
        hold (submitted before it saw it, or forgotten) are dropped now and then."""
        if topic == "task.submitted":
            events = self._submitted
        else:
            events = self._after.get(topic)
            if events is None:
                return
        try:
            events.update(zip(map(_task_id, evs), evs))
        except (KeyError, TypeError):  # an event without a task id, not a map, an unhashable id: one at a time
            for ev in evs:
                if isinstance(ev, dict) and type(ev.get("task_id")) is str:
                    self.events(topic, [ev])
            return
        if events is self._submitted:
            if len(events) > self.size + self._slack:
                self._trim(self.size)
        elif len(events) > len(self._submitted) + self._slack:  # tasks the window does not hold
            _consume(map(events.__delitem__, events.keys() - self._submitted.keys()))
        self.notice(topic, evs)

    def _trim(self, size: int) -> None:
        """Forget the oldest tasks beyond ``size``."""
        submitted = self._submitted
        excess = len(submitted) - size
        if excess <= 0:
            return
        old = list(islice(submitted, excess))
        _consume(map(submitted.__delitem__, old))
        for events in self._after.values():
            _consume(map(events.pop, old, repeat(None)))
        self._forgotten += excess
        if self._http:
            for record in filter(None, map(self._http.pop, old, repeat(None))):
                if record.done is not None:
                    record.done.set()  # a waiter on a forgotten task answers with what it has
        if self._waiters:
            for task_id in self._waiters.keys() & set(old):
                self._waiters.pop(task_id).set()

    # ------------------------------------------------------------ reading

    async def wait(self, task_id: str, timeout_s: float) -> TaskRecord | None:
        """The task's record once it finishes or ``timeout_s`` pass (None: not in the window)."""
        record = self.get(task_id)
        if record is None or record.state in FINAL and (record.via == "events" or record.finished_at is not None) \
                or timeout_s <= 0:
            return record
        if record.via == "http":
            if record.done is None:
                record.done = asyncio.Event()
            done = record.done
        else:
            done = self._waiters.get(task_id) or self._waiters.setdefault(task_id, asyncio.Event())
        try:  # (a waiter's event goes when its task finishes or is forgotten: bounded by the window)
            await asyncio.wait_for(done.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return self.get(task_id) or record

    def list(self, *, state: str | None = None, name: str | None = None, limit: int = 100,
             cursor: int | None = None) -> tuple[list[dict], int | None]:
        """Newest first; ``cursor`` is the place in submission order below which to continue."""
        self._current()
        out, last = [], None
        submitted = self._submitted
        order = self._forgotten + len(submitted) + 1  #: the first task ever seen is 1
        for task_id in reversed(submitted):
            order -= 1
            if cursor is not None and order >= cursor:
                continue
            event = submitted[task_id]
            if name is not None and str(event.get("name", "")) != name and task_id not in self._http:
                continue
            record = self._record(task_id, event)
            if (state is None or record.state == state) and (name is None or record.name == name):
                if len(out) == limit:
                    return out, last
                out.append(record.summary())
                last = order
        return out, None


#: topics after which a task's state does not change
_FINAL_TOPICS = frozenset(topic for topic, state in _EVENT_STATE.items() if state in FINAL)


def _consume(iterator) -> None:
    """Run ``iterator`` to its end in C."""
    deque(iterator, maxlen=0)


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
