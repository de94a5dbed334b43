"""How a task ended, and what a ``map`` holds: shared by ``Client`` and ``AsyncClient``.

The engine reports each finished task as ``(handle, kind, value)`` with one of
the kinds below; ``settle`` applies that to a shell's future (a concurrent or
asyncio one), ``outcome`` reads a finished future back, and ``MapResults``
keeps a ``map``'s results in input order.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import InvalidStateError

from broker.protocol import ProtocolError, unpack_value
from client.errors import TaskError, at_index, task_error

#: how a task ended, as ``take().settled`` reports it
OK = "ok"  #: value is the task's result
ERROR = "error"  #: value is the TaskError the task ended with at the broker
CANCELLED = "cancelled"  #: the broker cancelled it; value is None
FAILED = "failed"  #: value is an error of the client side: the task's end is not known (or it was refused)


def settle(handle, kind: str, value) -> None:
    """Apply one outcome to a shell's future (a concurrent or asyncio one) unless it is done."""
    if handle.done():
        return
    try:
        if kind == OK:
            handle.set_result(value)
        elif kind == CANCELLED:
            handle._cancel_locally()
        else:
            handle.set_exception(value)
    except InvalidStateError:
        pass  # another thread cancelled it just now


def result_outcome(task_id: str, status: str, value, frames, info) -> tuple:
    """``(kind, value)`` of one RESULTS record: the decoded result, a TaskError, or a cancellation."""
    if status == "succeeded":
        try:
            return OK, unpack_value(value, frames)
        except ProtocolError as exc:
            return ERROR, TaskError("ProtocolError", f"result could not be decoded: {exc}")
    if status == "cancelled":
        return CANCELLED, None
    about = info if isinstance(info, dict) else {}  # the broker names a failed task in its info
    return ERROR, task_error(value if isinstance(value, dict) else {"message": str(value)}, task_id=task_id,
                             name=about.get("name"), worker=about.get("worker"))


def outcome(handle, cancelled: type) -> tuple:
    """``(value, None)`` or ``(None, error)`` of a shell's finished future; a cancelled one gives
    a ``cancelled`` error (the shell's CancelledError type)."""
    if handle.cancelled():
        return None, cancelled()
    error = handle.exception()
    return (None, error) if error is not None else (handle.result(), None)


_RUNNING = object()  #: a map item whose task has not finished


class MapResults:
    """What a ``map`` holds: its results so far (the only part that grows with the input) and the
    indices of its tasks in flight. Shared by ``Client.map`` and ``AsyncClient.map``, which keep
    the futures in flight and hand each one's outcome to ``finish``.

    Without ``return_exceptions`` a failure stops further submissions (``stopping``) and, once
    every item before it has finished (``settled``), ``outcome()`` raises the first failure in
    input order."""

    __slots__ = ("results", "return_exceptions", "failed", "_order")

    def __init__(self, return_exceptions: bool) -> None:
        self.results: list = []
        self.return_exceptions = return_exceptions
        self.failed: tuple | None = None  #: (index, error): the first failure in input order so far
        self._order: deque = deque()  #: indices submitted, oldest first (finished ones dropped lazily)

    def start(self) -> int:
        """A new item is submitted: its index."""
        index = len(self.results)
        self.results.append(_RUNNING)
        self._order.append(index)
        return index

    def finish(self, index: int, value, error: BaseException | None) -> None:
        if error is not None:
            error = at_index(error, index)
        self.results[index] = value if error is None else error
        if error is not None and not self.return_exceptions and (self.failed is None or index < self.failed[0]):
            self.failed = (index, error)

    @property
    def stopping(self) -> bool:
        return self.failed is not None

    def settled(self) -> bool:
        """Nothing left to wait for: every item finished, or every item before the first failure."""
        order, results = self._order, self.results
        while order and results[order[0]] is not _RUNNING:
            order.popleft()
        return not order or (self.failed is not None and order[0] > self.failed[0])

    def outcome(self) -> list:
        if self.failed is not None:
            raise self.failed[1]
        return self.results
