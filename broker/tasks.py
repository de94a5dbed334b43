"""Tasks and the one function that changes a task's state, keeping counters, the ahead
count and the journal marks in step with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.states import TASK_MOVES, TERMINAL, TaskState, check_task_move

#: which counter of ``TaskTable.counts`` a task in each state adds to: a task sent ahead
#: still counts as queued (it holds nothing until its worker starts it)
COUNTER = {
    TaskState.QUEUED: "queued",
    TaskState.DISPATCHED: "queued",
    TaskState.RUNNING: "running",
    TaskState.SUCCEEDED: "done",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
}


@dataclass(eq=False, slots=True)
class Task:
    task_id: str
    session: str
    name: str
    args: bytes  #: opaque msgpack blob, never decoded by the broker
    frames: list  #: payload frames the blob references, forwarded as they are
    override: dict | None  #: resources given at submission, or None
    priority: int
    retries: int
    timeout_s: float | None
    key: str | None
    submitted_at: float
    state: TaskState = TaskState.QUEUED  #: changed only by ``TaskTable.move``
    attempts: int = 0
    worker: bytes | None = None  #: worker id holding it while DISPATCHED or RUNNING
    worker_name: str | None = None
    needs: dict | None = None  #: resources held on its worker while RUNNING
    started_at: float | None = None
    queued_s: float = 0.0
    #: names of workers that died holding it; a tuple, replaced (not grown) on a loss, and
    #: ``watchers`` a frozenset replaced likewise: a new task builds no container for either
    lost_on: tuple = ()
    watchers: frozenset = frozenset()  #: other sessions submitted with its key
    result: tuple | None = None  #: (status, value, frames, info) once terminal
    finished_at: float | None = None
    cls: Any = None  #: its TaskClass while queued
    wall_submitted: float = 0.0  #: unix time of acceptance (journal)
    digest: bytes | None = None  #: of its name and arguments, where it has a key (a reuse must match)
    retry_on: tuple = ()  #: exception type names that make it run again (else its @task's)
    backoff_s: float | None = None  #: first wait before such a run (else its @task's), doubling
    error_retries: int = 0  #: runs again after it raised (they count against ``retries``, as losses do)


#: old state -> new state -> (old counter, new counter, change of ``ahead``), legal moves only
_STEPS = {old: {new: (COUNTER[old], COUNTER[new], (new is TaskState.DISPATCHED) - (old is TaskState.DISPATCHED))
                for new in legal} for old, legal in TASK_MOVES.items()}


class TaskTable:
    """Every task the broker remembers, by id and by idempotency key.

    Owns the invariant ``counts[c] == number of tasks whose state maps to c`` (terminal
    counters are totals: forgetting a task keeps them), ``ahead == number of DISPATCHED
    tasks``, and that the journal hears of every change. ``move`` is the only place a
    task's state changes.
    """

    def __init__(self, journal=None) -> None:
        self.journal = journal
        self.tasks: dict[str, Task] = {}
        self.keys: dict[str, str] = {}  #: idempotency key -> task id
        self.counts = {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        self.ahead = 0  #: tasks in DISPATCHED state
        self.get = self.tasks.get  #: task id -> Task or None (the dict's own method: this is the hot path)

    def is_queued(self, task_id: str) -> bool:
        task = self.tasks.get(task_id)
        return task is not None and task.state is TaskState.QUEUED

    def keyed(self, key: str) -> Task | None:
        """The task first submitted with ``key`` if it is in memory (see ``Journal.keyed`` for the rest)."""
        task_id = self.keys.get(key)
        return None if task_id is None else self.tasks.get(task_id)

    def add(self, task: Task, restored: bool = False, counted: bool = True) -> None:
        """A task accepted now (journaled), or ``restored`` from the journal (as it was); a keyed
        result read back from the journal is not ``counted`` again."""
        self.tasks[task.task_id] = task
        if task.key is not None:
            self.keys[task.key] = task.task_id
        if counted:
            self.counts[COUNTER[task.state]] += 1
        if self.journal is not None and not restored:
            self.journal.accepted(task)

    def move(self, task: Task, new: TaskState) -> None:
        """The one way a task changes state; an illegal move raises (a broker bug)."""
        old = task.state
        step = _STEPS[old].get(new)
        if step is None:
            check_task_move(task.task_id, old, new)  # raises IllegalTransition
        task.state = new
        was, now, ahead = step
        if was is not now:  # QUEUED <-> DISPATCHED count as queued both
            counts = self.counts
            counts[was] -= 1
            counts[now] += 1
        if ahead:
            self.ahead += ahead
        if self.journal is not None:
            (self.journal.finished if new in TERMINAL else self.journal.state)(task)

    def mark(self, task: Task) -> None:
        """Something the journal keeps changed besides the state (watchers, a dropped payload)."""
        if self.journal is not None:
            self.journal.state(task)

    def delivered(self, task: Task) -> None:
        """Every session waiting for the finished ``task`` has its result (a restart redelivers none)."""
        if self.journal is not None:
            self.journal.delivered(task)

    def drop(self, task: Task) -> None:
        """Out of memory only: its journal row stays (a keyed result, read back by its key)."""
        del self.tasks[task.task_id]
        if task.key is not None and self.keys.get(task.key) == task.task_id:
            del self.keys[task.key]

    def forget(self, task: Task) -> None:
        self.drop(task)
        if self.journal is not None:
            self.journal.forgotten(task)
