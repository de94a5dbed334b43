"""Process slots: one child process per CPU slot, its channel, its shared-memory arena, its recycling.

A slot thread of the Runner (worker/executors.py) hands its ProcessSlot a batch
of tasks; the slot sends them to its child in one message and reports each
result as the child answers it. Large argument arrays are copied once into an
arena of shared memory that the worker creates, the child maps, and the worker
unlinks as soon as the child has it: a child that dies, or a worker killed with
``kill -9``, leaves nothing behind in /dev/shm. A child that dies loses only the
task it ran; the tasks after it in its batch go back to the worker's queue.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from broker.logs import get_logger
from broker.protocol import LOST, DoneRecord, frame_buffer, new_record
from broker.shared import Waker
from worker.channel import Channel, ChannelClosed, pair
from worker.child import child_main
from worker.run import failure

log = get_logger(__name__)
#: argument frames at least this large travel through the slot's shared-memory arena
SHM_MIN_BYTES = 256 * 1024
#: most tasks one message to a child carries
CHILD_BATCH = 32
#: a task of a batch that runs this long without an answer makes the child hand back those behind it
RELEASE_AFTER_S = 0.003
#: how long a child may take to exit once told to (or killed) before it is waited on no more
JOIN_S = 5.0


class ChildDied(RuntimeError):
    """The child process running a task died (os._exit, a signal, the OOM killer)."""


class Killed(RuntimeError):
    """The broker had the task killed (it ran past its timeout, or was cancelled with terminate)."""


@dataclass(slots=True)
class Handed:
    """A batch sent to a slot's child from the worker's socket thread, and how far its results came."""

    batch: list  #: [(record, frames)] in the order the child runs them
    needs: dict  #: what the batch holds of the worker's resources
    since: float  #: sent, or its last result read (time.monotonic): its release is due RELEASE_AFTER_S later
    k: int = 0  #: results read so far
    bye: str | None = None  #: why the child exits after its last result (a limit): the slot thread replaces it


@dataclass(frozen=True)
class PoolOptions:
    modules: tuple = ()  #: --tasks modules each child imports
    max_tasks_per_child: int = 0  #: 0: no limit
    max_memory_per_child_mib: int = 0  #: 0: no limit


def context(modules) -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it (children fork from a clean, single-threaded server that
    preloaded the task modules), else spawn; never a fork of the threaded worker."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["worker.child", "worker.builtins", *modules])
        return ctx
    return multiprocessing.get_context("spawn")


class ProcessSlot:
    """One CPU slot's child process, driven by one slot thread; kill requests come from any thread."""

    def __init__(self, index: int, options: PoolOptions, ctx) -> None:
        self.index = index
        self.options = options
        self._ctx = ctx
        self._proc = None
        self._channel: Channel | None = None
        self._progress = None  #: [batch seq, index] of the task the child runs (shared memory it writes)
        self._arena: shared_memory.SharedMemory | None = None
        self._arena_named = False  #: the child may not have mapped it yet: keep its name until it answers
        self._ran = 0  #: tasks the current child ran
        self._seq = 0  #: number of the latest batch sent
        self._started_at = 0.0
        self.start_s: float | None = None  #: how long the current child took to say hello
        self._waker = Waker()
        self._lock = threading.Lock()
        self._kills: dict[str, str] = {}  #: task id -> why the broker wants it killed
        self._closed = False

    # ------------------------------------------------------------ any thread

    def request_kill(self, task_id: str, reason: str) -> None:
        with self._lock:
            self._kills[task_id] = reason
        self._waker.wake()

    def close(self) -> None:
        """Kill the child (the worker is leaving: what it ran was finished or handed back)."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.pid is not None:
            _signal(proc.pid, signal.SIGKILL)
            proc.join(JOIN_S)
        if self._channel is not None:
            self._channel.close()  # a slot thread still reading it gets an error: it stops there
        self._drop_arena()
        self._waker.wake()

    # ------------------------------------------------------------ slot thread

    def start(self) -> None:
        mine, theirs = pair()
        opts = self.options
        self._progress = self._ctx.RawArray("q", 2)
        proc = self._ctx.Process(target=child_main, name=f"gridq-slot-{self.index}", daemon=False,
                                 args=(theirs, list(opts.modules), opts.max_tasks_per_child,
                                       opts.max_memory_per_child_mib << 20, self._progress))
        self._started_at = time.perf_counter()
        self.start_s = None
        try:
            proc.start()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the child's end lives in the child only: its death is our EOF
        self._proc, self._channel, self._ran = proc, Channel(mine), 0
        if self._closed:  # the worker closed meanwhile
            self.close()

    def room(self) -> int:
        """Tasks the current child may still run before --max-tasks-per-child replaces it."""
        limit = self.options.max_tasks_per_child
        return max(1, limit - self._ran) if limit else CHILD_BATCH

    def run(self, batch: list, emit, give_back) -> None:
        """Run ``batch`` [(record, frames)] in the child, in order. ``emit([(entry, frames, next_record)])``
        reports outcomes as they come (those the child wrote together, together); ``give_back(tasks)`` returns tasks the child will not start
        (the task before them runs long, or the child went) to the worker's queue at once."""
        if self._closed:
            give_back(batch)
            return
        if not self._idle_child_alive():
            self._replace("died while idle")
        try:
            self._send_batch(batch)
        except OSError:
            self._replace("died before it got its tasks")
            give_back(batch)
            return
        self._collect(list(batch), emit, give_back)
        self._forget_kills(batch)

    def send_now(self, batch: list) -> bool:
        """Send ``batch`` to an idle child from the caller's thread (the worker's socket thread, while
        this slot's thread waits), so the child starts without waiting for that thread; ``collect``
        on the slot thread follows. False (nothing sent) where the slot thread must see to it: no
        child, the child died while idle, or an argument goes through the arena. (Its hello, or a
        late "released", is read with the batch's results: ``_take`` reads every kind of message.)"""
        if self._closed or self._proc is None:
            return False
        if any(_nbytes(f) >= SHM_MIN_BYTES for _, frames in batch for f in frames):
            return False
        try:
            self._send_batch(batch)
        except OSError:
            return False  # the child is gone: run() on the slot thread replaces it and sends again
        return True

    def collect(self, handed: Handed, emit, give_back) -> None:
        """Report the outcomes of ``handed``, sent to the child last, from where another thread left it."""
        if handed.bye:
            give_back(handed.batch[handed.k:])
            self._replace(handed.bye)
        else:
            self._collect(list(handed.batch), emit, give_back, handed.k, handed.since)
        self._forget_kills(handed.batch)

    def fileno(self) -> int:
        return self._channel.fileno()

    def read_handed(self, handed: Handed, emit, give_back) -> bool | None:
        """Read what the child wrote of ``handed`` without waiting (the socket thread watches its
        channel while this slot's thread sleeps): True once the batch is over, False while it runs,
        None where the slot thread must take over (the child went, or exits after its limit)."""
        try:
            messages = self._channel.read_nowait()
        except (ChannelClosed, OSError):
            return None  # the slot thread reads the end again and does what a death needs
        k, bye = self._take(messages, handed.batch, handed.k, emit, give_back)
        if k > handed.k:
            handed.k, handed.since = k, time.monotonic()
        if bye:
            handed.bye = bye
            return None
        if k < len(handed.batch):
            return False
        self._forget_kills(handed.batch)
        return True

    def _forget_kills(self, batch: list) -> None:
        if not self._kills:
            return
        with self._lock:
            for record, _ in batch:
                self._kills.pop(record.task_id, None)

    def _send_batch(self, batch: list) -> None:
        self._seq += 1
        tasks, inline = self._pack(batch)
        self._channel.send(["run", self._seq, self._arena_change, tasks], inline)

    def _pack(self, batch: list) -> tuple[list, list]:
        """Task records for the child; large frames copied into the arena, small ones inline."""
        big = sum(_aligned(n) for _, frames in batch for n in map(_nbytes, frames) if n >= SHM_MIN_BYTES)
        self._arena_change = self._ensure_arena(big) if big else None
        tasks, inline, offset = [], [], 0
        for record, frames in batch:
            refs = []
            for frame in frames:
                view = memoryview(frame_buffer(frame)).cast("B")
                if view.nbytes >= SHM_MIN_BYTES:
                    np.frombuffer(self._arena.buf, np.uint8, view.nbytes, offset)[:] = np.frombuffer(view, np.uint8)
                    refs.append([offset, view.nbytes])
                    offset += _aligned(view.nbytes)
                else:
                    refs.append(len(inline))
                    inline.append(view)
            tasks.append([record.task_id, record.name, record.args, refs])
        return tasks, inline

    def _collect(self, batch: list, emit, give_back, k: int = 0, progress_at: float | None = None) -> None:
        """Wait for the batch's outcomes from the ``k``-th on, a kill request, or the child's death;
        ``batch`` shrinks to what the child will run when it hands the rest back."""
        poller = select.poll()
        poller.register(self._channel.fileno(), select.POLLIN)
        poller.register(self._waker.fd, select.POLLIN)
        if progress_at is None:
            progress_at = time.monotonic()
        release_sent = False
        while k < len(batch):
            wait_ms = None
            if not release_sent and k + 1 < len(batch):
                wait_ms = max(0.0, progress_at + RELEASE_AFTER_S - time.monotonic()) * 1000
            ready = {fd for fd, _ in poller.poll(wait_ms)}
            if not ready and wait_ms is not None:  # the current task runs long: free the ones behind it
                self._send(["release", self._seq])
                release_sent = True
            if self._waker.fd in ready:
                self._waker.clear()
                with self._lock:
                    reason = self._kills.get(batch[self._running(batch, k)][0].task_id)
                if reason is not None or self._closed:
                    _signal(self._proc.pid, signal.SIGKILL)
                    k = self._drain(batch, k, emit, give_back)
                    self._after_death(batch, k, emit, give_back, reason)
                    return
            if self._channel.fileno() in ready:
                try:
                    k, bye = self._take(self._channel.read_available(), batch, k, emit, give_back)
                except (ChannelClosed, OSError):
                    self._after_death(batch, k, emit, give_back, None)
                    return
                progress_at = time.monotonic()
                if bye:
                    give_back(batch[k:])
                    self._replace(bye)
                    return

    def _take(self, messages: list, batch: list, k: int, emit, give_back) -> tuple[int, str | None]:
        for header, frames in messages:
            if header[0] == "done":
                if self._arena_named:
                    self._unlink_arena()  # the child mapped it before it ran anything
                at, outcomes = 0, []
                for task_id, ok, value, nframes, run_s, bye in header[1]:
                    nxt = batch[k + 1][0] if k + 1 < len(batch) and not bye else None
                    outcomes.append((new_record(DoneRecord, (task_id, ok, value, nframes, run_s)),
                                     frames[at:at + nframes] if nframes else [], nxt))
                    at += nframes
                    k += 1
                    if bye:
                        break
                self._ran += len(outcomes)
                if outcomes:
                    emit(outcomes)
                if bye:
                    return k, bye
            elif header[0] == "released" and header[1] == self._seq and k <= header[2] < len(batch):
                # (answered after the batch ran to its end, it concerns no task: read while idle)
                give_back(batch[header[2]:])  # never started there: first in line again here
                del batch[header[2]:]
            elif header[0] == "hello":
                self.start_s = time.perf_counter() - self._started_at
                log.debug("child_started", slot=self.index, pid=header[1], start_ms=round(self.start_s * 1000, 1))
        return k, None

    def _drain(self, batch: list, k: int, emit, give_back) -> int:
        """Results the killed child wrote before it died still count."""
        while True:
            try:
                k, _ = self._take(self._channel.read_available(), batch, k, emit, give_back)
            except (ChannelClosed, OSError):
                return k

    def _running(self, batch: list, k: int) -> int:
        """Index in the batch of the task the child runs, ``k`` tasks having answered (the child
        may hold the results of a few before it)."""
        seq, index = self._progress[0], self._progress[1]
        return min(index, len(batch) - 1) if seq == self._seq and index > k else k

    def _after_death(self, batch: list, k: int, emit, give_back, reason: str | None) -> None:
        """The child is gone: the task it ran was killed or is lost, the ones after it never started,
        the ones before it whose results it held run again."""
        if k >= len(batch):
            self._replace("killed after its batch")
            return
        r = self._running(batch, k)
        give_back(batch[k:r])
        del batch[k:r]
        record = batch[k][0]
        proc = self._proc
        proc.join(JOIN_S)
        how = _exit_text(proc.exitcode)
        if reason is not None:
            emit([(*failure(record.task_id, False, Killed(f"killed on its worker ({reason})"), 0.0, ""), None)])
        elif not self._closed:
            log.warning("child_died", slot=self.index, pid=proc.pid, task_id=record.task_id, how=how)
            emit([(*failure(record.task_id, LOST, ChildDied(f"the child process running it died ({how})"), 0.0, ""),
                    None)])
        give_back(batch[k + 1:])
        self._replace(how)

    def _send(self, header) -> None:
        try:
            self._channel.send(header)
        except OSError:
            pass  # the child is gone: its EOF tells

    def _idle_child_alive(self) -> bool:
        """Read what an idle child sent (its hello); False where it died meanwhile."""
        if self._proc is None:
            return False
        while select.select([self._channel.fileno()], [], [], 0)[0]:
            try:
                self._take(self._channel.read_available(), [], 0, None, None)
            except (ChannelClosed, OSError):
                return False
        return True

    def _replace(self, why: str) -> None:
        """A fresh child for this slot (the old one died, was killed, or reached a limit)."""
        old = self._proc
        if old is not None:
            if old.exitcode is None:
                _signal(old.pid, signal.SIGKILL)
            old.join(JOIN_S)
            self._channel.close()
            log.info("child_replaced", slot=self.index, pid=old.pid, why=why)
        self._drop_arena()  # the next child maps a new one
        self._proc = None
        if not self._closed:
            self.start()

    # ------------------------------------------------------------ arena

    def _ensure_arena(self, size: int) -> list | None:
        """[name, size] where the child must map a new arena, else None (its arena is big enough)."""
        if self._arena is not None and self._arena.size >= size:
            return None
        self._drop_arena()
        self._arena = shared_memory.SharedMemory(create=True, size=-(-size // (1 << 20)) << 20)
        self._arena_named = True
        return [self._arena.name, self._arena.size]

    def _unlink_arena(self) -> None:
        self._arena_named = False
        try:
            self._arena.unlink()
        except FileNotFoundError:
            pass

    def _drop_arena(self) -> None:
        arena, self._arena = self._arena, None
        if arena is None:
            return
        if self._arena_named:
            self._arena_named = False
            try:
                arena.unlink()
            except FileNotFoundError:
                pass
        try:
            arena.close()
        except BufferError:
            pass  # a view is still being written: the mapping goes with it


def _nbytes(frame) -> int:
    return memoryview(frame_buffer(frame)).nbytes


def _aligned(n: int) -> int:
    return (n + 63) & ~63


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_text(code) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
