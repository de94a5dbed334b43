"""A task's way through the broker: queued, sent ahead, started, finished, requeued; and dispatch.

Each move here changes the state through ``TaskTable.move`` (counters, ahead count,
journal) and keeps the other parts in step: the scheduler's queues, the resources a
worker holds, the results sessions wait for, the events subscribers see.
"""

from __future__ import annotations

import difflib
import heapq
import math

from broker.events import Events, Stats, error_text
from broker.logs import get_logger
from broker.protocol import (LOST, MAX_BACKOFF_S, Command, DispatchRecord, DoneRecord, ErrorType, Message, Topic,
                             hold, new_record)
from broker.scheduler import DEFAULT_NEEDS, Scheduler, class_key, missing
from broker.sessions import Sessions
from broker.states import TaskState, WorkerState
from broker.tasks import Task, TaskTable

log = get_logger(__name__)


def why_unservable(cls, workers, declared: dict, waited_s: float) -> str:
    """Why no worker of ``workers`` can serve task class ``cls``: nobody serves its name (with the
    closest served names), or what the serving workers lack."""
    serving = [w for w in workers if cls.name in w.serves]
    if not serving:
        served = {n for w in workers for n in w.serves}
        close = difflib.get_close_matches(cls.name, sorted(served), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        return f"no connected worker serves task {cls.name!r} (waited {waited_s:g} s){hint}"
    needs = cls.needs(declared)
    gaps = {}
    for w in serving:
        for res in missing(needs, w.resources):
            gaps[res] = max(gaps.get(res, 0), w.resources.get(res, 0))
    wanted = ", ".join(f"{r}={needs[r]:g}" for r in sorted(gaps))
    offered = ", ".join(f"{r}={gaps[r]:g}" for r in sorted(gaps))
    return (f"no connected worker serving {cls.name!r} offers {wanted} "
            f"(the most offered: {offered}; waited {waited_s:g} s)")


class Lifecycle:
    """Task moves that touch more than one part of the broker, and dispatch."""

    def __init__(self, table: TaskTable, sessions: Sessions, sched: Scheduler, events: Events, stats: Stats,
                 workers: dict, no_worker_timeout_s: float) -> None:
        self.table = table
        self.sessions = sessions
        self.sched = sched
        self.events = events
        self.stats = stats
        self.out = sessions.out  # the one Outgoing every part of the core adds to
        self.workers = workers  #: wid -> Worker, the live ones
        self.no_worker_timeout_s = no_worker_timeout_s
        self.ready: dict = {}  #: wid -> Worker that may have a free slot
        self.dirty = False  #: something changed that may let a task start
        self.deadlines: list = []  #: (deadline, task_id, attempt) of running tasks with a timeout
        self.backoffs: list = []  #: (ready_at, task_id, attempts) of tasks waiting out a backoff, unqueued
        #: task name -> (retry_on names, backoff_s) as its workers' @task declares it
        self.retry_policies: dict[str, tuple[tuple, float]] = {}

    # ------------------------------------------------------------ queued

    def enqueue(self, task: Task, now: float) -> None:
        task.cls = cls = self.sched.push(class_key(task.name, task.override), task.name, task.override,
                                         task.priority, task.task_id, self.workers.values())
        if not cls.eligible and cls.unservable_since is None:
            cls.unservable_since = now  # --no-worker-timeout counts from here
        self.dirty = True

    def needs_of(self, task: Task) -> dict:
        return task.override if task.override is not None else self.sched.declared.get(task.name, DEFAULT_NEEDS)

    def cancel(self, task: Task, now: float) -> None:
        if task.cls is not None:  # None while it waits out a backoff
            self.sched.discard(task.cls)
        self.finish(task, TaskState.CANCELLED, None, [], now)
        self.events.emit(Topic.TASK_CANCELLED, task_id=task.task_id, name=task.name, resources=self.needs_of(task))

    def terminate(self, task: Task, now: float) -> bool:
        """Cancel a task running on a process slot: its child is killed, its slot freed when the
        worker confirms. False where it does not run, or runs where nothing can stop it."""
        worker = self.workers.get(task.worker) if task.state is TaskState.RUNNING else None
        if worker is None or task.name not in worker.killable:
            return False
        self.finish(task, TaskState.CANCELLED, None, [], now, self.info(task, now - (task.started_at or now)))
        self.events.emit(Topic.TASK_CANCELLED, task_id=task.task_id, name=task.name, resources=self.needs_of(task))
        self.kill(worker, task.task_id, "cancelled")
        return True

    def kill(self, worker, task_id: str, reason: str) -> None:
        """Have the worker stop a task where it runs; its slot stays held until the worker answers."""
        if worker is not None and worker.pool is not None:
            self.out.workers.append((worker.wid, Message(Command.KILL, {"ids": [task_id], "reason": reason})))

    # ------------------------------------------------------------ on a worker

    def start(self, task: Task, worker, needs: dict, now: float, announce: bool = True) -> None:
        """The task starts on ``worker`` now (it has a free slot and resources)."""
        if announce:
            task.attempts += 1
        self._bind(task, worker, needs)
        self.begin(task, worker, now, announce)

    def send_ahead(self, task: Task, worker, needs: dict) -> None:
        """The task waits on busy ``worker`` to start when a slot frees; it holds nothing yet."""
        task.attempts += 1
        self.wait_ahead(task, worker, needs)

    def wait_ahead(self, task: Task, worker, needs: dict) -> None:
        self._bind(task, worker, needs)
        self.table.move(task, TaskState.DISPATCHED)
        worker.ahead[task.task_id] = needs

    @staticmethod
    def _bind(task: Task, worker, needs: dict) -> None:
        task.cls = None
        task.worker = worker.wid
        task.worker_name = worker.name
        task.needs = needs

    def begin(self, task: Task, worker, now: float, announce: bool) -> None:
        self.table.move(task, TaskState.RUNNING)
        needs = task.needs
        task.started_at = now
        task.queued_s = now - task.submitted_at
        worker.running[task.task_id] = needs
        hold(worker.free, needs, -1)
        if task.timeout_s is not None:
            heapq.heappush(self.deadlines, (now + task.timeout_s, task.task_id, task.attempts))
        if announce:
            self.events.started(task.task_id, task.name, worker.name, task.attempts, needs)

    def started_ahead(self, worker, task_id: str, now: float) -> None:
        if worker.ahead.pop(task_id, None) is None:
            return  # started at once (no report needed) or not ours
        task = self.table.get(task_id)
        if task is not None and task.state is TaskState.DISPATCHED and task.worker == worker.wid:
            self.begin(task, worker, now, announce=True)

    def release(self, worker, held: dict) -> None:
        if worker.running:
            hold(worker.free, held, +1)
        else:  # idle: exactly what it offers, whatever float rounding the holds left behind
            worker.free.clear()
            worker.free.update(worker.resources)
        if worker.state is WorkerState.READY:
            self.ready[worker.wid] = worker
            self.dirty = True

    # ------------------------------------------------------------ back to the queue

    def requeue(self, task: Task, reason: str, now: float, lost: bool, delay_s: float = 0.0) -> None:
        """A RUNNING task whose worker is gone or handed it back, or that raised an exception it
        may retry on: queue again (after ``delay_s``), or fail as lost."""
        if lost:
            task.lost_on = (*task.lost_on, task.worker_name)
        if lost and len(task.lost_on) + task.error_retries > task.retries:
            error = {"type": ErrorType.TASK_LOST, "traceback": "",
                     "message": f"task {task.task_id} lost its worker {len(task.lost_on)} times "
                                f"(retries={task.retries}); workers: {', '.join(task.lost_on)}"}
            self.fail(task, task.worker_name, error, now, 0.0)
            return
        self.table.move(task, TaskState.QUEUED)
        task.worker = None
        task.submitted_at = now  # queued_s counts from the latest queueing
        if delay_s > 0:  # waits out its backoff outside the queue (as data: expire_backoffs queues it)
            task.cls = None
            heapq.heappush(self.backoffs, (now + delay_s, task.task_id, task.attempts))
        else:
            self.enqueue(task, now)
        self.events.emit(Topic.TASK_RETRIED, task_id=task.task_id, name=task.name, reason=reason)

    def unsend(self, worker, task_id: str, now: float) -> bool:
        """A task sent ahead comes back unstarted: queue it again as if never sent."""
        worker.ahead.pop(task_id, None)
        task = self.table.get(task_id)
        if task is None or task.state is not TaskState.DISPATCHED or task.worker != worker.wid:
            return False
        self.table.move(task, TaskState.QUEUED)
        task.attempts -= 1
        task.worker = None
        self.enqueue(task, now)
        return True

    # ------------------------------------------------------------ finished

    def result(self, worker, rec: DoneRecord, frames: list, now: float) -> None:
        """A result from ``worker``; late ones (the task timed out meanwhile) only free the slot."""
        task_id, run_s = rec.task_id, rec.run_s
        held = worker.running.pop(task_id, None) if isinstance(task_id, str) else None
        if held is None:
            # a rejoining worker resends results the broker already took: expected, harmless
            log.debug("result_for_task_not_held", worker=worker.name, task_id=task_id)
            return
        self.release(worker, held)
        worker.served += 1
        task = self.table.get(task_id)
        if task is None or task.state is not TaskState.RUNNING or task.worker != worker.wid:
            return  # timed out or killed meanwhile: its slot is free again, the result is late
        if rec.ok == LOST:  # the child process running it died; the worker lives on
            detail = rec.value.get("message") if isinstance(rec.value, dict) else None
            self.requeue(task, f"lost with a child process of worker {worker.name}: {detail}", now, lost=True)
            return
        run_s = float(run_s) if isinstance(run_s, (int, float)) and 0 <= run_s < math.inf else 0.0
        self.sched.ahead.observe(task.name, run_s)
        if rec.ok:
            self.finish(task, TaskState.SUCCEEDED, rec.value, frames, now, self.info(task, run_s))
            self.events.succeeded(task_id, task.name, worker.name, run_s)
        else:
            value = rec.value
            error = value if isinstance(value, dict) else {"type": ErrorType.TASK_ERROR, "message": str(value)}
            delay_s = self.retry_delay(task, error)
            if delay_s is not None:
                task.error_retries += 1
                self.requeue(task, f"raised {error_text(error)} (run {task.attempts}; runs again in {delay_s:g} s, "
                                   f"retries={task.retries})", now, lost=False, delay_s=delay_s)
                return
            self.fail(task, worker.name, error, now, run_s)
        self.stats.finished(now, task.queued_s, run_s)

    def declare_retries(self, serves: dict, policies: dict) -> None:
        """What a joining worker's @task declares: the latest announcement of a name wins."""
        for name in serves:
            if name in policies:
                self.retry_policies[name] = policies[name]
            else:
                self.retry_policies.pop(name, None)

    def retry_delay(self, task: Task, error: dict) -> float | None:
        """Seconds to wait before ``task``, which raised ``error``, runs again; None where it may
        not: its error is not one of its ``retry_on`` types, or its retries are spent."""
        retry_on, backoff_s = task.retry_on, task.backoff_s
        if not retry_on:
            retry_on, declared_backoff_s = self.retry_policies.get(task.name, ((), 0.0))
            backoff_s = declared_backoff_s if backoff_s is None else backoff_s
        if not retry_on or len(task.lost_on) + task.error_retries >= task.retries:
            return None
        types = error.get("types")
        types = set(types) if isinstance(types, list) else {error.get("type")}
        if types.isdisjoint(retry_on):
            return None
        return min((backoff_s or 0.0) * 2 ** task.error_retries, MAX_BACKOFF_S)

    def fail(self, task: Task, worker: str | None, error: dict, now: float, run_s: float) -> None:
        info = self.info(task, run_s)
        info["name"] = task.name  # so the client's TaskError can say which task failed
        self.finish(task, TaskState.FAILED, error, [], now, info)
        self.events.failed(task, worker, error, self.needs_of(task))

    def finish(self, task: Task, state: TaskState, value, frames: list, now: float, info: dict | None = None) -> None:
        self.table.move(task, state)
        task.cls = None
        task.args = b""
        task.frames = []  # the argument arrays are no longer needed
        task.finished_at = now
        task.result = (state.value, value, frames, info or self.info(task, 0.0))
        self.sessions.finished(task, now)

    @staticmethod
    def info(task: Task, run_s: float) -> dict:
        # not rounded: round() took 1 us a number here, a fifth of finishing a no-op task
        return {"worker": task.worker_name, "attempts": task.attempts, "queued_s": task.queued_s, "run_s": run_s}

    # ------------------------------------------------------------ time

    def expire_deadlines(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, task_id, attempt = heapq.heappop(self.deadlines)
            task = self.table.get(task_id)
            if task is not None and task.state is TaskState.RUNNING and task.attempts == attempt:
                error = {"type": ErrorType.TASK_TIMEOUT, "traceback": "",
                         "message": f"task {task_id} ran past its timeout of {task.timeout_s} s"}
                self.fail(task, task.worker_name, error, now, now - (task.started_at or now))
                self.kill(self.workers.get(task.worker), task_id, "timeout")

    def expire_backoffs(self, now: float) -> None:
        """Queue the tasks whose backoff is over (a cancelled one is no longer QUEUED)."""
        while self.backoffs and self.backoffs[0][0] <= now:
            _, task_id, attempts = heapq.heappop(self.backoffs)
            task = self.table.get(task_id)
            if task is not None and task.state is TaskState.QUEUED and task.cls is None and task.attempts == attempts:
                self.enqueue(task, now)

    def compact_deadlines(self) -> None:
        """Drop timers of tasks that ended before their deadline once they outnumber the live
        ones: a long-running broker must not keep one per task ever run."""
        if len(self.deadlines) > 2 * self.table.counts["running"] + 1024:
            self.deadlines = [d for d in self.deadlines if (t := self.table.get(d[1])) is not None
                              and t.state is TaskState.RUNNING and t.attempts == d[2]]
            heapq.heapify(self.deadlines)

    def check_unservable(self, now: float) -> None:
        """Fail the queued tasks that no connected worker could serve for --no-worker-timeout."""
        for cls in list(self.sched.pending()):
            if cls.eligible:
                cls.unservable_since = None
                continue
            if cls.unservable_since is None:
                cls.unservable_since = now
                continue
            if now - cls.unservable_since < self.no_worker_timeout_s:
                continue
            why = why_unservable(cls, self.workers.values(), self.sched.declared, self.no_worker_timeout_s)
            error = {"type": ErrorType.NO_WORKER, "message": why, "traceback": ""}
            for _, _, task_id in cls.entries():
                task = self.table.get(task_id)
                if task is not None and task.state is TaskState.QUEUED:
                    self.sched.discard(cls)
                    self.fail(task, None, dict(error), now, 0.0)
            cls.clear()
            cls.unservable_since = None

    # ------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> None:
        """Start what fits on workers with a free slot, then send short tasks ahead to busy ones;
        all tasks for one worker travel in one TASKS message."""
        self.dirty = False
        ready = [w for w in self.ready.values() if w.has_free_slot()]
        self.ready = {w.wid: w for w in ready}
        batches: dict[bytes, list] = {}
        table = self.table
        for worker, task_id, needs in self.sched.dispatch(ready, table.is_queued):
            task = table.tasks[task_id]
            self.start(task, worker, needs, now)
            batches.setdefault(worker.wid, []).append((task, False))
            if not worker.has_free_slot():
                self.ready.pop(worker.wid, None)
        if table.counts["queued"] > table.ahead:  # something is queued that is not sent ahead yet
            for worker, task_id, needs in self.sched.send_ahead(self.workers.values(), table.is_queued, table.tasks):
                task = table.tasks[task_id]
                self.send_ahead(task, worker, needs)
                batches.setdefault(worker.wid, []).append((task, True))
        for wid, tasks in batches.items():
            records, frames = [], []
            for t, ahead in tasks:
                records.append(new_record(DispatchRecord, (t.task_id, t.name, t.args, len(t.frames), t.attempts, t.needs,
                                                           ahead)))
                frames.extend(t.frames)
            self.out.workers.append((wid, Message(Command.TASKS, {"tasks": records}, frames)))
            self.workers[wid].last_sent = now
