"""Where tasks run: a pool of slot threads off the socket thread, and GPU device routing.

Slot threads unpack arguments, call the task, pack the result and queue it for
the socket thread, which they wake through a pipe that its zmq.Poller watches.
Heartbeats therefore keep flowing while numpy or CuPy code computes.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import deque

import structlog

from broker.protocol import EncodeError, ProtocolError, pack_value, unpack_value
from broker.wake import Waker
from worker.registry import TaskSpec

log = structlog.get_logger(__name__)


class Runner:
    """``slots`` threads running tasks; finished ones wait in ``done`` for the socket thread."""

    def __init__(self, registry: dict[str, TaskSpec], slots: int, gpu=None) -> None:
        self.registry = registry
        self.gpu = gpu  #: a worker.gpu.GpuPool when serving real GPUs, else None
        self.done: deque = deque()  #: DONE records with their frames: ([task_id, ok, value, nframes, run_s], frames)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.queued: dict[str, tuple] = {}  #: task_id -> record, received but not started
        self.running: set[str] = set()
        self.waker = Waker()  #: its fd is polled by the socket thread
        self._threads = [threading.Thread(target=self._loop, name=f"slot-{i}", daemon=True) for i in range(slots)]
        for t in self._threads:
            t.start()

    def submit(self, record: list, frames: list) -> None:
        with self._lock:
            self.queued[record[0]] = (record, frames)
        self._inbox.put(record[0])

    def take_unstarted(self) -> list[str]:
        """Withdraw every task not yet started (to hand back on a graceful stop)."""
        with self._lock:
            ids = list(self.queued)
            self.queued.clear()
        return ids

    def held(self) -> list[str]:
        """Every task this worker holds: queued, running, or finished but not yet reported."""
        with self._lock:
            return [*self.queued, *self.running, *(record[0] for record, _ in self.done)]

    def busy(self) -> bool:
        with self._lock:
            return bool(self.queued or self.running)

    def close(self) -> None:
        for _ in self._threads:
            self._inbox.put(None)
        self.waker.close()

    def _loop(self) -> None:
        while True:
            task_id = self._inbox.get()
            if task_id is None:
                return
            with self._lock:
                item = self.queued.pop(task_id, None)
                if item is None:
                    continue  # handed back before it started
                self.running.add(task_id)
            record, frames = item
            out = self._run(record, frames)
            with self._lock:
                self.running.discard(task_id)
                self.done.append(out)
            self.waker.wake()

    def _run(self, record: list, frames: list) -> tuple:
        task_id, name, args_blob = record[0], record[1], record[2]
        started = time.perf_counter()
        try:
            spec = self.registry.get(name)
            if spec is None:
                raise LookupError(f"this worker does not serve task {name!r}")
            try:
                args, kwargs = unpack_value(args_blob, frames)
            except (ProtocolError, ValueError, TypeError) as exc:
                raise ProtocolError(f"arguments of {name!r} could not be decoded: {exc}") from None
            if self.gpu is not None and spec.needs_gpu:
                value = self.gpu.run(spec.fn, args, kwargs)
            else:
                value = spec.fn(*args, **kwargs)
            blob, out_frames = pack_value(value)
            return [task_id, True, blob, len(out_frames), time.perf_counter() - started], out_frames
        except BaseException as exc:  # a task may raise anything; it must not kill the slot
            if isinstance(exc, EncodeError):
                exc = EncodeError(f"result of {name!r} cannot be sent back: {exc}")
            error = {"type": type(exc).__name__, "message": str(exc),
                     "traceback": "".join(traceback.format_exception(exc))}
            return [task_id, False, error, 0, time.perf_counter() - started], []
