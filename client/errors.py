"""The exceptions a gridq client raises."""

from __future__ import annotations

from broker.protocol import ErrorType


class GridqError(Exception):
    """Base of every gridq client error."""


class BrokerUnavailable(GridqError):
    """The broker did not answer within the client's timeout, after its retries."""


class TaskError(GridqError):
    """A task failed on the worker (or could not run); carries the remote error.

    ``type`` is the remote exception's class name, ``message`` its text and
    ``traceback`` the remote traceback as text (empty where none ran).
    """

    def __init__(self, type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback


class TaskLost(TaskError):
    """The task's worker died more times than its retries allow."""


class TaskTimeout(TaskError):
    """The task ran past the timeout it was submitted with."""


#: remote error type -> the exception class the client raises for it
ERROR_CLASSES = {ErrorType.TASK_LOST: TaskLost, ErrorType.TASK_TIMEOUT: TaskTimeout}


def task_error(error: dict) -> TaskError:
    kind = str(error.get("type", ErrorType.TASK_ERROR))
    cls = ERROR_CLASSES.get(kind, TaskError)
    return cls(kind, str(error.get("message", "")), str(error.get("traceback", "")))
