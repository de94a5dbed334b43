"""How a task ended, and what a ``map`` holds: shared by ``Client`` and ``AsyncClient``.

The engine reports each finished task as ``(handle, kind, value)`` with one of
the kinds below; ``settle`` applies that to a shell's future (a concurrent or
asyncio one), ``settle_all`` to a whole reply's worth, and ``MapResults`` keeps a
``map``'s results in input order (its tasks' handles are ``MapItem``s, not futures).
"""

from __future__ import annotations

from concurrent.futures import InvalidStateError

from broker.protocol import ProtocolError, unpack_value
from client.errors import TaskError, at_index, task_error

#: how a task ended, as ``take().settled`` reports it
OK = "ok"  #: value is the task's result
ERROR = "error"  #: value is the TaskError the task ended with at the broker
CANCELLED = "cancelled"  #: the broker cancelled it; value is None
FAILED = "failed"  #: value is an error of the client side: the task's end is not known (or it was refused)


def resolve(future, outcome) -> None:
    """Set ``future`` (asyncio or concurrent) to ``outcome`` (an exception is raised from it), unless
    it is done already."""
    if not future.done():
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


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


_RUNNING = object()  #: a map item whose task has not finished


class MapItem:
    """One task of a ``map`` in flight, the engine's handle for it in place of a future: a
    future costs microseconds to make, settle and read back (a Condition, callbacks), and a map
    needs none of it. Its outcome goes to its map's ``sink`` (``sink.put(batch)``), in batches
    of ``(index, kind, value)``: one hand-off per reply, not one per task (``settle_all``)."""

    __slots__ = ("task_id", "info", "index", "sink")
    _accept = None  #: a map item's acceptance is not reported (its map waits for outcomes only)

    def __init__(self, task_id: str, index: int, sink) -> None:
        self.task_id = task_id
        self.info = None
        self.index = index
        self.sink = sink


def settle_all(settled: list, settle_one=settle) -> None:
    """Carry out ``take().settled``: each future with ``settle_one(handle, kind, value)``, map items
    as one batch per map (consecutive items of one map, the usual reply, make one batch)."""
    sink, batch = None, None
    for handle, kind, value in settled:
        if type(handle) is MapItem:
            if handle.sink is not sink:
                if batch:
                    sink.put(batch)
                sink, batch = handle.sink, []
            batch.append((handle.index, kind, value))
        else:
            settle_one(handle, kind, value)
    if batch:
        sink.put(batch)


class MapResults:
    """What a ``map`` holds: its results so far (the only part that grows with the input) and its
    items in flight. Shared by ``Client.map`` and ``AsyncClient.map``: ``start`` makes the engine's
    handle of each new item, ``finish_batch`` takes the outcomes its ``sink`` was handed.

    Without ``return_exceptions`` a failure stops further submissions (``stopping``) and, once
    every item before it has finished (``settled``), ``outcome()`` raises the first failure in
    input order."""

    __slots__ = ("results", "return_exceptions", "failed", "in_flight", "sink", "_cancelled")

    def __init__(self, return_exceptions: bool, sink, cancelled: type) -> None:
        self.results: list = []
        self.return_exceptions = return_exceptions
        self.failed: tuple | None = None  #: (index, error): the first failure in input order so far
        self.in_flight: dict = {}  #: index -> MapItem not finished, oldest first (indices only grow)
        self.sink = sink  #: where the engine's shell puts batches of outcomes of this map's items
        self._cancelled = cancelled  #: the shell's CancelledError type

    def start(self, task_id: str) -> MapItem:
        """A new item is submitted as ``task_id``: its handle."""
        index = len(self.results)
        self.results.append(_RUNNING)
        item = self.in_flight[index] = MapItem(task_id, index, self.sink)
        return item

    def finish_batch(self, batch: list) -> None:
        """Outcomes ``(index, kind, value)`` of items of this map, as ``settle_all`` handed them over."""
        in_flight, results = self.in_flight, self.results
        for index, kind, value in batch:
            if in_flight.pop(index, None) is None:
                continue  # already finished
            if kind == OK:
                results[index] = value
            else:
                self._failure(index, self._cancelled() if kind == CANCELLED else value)

    def _failure(self, index: int, error: BaseException) -> None:
        self.results[index] = error = at_index(error, index)
        if not self.return_exceptions and (self.failed is None or index < self.failed[0]):
            self.failed = (index, error)

    def unfinished(self) -> list[str]:
        """Task ids of the items in flight (to cancel them)."""
        return [item.task_id for item in self.in_flight.values()]

    @property
    def stopping(self) -> bool:
        return self.failed is not None

    def settled(self) -> bool:
        """Nothing left to wait for: every item finished, or every item before the first failure."""
        if not self.in_flight:
            return True
        return self.failed is not None and next(iter(self.in_flight)) > self.failed[0]

    def outcome(self) -> list:
        if self.failed is not None:
            raise self.failed[1]
        return self.results
