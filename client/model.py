"""What the broker's events mean: a model of the cluster that a ``Client.status()`` snapshot loads
and each event changes. ``client/state.py`` keeps one current over the wire (``ClusterState``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from broker.protocol import ErrorType, Topic, hold

#: recent failures kept for display
FAILURES_KEPT = 50
#: workers that left or were lost, kept for display
GONE_KEPT = 20

COUNTS = ("queued", "running", "done", "failed", "cancelled")


@dataclass
class WorkerView:
    name: str
    resources: dict  #: offered in total
    free: dict  #: not held by running tasks
    slots: int
    running: int = 0  #: tasks it holds (a timed-out task until its late result)
    tasks: int = 0  #: results it sent back
    serves: list = field(default_factory=list)
    state: str = "ready"
    heard_at: float = 0.0  #: local monotonic time the broker last heard from it

    def as_status(self, now: float) -> dict:
        return {"name": self.name, "resources": dict(self.resources), "free": dict(self.free), "slots": self.slots,
                "running": self.running, "tasks": self.tasks, "serves": list(self.serves), "state": self.state,
                "heartbeat_age_s": round(max(now - self.heard_at, 0.0), 3)}


@dataclass
class RunningTask:
    task_id: str
    name: str
    worker: str
    attempt: int
    resources: dict  #: held on its worker
    started_at: float  #: local monotonic time
    timed_out: bool = False  #: failed by its timeout; its worker holds it until the late result


class ClusterModel:
    """The cluster as a snapshot and the events applied since say it is; no sockets, no seq checks.

    Where an event cannot be accounted for, ``_distrust`` is called: here it only notes why;
    ``ClusterState`` takes a fresh snapshot then.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.restarts = 0  #: snapshots whose seq went backwards: another broker process
        self.mismatches = 0  #: broker.stats that disagreed with this model
        self.distrusted: str | None = None  #: why the model last stopped matching the broker
        self._reset()

    def _reset(self) -> None:
        self.seq: int | None = None  #: seq of the latest event applied (or of the snapshot)
        self.workers: dict[str, WorkerView] = {}
        self.counts = dict.fromkeys(COUNTS, 0)
        self.queues: dict[str, int] = {}
        self.running: dict[str, RunningTask] = {}  #: task_id -> task its worker holds
        self.failures: deque = deque(maxlen=FAILURES_KEPT)
        self.gone: deque = deque(maxlen=GONE_KEPT)
        self.stats: dict = {}
        self.stats_at: float | None = None

    def load(self, snap: dict) -> None:
        """Replace everything with a ``Client.status()`` snapshot."""
        now = self.clock()
        with self.lock:
            failures, gone, stats, stats_at, last_seq = self.failures, self.gone, self.stats, self.stats_at, self.seq
            self._reset()
            self.failures, self.stats, self.stats_at = failures, stats, stats_at  # history survives a resync
            self.seq = int(snap["seq"])
            if last_seq is not None and self.seq < last_seq:
                self.restarts += 1  # a broker's seq only grows: this is another broker process
            for name in COUNTS:
                self.counts[name] = int(snap.get(name, 0))
            for w in snap["workers"]:
                self.workers[w["name"]] = WorkerView(
                    w["name"], dict(w["resources"]), dict(w["free"]), w["slots"], w["running"], w["tasks"],
                    list(w.get("serves", ())), w.get("state", "ready"), now - float(w.get("heartbeat_age_s", 0.0)))
            self.gone = deque((g for g in gone if g["name"] not in self.workers), maxlen=GONE_KEPT)
            self.queues = dict(snap.get("queues", {}))
            for t in snap.get("running_tasks", ()):
                self.running[t["task_id"]] = RunningTask(t["task_id"], t["name"], t["worker"], t["attempt"],
                                                         dict(t["resources"]), now - float(t.get("running_s", 0.0)))

    def _distrust(self, reason: str) -> None:
        self.distrusted = reason

    def apply(self, topic: str, fields: dict) -> None:
        """Apply one event's meaning, with no seq checks (``receive`` does those)."""
        handler = _HANDLERS.get(topic)
        if handler is not None:
            try:
                handler(self, fields)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                self._distrust(f"malformed {topic} event: {exc!r}")

    def _queue(self, resources: dict, sign: int) -> None:
        # the broker counts, per resource a queued task asks for, how many tasks wait for it
        for res in resources:
            n = self.queues.get(res, 0) + sign
            if n:
                self.queues[res] = n
            else:
                self.queues.pop(res, None)

    def _on_submitted(self, f: dict) -> None:
        self.counts["queued"] += 1
        self._queue(f["resources"], +1)

    def _on_started(self, f: dict) -> None:
        worker = self.workers.get(f["worker"])
        if worker is None or "resources" not in f:
            return self._distrust(f"task.started on a worker not known: {f['worker']}")
        self.counts["queued"] -= 1
        self.counts["running"] += 1
        self._queue(f["resources"], -1)
        self.running[f["task_id"]] = RunningTask(f["task_id"], f["name"], f["worker"], f["attempt"],
                                                 dict(f["resources"]), self.clock())
        worker.running += 1
        hold(worker.free, f["resources"], -1)

    def _finished_running(self, f: dict, served: bool) -> RunningTask | None:
        """A running task ended on its worker; None where this state did not know it as running."""
        task = self.running.get(f["task_id"])
        if task is None or task.timed_out:
            self._distrust(f"{f['task_id']} ended but was not known as running")
            return None
        del self.running[task.task_id]
        self.counts["running"] -= 1
        worker = self.workers.get(task.worker)
        if worker is not None:
            worker.running -= 1
            if worker.running:
                hold(worker.free, task.resources, +1)
            else:  # as the broker does: idle means exactly what it offers, whatever float rounding left
                worker.free = dict(worker.resources)
            worker.heard_at = self.clock()
            if served:
                worker.tasks += 1
        return task

    def _on_succeeded(self, f: dict) -> None:
        if self._finished_running(f, served=True) is not None:
            self.counts["done"] += 1

    def _on_failed(self, f: dict) -> None:
        failure = {"task_id": f["task_id"], "name": f["name"], "worker": f.get("worker"), "error": f.get("error"),
                   "ts": f.get("ts")}
        self.failures.appendleft(failure)
        if f.get("worker") is None:  # never ran: no connected worker could serve it
            self.counts["queued"] -= 1
            self.counts["failed"] += 1
            self._queue(f.get("resources") or {}, -1)
            return
        task = self.running.get(f["task_id"])
        if task is not None and f.get("error_type") == ErrorType.TASK_TIMEOUT:
            # the broker stops counting it as running but its worker holds the slot until the late result
            task.timed_out = True
            self.counts["running"] -= 1
            self.counts["failed"] += 1
            return
        served = f.get("error_type") != ErrorType.TASK_LOST  # lost: its worker is being removed, no result came
        if self._finished_running(f, served=served) is not None:
            self.counts["failed"] += 1

    def _on_retried(self, f: dict) -> None:
        task = self._finished_running(f, served=False)
        if task is not None:
            self.counts["queued"] += 1
            self._queue(task.resources, +1)

    def _on_cancelled(self, f: dict) -> None:
        if "resources" not in f:
            return self._distrust("task.cancelled without resources")
        self.counts["queued"] -= 1
        self.counts["cancelled"] += 1
        self._queue(f["resources"], -1)

    def _on_joined(self, f: dict) -> None:
        # a rejoining worker may take over tasks it still runs, with no task event: trust a snapshot
        self.gone = deque((g for g in self.gone if g["name"] != f["worker"]), maxlen=GONE_KEPT)
        self._distrust(f"worker {f['worker']} joined")

    def _on_gone(self, f: dict, state: str) -> None:
        worker = self.workers.pop(f["worker"], None)
        self.running = {t: task for t, task in self.running.items() if task.worker != f["worker"]}
        if worker is not None:
            self.gone.appendleft({"name": worker.name, "state": state, "ts": f.get("ts"),
                                  "resources": worker.resources, "slots": worker.slots, "tasks": worker.tasks})

    def _on_stats(self, f: dict) -> None:
        now = self.clock()
        self.stats = dict(f)
        self.stats_at = now
        for name in ("queued", "running", "done", "failed"):
            if name in f and f[name] != self.counts[name]:
                self.mismatches += 1
                return self._distrust(f"broker.stats says {name}={f[name]}, this state {self.counts[name]}")
        if "workers" in f and f["workers"] != len(self.workers):
            self.mismatches += 1
            return self._distrust(f"broker.stats says {f['workers']} workers, this state {len(self.workers)}")
        if "queues" in f and f["queues"] != self.queues:
            self.mismatches += 1
            return self._distrust(f"broker.stats says queues {f['queues']}, this state {self.queues}")
        for name, info in (f.get("per_worker") or {}).items():
            worker = self.workers.get(name)
            if worker is None or info.get("running") != worker.running or info.get("tasks") != worker.tasks:
                self.mismatches += 1
                return self._distrust(f"broker.stats disagrees about worker {name}")
            worker.heard_at = now - float(info.get("heartbeat_age_s", 0.0))
            worker.state = info.get("state", worker.state)

    # ================================================================ reading

    def snapshot(self) -> dict:
        """What ``Client.status()`` would return now, rebuilt from snapshot + events."""
        now = self.clock()
        with self.lock:
            return {"seq": self.seq, "workers": [w.as_status(now) for w in self.workers.values()],
                    "queues": dict(self.queues), **self.counts, "running_tasks": self._running_list(now)}

    def _running_list(self, now: float) -> list:
        return [{"task_id": t.task_id, "name": t.name, "worker": t.worker, "attempt": t.attempt,
                 "resources": dict(t.resources), "running_s": round(max(now - t.started_at, 0.0), 3)}
                for t in self.running.values() if not t.timed_out]


_HANDLERS = {
    Topic.TASK_SUBMITTED: ClusterModel._on_submitted,
    Topic.TASK_STARTED: ClusterModel._on_started,
    Topic.TASK_SUCCEEDED: ClusterModel._on_succeeded,
    Topic.TASK_FAILED: ClusterModel._on_failed,
    Topic.TASK_RETRIED: ClusterModel._on_retried,
    Topic.TASK_CANCELLED: ClusterModel._on_cancelled,
    Topic.WORKER_JOINED: ClusterModel._on_joined,
    Topic.WORKER_LOST: lambda self, f: self._on_gone(f, "lost"),
    Topic.WORKER_LEFT: lambda self, f: self._on_gone(f, "left"),
    Topic.BROKER_STATS: ClusterModel._on_stats,
}
