"""Queues by priority and resource shape, and which worker takes what: least loaded first.

Queued tasks are grouped into *classes*: tasks of one name asking for the same
resources. Each class keeps one FIFO per priority (O(1) in and out: priorities
are few, tasks many), served highest priority first.
Dispatch pops the least-loaded worker with a free slot from a heap and gives it
the best class head it serves and has room for, so one dispatch costs
O(log workers + classes), never a scan of every worker per task.
Short tasks may also be *sent ahead* to busy workers (``SendAhead`` decides which).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from operator import methodcaller
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

from broker.protocol import DEFAULT_RESOURCES
from broker.states import WorkerState

#: what a task needs when nobody declared anything
DEFAULT_NEEDS = DEFAULT_RESOURCES
#: tasks a busy worker may hold ahead of its slots, per slot (sent ahead, started when a slot frees)
AHEAD_PER_SLOT = 64
#: only tasks whose name runs shorter than this on average are sent ahead, so a
#: task never waits long behind another on a busy worker while one is idle
AHEAD_MAX_RUN_S = 0.005
#: at most this much (estimated) work waits ahead per slot of a worker
AHEAD_MAX_WAIT_S = 0.02
#: weight of the newest run time in a task name's moving average
RUN_S_WEIGHT = 0.2


def fits(needs: dict, free: dict) -> bool:
    for name, qty in needs.items():
        if free.get(name, 0) < qty:
            return False
    return True


def missing(needs: dict, offered: dict) -> dict:
    """The part of ``needs`` that ``offered`` cannot cover, by resource."""
    return {k: v for k, v in needs.items() if offered.get(k, 0) < v}


@dataclass(eq=False)
class TaskClass:
    """Queued tasks that share a name and a resource request."""

    name: str
    override: dict | None  #: resources given at submission; None: as workers declare
    fifos: dict = field(default_factory=dict)  #: priority -> deque of (seq, task_id)
    order: list = field(default_factory=list)  #: -priority of every fifo, ascending (best first)
    queued: int = 0  #: how many entries are still queued (others are stale, dropped lazily)
    eligible: set = field(default_factory=set)  #: worker ids that could ever serve it
    unservable_since: float | None = None  #: when it last became unservable

    def push(self, priority: int, seq: int, task_id: str) -> None:
        fifo = self.fifos.get(priority)
        if fifo is None:
            fifo = self.fifos[priority] = deque()
            bisect.insort(self.order, -priority)
        fifo.append((seq, task_id))

    def entries(self) -> list:
        """Every (priority, seq, task_id) entry, stale ones included."""
        return [(p, seq, t) for p, fifo in self.fifos.items() for seq, t in fifo]

    def clear(self) -> None:
        self.fifos.clear()
        self.order.clear()

    def head(self, is_queued) -> tuple | None:
        """(-priority, seq, task_id) of the next task to serve, dropping stale entries."""
        while self.order:
            key = self.order[0]
            fifo = self.fifos[-key]
            while fifo and not is_queued(fifo[0][1]):
                fifo.popleft()  # cancelled or failed while queued
            if fifo:
                seq, task_id = fifo[0]
                return (key, seq, task_id)
            del self.fifos[-key]
            self.order.pop(0)
        return None

    def pop(self) -> None:
        self.fifos[-self.order[0]].popleft()

    def needs(self, declared: dict) -> dict:
        if self.override is not None:
            return self.override
        return declared.get(self.name, DEFAULT_NEEDS)


def class_key(name: str, override: dict | None) -> tuple:
    return (name, None if override is None else tuple(sorted(override.items())))


class SendAhead:
    """When a task may wait on a busy worker to start as soon as one of its slots frees.

    Only tasks known to be short, only behind short ones (a task never waits ahead behind
    a long or unknown one), and only as many as amount to AHEAD_MAX_WAIT_S of work per slot.
    """

    def __init__(self) -> None:
        self.run_s: dict[str, float] = {}  #: task name -> moving average of its run time

    def observe(self, name: str, run_s: float) -> None:
        average = self.run_s.get(name)
        self.run_s[name] = run_s if average is None else (1 - RUN_S_WEIGHT) * average + RUN_S_WEIGHT * run_s

    def wants_refill(self, worker) -> bool:
        # refill only once half drained: one TASKS message then carries many tasks
        return worker.state is WorkerState.READY and len(worker.ahead) <= AHEAD_PER_SLOT * worker.slots // 2

    def has_room(self, worker) -> bool:
        return worker.state is WorkerState.READY and len(worker.ahead) < AHEAD_PER_SLOT * worker.slots

    def allows(self, name: str, worker, tasks: Mapping) -> bool:
        """May one more task called ``name`` wait ahead on ``worker``? ``tasks``: id -> task."""
        run_s = self.run_s.get(name)
        if run_s is None or run_s >= AHEAD_MAX_RUN_S or (len(worker.ahead) + 1) * run_s > AHEAD_MAX_WAIT_S * worker.slots:
            return False
        for task_id in worker.running:
            task = tasks.get(task_id)
            ahead_of = self.run_s.get(task.name) if task is not None else None
            if ahead_of is None or ahead_of >= AHEAD_MAX_RUN_S:
                return False
        return True


class Scheduler:
    """Holds the queues and the send-ahead policy; knows nothing of sockets, time or task states."""

    def __init__(self) -> None:
        self.classes: dict[tuple, TaskClass] = {}
        #: task name -> resources its @task declares, as announced by workers
        self.declared: dict[str, dict] = {}
        self._seq = itertools.count()
        self.ahead = SendAhead()

    # ----------------------------------------------------------- queues

    def push(self, key: tuple, name: str, override: dict | None, priority: int, task_id: str, workers: Iterable) -> TaskClass:
        cls = self.classes.get(key)
        if cls is None:
            cls = self.classes[key] = TaskClass(name, override)
            needs = cls.needs(self.declared)
            cls.eligible = {w.wid for w in workers if w.could_serve(name, needs)}
        cls.push(priority, next(self._seq), task_id)
        cls.queued += 1
        return cls

    def discard(self, cls: TaskClass) -> None:
        """One queued task of ``cls`` left the queue other than by dispatch (cancel, failure)."""
        cls.queued -= 1

    def prune(self) -> None:
        """Forget classes with nothing queued, so many one-off task names do not slow dispatch."""
        for key in [k for k, c in self.classes.items() if c.queued <= 0]:
            del self.classes[key]

    def pending(self) -> Iterator[TaskClass]:
        return (c for c in self.classes.values() if c.queued > 0)

    # ----------------------------------------------------------- workers

    def worker_joined(self, worker) -> None:
        for cls in self.classes.values():
            if worker.could_serve(cls.name, cls.needs(self.declared)):
                cls.eligible.add(worker.wid)
                cls.unservable_since = None

    def worker_gone(self, worker) -> None:
        for cls in self.classes.values():
            cls.eligible.discard(worker.wid)

    def declare(self, tasks: dict, workers: Iterable) -> None:
        """Record the resources workers declare per task name; refresh eligibility."""
        changed = [n for n, r in tasks.items() if self.declared.get(n) != r]
        if not changed:
            return
        for n in changed:
            self.declared[n] = tasks[n]
        workers = list(workers)
        for cls in self.classes.values():
            if cls.override is None and cls.name in changed:
                needs = cls.needs(self.declared)
                cls.eligible = {w.wid for w in workers if w.could_serve(cls.name, needs)}

    # ----------------------------------------------------------- dispatch

    def dispatch(self, ready: list, is_queued: Callable[[str], bool]) -> Iterator[tuple]:
        """Yield (worker, task_id, needs) for tasks that start now, until nothing more fits.

        ``ready`` lists workers with a free slot. The caller applies each
        assignment (holding resources, taking a slot) before the next is chosen.
        """
        return self._assign(ready, is_queued, methodcaller("has_free_slot"), methodcaller("load"),
                            lambda cls, needs, w: fits(needs, w.free))

    def send_ahead(self, workers: Iterable, is_queued: Callable[[str], bool], tasks: Mapping) -> Iterator[tuple]:
        """Yield (worker, task_id, needs) for tasks to queue at busy workers (prefetch).

        Only what ``self.ahead`` admits (short tasks, behind short ones); a worker takes
        them while it has room ahead; least loaded counting what it holds ahead.
        ``tasks`` maps the id of a task a worker runs to the task (its ``name`` is read).
        """
        policy = self.ahead
        return self._assign([w for w in workers if policy.wants_refill(w)], is_queued, policy.has_room,
                            methodcaller("load_ahead"), lambda cls, needs, w: policy.allows(cls.name, w, tasks))

    def _assign(self, workers: list, is_queued, has_room, load, acceptable) -> Iterator[tuple]:
        if not any(c.queued for c in self.classes.values()):
            return
        heap = [(load(w), w.tiebreak, w) for w in workers]
        heapq.heapify(heap)
        following = None  #: the worker just served, back in line if it has room (one heap step for both)
        while heap or following is not None:
            if following is None:
                _, _, worker = heapq.heappop(heap)
            elif heap:
                _, _, worker = heapq.heappushpop(heap, following)
            else:
                worker = following[2]
            following = None
            best = None
            for cls in self.classes.values():
                if cls.queued <= 0 or worker.wid not in cls.eligible:
                    continue
                head = cls.head(is_queued)
                if head is None:
                    continue
                if best is not None and head >= best[0]:
                    continue
                needs = cls.needs(self.declared)
                if acceptable(cls, needs, worker):
                    best = (head, cls, needs)
            if best is None:
                continue  # nothing queued suits this worker now
            (_, _, task_id), cls, needs = best
            cls.pop()
            cls.queued -= 1
            yield worker, task_id, needs
            if has_room(worker):
                following = (load(worker), worker.tiebreak, worker)
