"""Task and worker states as data: str enums and the table of legal moves."""

from __future__ import annotations

import enum


class TaskState(str, enum.Enum):
    QUEUED = "queued"  #: accepted, waiting for a fitting worker with free capacity
    DISPATCHED = "dispatched"  #: sent ahead to a busy worker, which starts it when a slot frees
    RUNNING = "running"  #: dispatched to a worker that holds it
    SUCCEEDED = "succeeded"  #: a result came back (terminal)
    FAILED = "failed"  #: raised, timed out, lost too often or unservable (terminal)
    CANCELLED = "cancelled"  #: cancelled while queued (it never ran), or killed running with terminate (terminal)


class WorkerState(str, enum.Enum):
    READY = "ready"  #: joined and taking tasks
    DRAINING = "draining"  #: stopping: finishes what it holds, takes nothing new
    LOST = "lost"  #: silent past heartbeat x liveness (terminal)
    LEFT = "left"  #: said goodbye (terminal)


TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})

#: state -> states it may move to; anything else is a bug in the broker.
TASK_MOVES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.DISPATCHED, TaskState.CANCELLED, TaskState.FAILED}),
    # DISPATCHED -> QUEUED: its worker died or handed it back before starting it
    TaskState.DISPATCHED: frozenset({TaskState.RUNNING, TaskState.QUEUED}),
    # RUNNING -> QUEUED: its worker died or handed it back; -> CANCELLED: killed on a process slot
    TaskState.RUNNING: frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.QUEUED, TaskState.CANCELLED}),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}

WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.READY: frozenset({WorkerState.DRAINING, WorkerState.LOST, WorkerState.LEFT}),
    WorkerState.DRAINING: frozenset({WorkerState.LOST, WorkerState.LEFT}),
    WorkerState.LOST: frozenset(),
    WorkerState.LEFT: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state move outside the tables above: a broker bug, never peer input."""


def check_task_move(task_id: str, old: TaskState, new: TaskState) -> None:
    if new not in TASK_MOVES[old]:
        raise IllegalTransition(f"task {task_id}: {old.value} -> {new.value} is not a legal move")


def check_worker_move(name: str, old: WorkerState, new: WorkerState) -> None:
    if new not in WORKER_MOVES[old]:
        raise IllegalTransition(f"worker {name}: {old.value} -> {new.value} is not a legal move")
