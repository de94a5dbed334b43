"""Where tasks run: slot threads off the socket thread, FIFO within the worker's resources.

Tasks arrive from the socket thread in the order the broker sent them. A slot
thread starts the oldest one once the worker's own resources allow it, runs it,
and appends its result to an ordered log that the socket thread sends as one
DONE; the log also records when a task the broker sent *ahead* (to wait for a
slot) started. Slot threads wake the socket thread through a pipe its
zmq.Poller watches, so heartbeats keep flowing while numpy or CuPy computes.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from broker.logs import get_logger
from broker.protocol import EncodeError, ProtocolError, error_map, hold, pack_value, unpack_value
from broker.wake import Waker
from worker.registry import TaskSpec

log = get_logger(__name__)

#: results that make a slot thread wake the socket thread even while more tasks wait here
OUTPUT_BATCH = 32
#: results of tasks that ran at least this long are reported at once, never gathered
BATCH_BELOW_S = 0.0002


class Runner:
    """``slots`` threads running tasks; their starts and results wait in an ordered log."""

    def __init__(self, registry: dict[str, TaskSpec], slots: int, resources: dict | None = None, gpu=None) -> None:
        self.registry = registry
        self.gpu = gpu  #: a worker.gpu.GpuPool when serving real GPUs, else None
        self.waker = Waker()  #: its fd is polled by the socket thread
        self._cond = threading.Condition()
        self._pending: deque = deque()  #: (record, frames) received, not started, in arrival order
        self._resources = dict(resources or {"cpu": slots})
        self._free = dict(self._resources)
        self._running: set[str] = set()
        self._log: list = []  #: task id (an ahead task started) or (record, frames) (a result)
        self._woken = False
        self._results = 0  #: results in the log
        self._closing = False
        self._threads = [threading.Thread(target=self._loop, name=f"slot-{i}", daemon=True) for i in range(slots)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ socket thread side

    def submit(self, record: list, frames: list) -> None:
        with self._cond:
            self._pending.append((record, frames))
            self._cond.notify()

    def take_unstarted(self) -> list[str]:
        """Withdraw every task not yet started (to hand back on a graceful stop)."""
        with self._cond:
            ids = [record[0] for record, _ in self._pending]
            self._pending.clear()
        return ids

    def held(self) -> list[str]:
        """Every task this worker holds: waiting, running, or finished but not yet reported."""
        with self._cond:
            return [*(r[0] for r, _ in self._pending), *self._running,
                    *(e[0][0] for e in self._log if not isinstance(e, str))]

    def unfinished(self) -> list[str]:
        """Tasks waiting or running here, without those finished and not yet reported."""
        with self._cond:
            return [*(r[0] for r, _ in self._pending), *self._running]

    def busy(self) -> bool:
        with self._cond:
            return bool(self._pending or self._running)

    def has_output(self) -> bool:
        return bool(self._log)

    def take_output(self) -> tuple[list, list]:
        """The log since the last call: DONE entries and the result frames they reference."""
        with self._cond:
            entries, self._log = self._log, []
            self._woken = False
            self._results = 0
        out, frames = [], []
        for entry in entries:
            if isinstance(entry, str):
                out.append(entry)
            else:
                out.append(entry[0])
                frames.extend(entry[1])
        return out, frames

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.waker.close()

    # ------------------------------------------------------------ slot threads

    def _startable(self):
        if not self._pending:
            return None
        record, _ = self._pending[0]
        needs = record[5] if len(record) > 5 and isinstance(record[5], dict) else None
        needs = needs if needs is not None else self._declared(record[1])
        for name, qty in needs.items():
            if self._free.get(name, 0) < qty:
                return None
        return needs

    def _declared(self, name: str) -> dict:
        spec = self.registry.get(name)
        return spec.resources if spec is not None else {}

    def _loop(self) -> None:
        while True:
            with self._cond:
                needs = self._startable()
                while needs is None and not self._closing:
                    self._cond.wait()
                    needs = self._startable()
                if self._closing:
                    return
                record, frames = self._pending.popleft()
                hold(self._free, needs, -1)
                self._running.add(record[0])
                if len(record) > 6 and record[6]:
                    self._log.append(record[0])  # the broker waits to hear that it started
                if self._pending:
                    self._cond.notify()  # the next one may fit too
            out = self._run(record, frames)
            with self._cond:
                self._running.discard(record[0])
                if self._running:
                    hold(self._free, needs, +1)
                else:
                    self._free = dict(self._resources)  # idle: exactly what it offers
                self._log.append(out)
                self._results += 1
                # tiny tasks with more waiting here: let results gather into one DONE (the socket
                # thread also sends what is there every 2 ms); otherwise report at once
                wake = not self._woken and (not self._pending or self._results >= OUTPUT_BATCH
                                            or out[0][4] >= BATCH_BELOW_S)
                self._woken = self._woken or wake
                self._cond.notify()
            if wake:
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
            return [task_id, False, error_map(exc), 0, time.perf_counter() - started], []
