"""Where tasks run: slot threads off the socket thread, FIFO within the worker's resources.

Tasks arrive from the socket thread in the order the broker sent them. A slot
thread starts the oldest one once the worker's own resources allow it, runs it
(on the thread itself, or in the slot's child process with ``--pool process``),
and appends its result to an ordered log that the socket thread sends as one
DONE; the log also records when a task the broker sent *ahead* (to wait for a
slot) started. Slot threads wake the socket thread through a pipe its
zmq.Poller watches, so heartbeats keep flowing while numpy or CuPy computes.

A process slot takes the task and the short tasks sent ahead right behind it
(same needs) as one batch for its child, so no-op traffic crosses the process
boundary in few messages; each result still comes back as soon as it exists,
which is also when the next task of the batch starts.

Where the socket thread hands a small batch to an idle child itself, it also
reads that batch's results itself (the child's channel in its zmq.Poller) and
sends them as DONE in the same loop turn; the slot thread sleeps on. Anything
else (the batch runs past RELEASE_AFTER_S, a kill, the child's end or its
limit) hands the collection to the slot thread where it stands: one thread
reads a channel at a time.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from broker.logs import get_logger
from broker.protocol import DispatchRecord, DoneRecord, hold
from broker.shared import Waker
from worker.pool import RELEASE_AFTER_S, Handed
from worker.registry import TaskSpec
from worker.run import failure, run_task

log = get_logger(__name__)

#: results that make a slot thread wake the socket thread even while more tasks wait here
OUTPUT_BATCH = 32
#: results of tasks that ran at least this long are reported at once, never gathered
BATCH_BELOW_S = 0.0002
#: most tasks of a batch handed to an idle child whose results the socket thread reads itself
WATCH_MAX = 4


class Runner:
    """``slots`` threads running tasks; their starts and results wait in an ordered log.

    With ``pool`` (worker.pool.PoolOptions) each thread drives a child process that runs
    the CPU tasks; GPU tasks stay on the threads, next to the worker's device executors.
    """

    def __init__(self, registry: dict[str, TaskSpec], slots: int, resources: dict | None = None, gpu=None,
                 pool=None, watch: bool = False) -> None:
        self.registry = registry
        self.gpu = gpu  #: a worker.gpu.GpuPool when serving real GPUs, else None
        self.waker = Waker()  #: its fd is polled by the socket thread
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  #: guards what follows; the socket thread waits on nothing
        self._waits = [threading.Condition(lock) for _ in range(slots)]  #: where each slot thread waits
        self._waiting: list[int] = []  #: slot threads waiting and not notified yet
        self._handed: dict[int, Handed] = {}  #: slot -> batch its child got from the socket thread
        #: ``watch``: the caller's loop polls ``watched`` and calls ``collect_watched`` (the worker does)
        self._watch = watch
        self._watched: dict[int, Handed] = {}  #: slot -> batch whose results the socket thread reads
        self.watched: dict[int, int] = {}  #: channel fd -> slot, for the socket thread's poller
        self._pending: deque = deque()  #: (record, frames) received, not started, in arrival order
        self._resources = dict(resources or {"cpu": slots})
        self._free = dict(self._resources)
        self._running: set[str] = set()  #: started, or in a child's batch
        self._where: dict = {}  #: task id -> the ProcessSlot whose batch holds it
        self._idle = 0  #: slot threads waiting for work
        self._log: list = []  #: task id (an ahead task started) or (record, frames) (a result)
        self._woken = False
        self._results = 0  #: results in the log
        self._closing = False
        self.children: list = []  #: ProcessSlot per slot thread with a process pool
        if pool is not None:
            from worker.pool import ProcessSlot, context

            ctx = context(pool.modules)
            self.children = [ProcessSlot(i, pool, ctx) for i in range(slots)]
        self._threads = [threading.Thread(target=self._loop, args=(i, self.children[i] if self.children else None),
                                          name=f"slot-{i}", daemon=True) for i in range(slots)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ socket thread side

    def submit(self, record: DispatchRecord, frames: list) -> None:
        self.submit_all([(record, frames)])

    def submit_all(self, tasks: list) -> None:
        """Tasks [(record, frames)] in the order the broker sent them. Where a slot's child is idle,
        the first batch goes to it from here at once: its slot thread wakes to collect the results
        while the child already runs it (a thread hop fewer before a lone task starts)."""
        with self._cond:
            self._pending.extend(tasks)
            for _ in range(len(tasks) - self._hand_to_idle_child()):
                self._notify_one()

    def killable(self) -> list[str]:
        """Names of the tasks that run in child processes here (a kill reaches them)."""
        return sorted(n for n in self.registry if self._in_child(n))

    def kill(self, ids: list, reason: str) -> None:
        """Stop these tasks where they run (past their timeout, or cancelled with terminate): one
        not started yet is dropped, one in a child is killed with it; a thread runs on."""
        with self._cond:
            for task_id in ids:
                waiting = next((i for i, (r, _) in enumerate(self._pending) if r.task_id == task_id), None)
                if waiting is not None:
                    del self._pending[waiting]
                    self._log.append(failure(task_id, False, RuntimeError(f"dropped before it started ({reason})"),
                                             0.0, ""))
                    self._results += 1
                elif task_id in self._where:
                    child = self._where[task_id]
                    child.request_kill(task_id, reason)
                    if child.index in self._watched:
                        self._unwatch(child.index, over=False)  # its slot thread kills it
        self.waker.wake()

    def take_unstarted(self) -> list[str]:
        """Withdraw every task not yet started (to hand back on a graceful stop)."""
        with self._cond:
            ids = [record.task_id for record, _ in self._pending]
            self._pending.clear()
        return ids

    def held(self) -> list[str]:
        """Every task this worker holds: waiting, running, or finished but not yet reported."""
        with self._cond:
            return [*(r.task_id for r, _ in self._pending), *self._running,
                    *(e[0].task_id for e in self._log if not isinstance(e, str))]

    def unfinished(self) -> list[str]:
        """Tasks waiting or running here, without those finished and not yet reported."""
        with self._cond:
            return [*(r.task_id for r, _ in self._pending), *self._running]

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

    def watch_deadline(self) -> float | None:
        """When the oldest watched batch goes to its slot thread if no result came (time.monotonic)."""
        watched = self._watched
        return min(h.since for h in watched.values()) + RELEASE_AFTER_S if watched else None

    def collect_watched(self, ready, now: float) -> None:
        """The socket thread's part: the results of watched batches whose channel fd is in ``ready``
        into the log (no wake-up: the caller sends them now), those over or running long done with."""
        for fd, index in list(self.watched.items()):
            handed = self._watched[index]
            if fd in ready:
                over = self.children[index].read_handed(handed, self._emit_here, self._give_back)
                if over is not False:
                    self._unwatch(index, over)
                    continue
            if now >= handed.since + RELEASE_AFTER_S:
                self._unwatch(index, over=False)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._notify_all()
            for index in self._watched:
                self._waits[index].notify()  # (not waiting for work: it sees the close and ends)
        for child in self.children:
            child.close()
        self.waker.close()

    # ------------------------------------------------------------ slot threads

    def _in_child(self, name: str) -> bool:
        spec = self.registry.get(name)
        return bool(self.children) and spec is not None and not spec.needs_gpu

    def _needs(self, record: DispatchRecord) -> dict:
        if isinstance(record.needs, dict):
            return record.needs
        spec = self.registry.get(record.name)
        return spec.resources if spec is not None else {}

    def _startable(self):
        if not self._pending:
            return None
        needs = self._needs(self._pending[0][0])
        for name, qty in needs.items():
            if self._free.get(name, 0) < qty:
                return None
        return needs

    def _notify_one(self) -> None:
        if self._waiting:
            self._waits[self._waiting.pop()].notify()

    def _notify_all(self) -> None:
        while self._waiting:
            self._notify_one()

    def _hand_to_idle_child(self) -> bool:
        """Send the first batch to an idle slot's child from this thread (under the lock); True if sent."""
        if not self.children or not self._waiting or self._closing:
            return False
        index = self._waiting[-1]
        child = self.children[index]
        needs = self._startable()
        if needs is None or not self._in_child(self._pending[0][0].name):
            return False
        batch = [self._pending.popleft()]
        self._extend(batch, needs, child, self._idle_slots() - 1)  # (that slot counts as idle still)
        if not child.send_now(batch):
            self._pending.extendleft(reversed(batch))
            return False
        self._take(batch, needs, child)
        self._waiting.pop()
        handed = Handed(batch, needs, time.monotonic())
        if self._watch and len(batch) <= WATCH_MAX:
            self._watched[index] = handed  # its slot thread sleeps on
            self.watched[child.fileno()] = index
        else:
            self._handed[index] = handed
            self._waits[index].notify()
        return True

    def _unwatch(self, index: int, over: bool | None) -> None:
        """The socket thread is done with a watched batch: ``over`` (True), its slot free again and
        the next batch handed; else its slot thread takes over the collection where it stands."""
        with self._cond:
            handed = self._watched.pop(index)
            del self.watched[next(fd for fd, i in self.watched.items() if i == index)]
            if not over:
                self._handed[index] = handed
                self._waits[index].notify()
                return
            self._release(handed.needs)
            self._waiting.append(index)  # (its thread never stopped waiting)
            if self._pending and not self._hand_to_idle_child():
                self._notify_one()

    def _idle_slots(self) -> int:
        """Slot threads waiting for work (a watched slot's thread sleeps, yet its child is busy)."""
        return self._idle - len(self._watched)

    def _release(self, needs: dict) -> None:
        """A batch is over: what it held is free again."""
        if self._running:
            hold(self._free, needs, +1)
        else:
            self._free = dict(self._resources)  # idle: exactly what it offers

    def _take(self, batch: list, needs: dict, child) -> None:
        """``batch`` leaves the queue for a slot: its resources held, its tasks running."""
        hold(self._free, needs, -1)
        for record, _ in batch:
            self._running.add(record.task_id)
            if child is not None:
                self._where[record.task_id] = child
        if batch[0][0].ahead:
            self._log.append(batch[0][0].task_id)  # the broker waits to hear that it started

    def _loop(self, index: int, child) -> None:
        if child is not None:
            try:
                child.start()  # boots while the worker announces itself
            except Exception:  # tried again with the first task, which fails with the error if it persists
                log.exception("process_slot_start_failed", slot=child.index)
        while True:
            with self._cond:
                handed, needs = self._next_work(index)
                while handed is None and needs is None and not self._closing:
                    self._idle += 1
                    self._waiting.append(index)
                    self._waits[index].wait()
                    self._idle -= 1
                    if index in self._waiting:
                        self._waiting.remove(index)
                    handed, needs = self._next_work(index)
                if handed is not None:
                    batch, needs = handed.batch, handed.needs
                    in_child = True
                elif self._closing:
                    return
                else:
                    batch = [self._pending.popleft()]
                    in_child = child is not None and self._in_child(batch[0][0].name)
                    if in_child:
                        self._extend(batch, needs, child, self._idle_slots())
                    self._take(batch, needs, child if in_child else None)
                if self._pending:
                    self._notify_one()  # the next one may fit too
            if in_child:
                try:
                    if handed is not None:
                        child.collect(handed, self._emit, self._give_back)
                    else:
                        child.run(batch, self._emit, self._give_back)
                except Exception as exc:  # a bug here must cost these tasks, never the slot
                    log.exception("process_slot_failed", slot=child.index)
                    for record, _ in batch:
                        if record.task_id in self._running:
                            self._emit([(*failure(record.task_id, False, exc, 0.0), None)])
            else:
                record, frames = batch[0]
                self._emit([(*run_task(self.registry, record.task_id, record.name, record.args, frames, self.gpu), None)])
            with self._cond:
                self._release(needs)
                self._notify_one()

    def _next_work(self, index: int) -> tuple:
        """(a batch handed to this slot, None) or (None, the needs of the task first in line, if
        it may start); a slot whose child the socket thread watches takes nothing."""
        handed = self._handed.pop(index, None)
        if handed is not None:
            return handed, None
        return None, None if index in self._watched else self._startable()

    def _extend(self, batch: list, needs: dict, child, idle: int) -> None:
        """Add the short tasks sent ahead right behind the first, leaving ``idle`` other slots their share."""
        share = -(-(len(self._pending) + 1) // (idle + 1))
        limit = min(child.room(), share)
        while len(batch) < limit and self._pending:
            record = self._pending[0][0]
            if not record.ahead or not self._in_child(record.name) or self._needs(record) != needs:
                break
            batch.append(self._pending.popleft())

    def _give_back(self, tasks: list) -> None:
        """Tasks of a child's batch it will not start: first in line again, for any slot."""
        if not tasks:
            return
        with self._cond:
            for record, _ in tasks:
                self._running.discard(record.task_id)
                self._where.pop(record.task_id, None)
            self._pending.extendleft(reversed(tasks))
            self._notify_all()

    def _emit_here(self, outcomes: list) -> None:
        """``_emit`` on the socket thread, which sends the log next: nothing to wake."""
        self._emit(outcomes, False)

    def _emit(self, outcomes: list, wake: bool = True) -> None:
        """Tasks' outcomes into the log, in order: ``(entry, frames, started)`` each, ``started`` the
        next task of its batch, starting now (or None). One lock for all of a child's message."""
        slow = False  #: a task that ran long enough to be reported at once
        with self._cond:
            running, where, log = self._running, self._where, self._log
            for entry, frames, started in outcomes:
                running.discard(entry.task_id)
                where.pop(entry.task_id, None)
                log.append((entry, frames))
                if started is not None and started.ahead:
                    log.append(started.task_id)
                slow = slow or entry.run_s >= BATCH_BELOW_S
            self._results += len(outcomes)
            # tiny tasks with more waiting here: let results gather into one DONE (the socket
            # thread also sends what is there every 2 ms); otherwise report at once
            wake = wake and not self._woken and (not (self._pending or started) or self._results >= OUTPUT_BATCH
                                                 or slow)
            self._woken = self._woken or wake
        if wake:
            self.waker.wake()
