"""The exceptions a gridq client raises."""

from __future__ import annotations

from broker.protocol import ErrorType


class GridqError(Exception):
    """Base of every gridq client error."""


class BrokerUnavailable(GridqError):
    """The broker did not answer within the client's timeout, after its retries."""


class RemoteTraceback(Exception):
    """The worker-side traceback of a TaskError, chained as its ``__cause__`` so that an
    uncaught TaskError prints it (as concurrent.futures.process does for its workers)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class TaskError(GridqError):
    """A task failed on the worker (or could not run); carries the remote error.

    ``type`` is the remote exception's class name, ``message`` its text and
    ``traceback`` the remote traceback as text (empty where none ran);
    ``task_id`` and ``name`` say which task, ``index`` which item of a ``map``
    (None elsewhere). ``str()`` stays ``"Type: message"``; the rest shows as
    notes and the chained remote traceback when the error goes uncaught.
    """

    def __init__(self, type: str, message: str, traceback: str = "", *, task_id: str | None = None,
                 name: str | None = None, worker: str | None = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback
        self.task_id = task_id
        self.name = name
        self.worker = worker
        self.index: int | None = None
        if task_id is not None or name is not None:
            self.add_note(f"task {name!r} (id {task_id})" + (f" on worker {worker}" if worker else ""))
        if traceback:
            where = f"task {name!r} (id {task_id})" if name else "the task"
            self.__cause__ = RemoteTraceback(f'\n"""\nTraceback of {where} on its worker:\n{traceback.rstrip()}\n"""')

    def at_index(self, index: int) -> "TaskError":
        """Mark which item of a ``map`` failed (once; the error object may be shared)."""
        if self.index is None:
            self.index = index
            self.add_note(f"item {index} of the map")
        return self

    def __reduce__(self):  # keep the keyword attributes through pickling (e.g. multiprocessing)
        return (_rebuild, (type(self), self.type, self.message, self.traceback, self.task_id, self.name,
                           self.worker, self.index))


def _rebuild(cls, type_, message, traceback, task_id, name, worker, index):
    error = cls(type_, message, traceback, task_id=task_id, name=name, worker=worker)
    if index is not None:
        error.at_index(index)
    return error


class TaskLost(TaskError):
    """The task's worker died more times than its retries allow."""


class TaskTimeout(TaskError):
    """The task ran past the timeout it was submitted with."""


class KeyConflict(TaskError):
    """An idempotency key was reused with another task name or other arguments: the
    broker refused the task (it never answers with another task's result)."""


def at_index(error: BaseException, index: int) -> BaseException:
    """``error`` of item ``index`` of a map or gather: a TaskError notes which item it was."""
    if isinstance(error, TaskError):
        error.at_index(index)
    return error


def map_timeout(total: int, finished: int, timeout_s: float | None) -> TimeoutError:
    """What a map past its ``timeout`` raises (its unfinished tasks were asked to cancel)."""
    return TimeoutError(f"map: {finished} of {total} tasks finished within its timeout of {timeout_s:g} s; the "
                        "others were cancelled where they had not started (a running task runs to its end; "
                        "task_timeout= limits each run)")


#: remote error type -> the exception class the client raises for it
ERROR_CLASSES = {ErrorType.TASK_LOST: TaskLost, ErrorType.TASK_TIMEOUT: TaskTimeout,
                 ErrorType.KEY_CONFLICT: KeyConflict}


def task_error(error: dict, *, task_id: str | None = None, name: str | None = None,
               worker: str | None = None) -> TaskError:
    """The exception for a remote error map ``{"type", "message", "traceback"}``."""
    kind = str(error.get("type", ErrorType.TASK_ERROR))
    cls = ERROR_CLASSES.get(kind, TaskError)
    return cls(kind, str(error.get("message", "")), str(error.get("traceback", "")), task_id=task_id, name=name,
               worker=worker)
