"""What runs inside a process slot's child: read task batches, run them in order, answer each.

The worker starts a child per CPU slot (forkserver or spawn, never a fork of the
threaded worker). Messages, on a socket pair (worker/channel.py):

    worker -> child  ["run", seq, arena, tasks]  a batch, run in order. arena: [shm name, size] when
                                             it changed, else nil; tasks: [[task_id, name, args_blob,
                                             refs]], a ref is a frame index of this message or
                                             [offset, length] in the arena
                     ["release", seq]        start no more tasks of batch seq
    child -> worker  ["hello", pid]          once, when it is ready
                     ["released", seq, n]    answer to release: it started the first n tasks only
                     ["done", [[task_id, ok, value, nframes, run_s, bye], ...]] + their result frames, in
                                             order (nframes each): results of one or more tasks, in the
                                             order run; bye: why it exits now (--max-tasks/memory-per-child)

Results of short tasks followed by more of their batch are held and written together
(one wakeup of the worker's slot thread for many), at most ``HOLD_MAX`` of them and for
at most ``HOLD_S``; the last task's result, or one whose next task runs long (the
worker's ``release`` flushes them), goes at once. Before each task the child writes
(batch, index) into ``progress``, shared memory the worker reads when the child dies:
that task is the one lost; held results of tasks before it are lost with the child,
and those tasks go back to the worker's queue like the ones not started.

A child never outlives its worker: the kernel kills it when its parent goes
(PR_SET_PDEATHSIG, with a watchdog thread where that is missing).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
import time
from collections import deque
from multiprocessing import shared_memory

from broker.runtime import tune_gc
from worker.channel import Channel, ChannelClosed
from worker.registry import working_directory_last

# The forkserver runs as `python -c`, which puts the working directory first on sys.path, and
# imports this module before the --tasks modules it preloads: put it last again before those, so
# a user's client.py beside their tasks shadows nothing in a child either.
working_directory_last()

#: prctl option: the signal a process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1
#: most results held back to be written together
HOLD_MAX = 32
#: longest a finished task's result is held back while the next tasks of its batch run (seconds)
HOLD_S = 0.001


def child_main(sock, modules: list, max_tasks: int, max_memory_bytes: int, progress) -> None:
    parent = os.getppid()
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which drains its children
    from worker.registry import REGISTRY, load_modules
    from worker.run import run_task

    import worker.builtins  # noqa: F401  (preloaded by the forkserver; imported here under spawn)

    load_modules(modules)
    tune_gc()  # a child allocates a few containers per task and frees them at once, as the broker does
    child = _Child(Channel(sock), progress)
    child.send(["hello", os.getpid()])
    threading.Thread(target=child.read_while_watched, name="channel-reader", daemon=True).start()
    arena = None
    ran = 0
    while True:
        message = child.next_batch()
        if message is None:
            return  # the worker closed our channel: stop
        header, frames = message
        seq, arena_change, tasks = header[1:4]
        if arena_change is not None:
            arena = _attach(arena_change[0], arena)
        child.watch(len(tasks) > 1)  # a release can only come for a batch with tasks behind the one running
        for j, (task_id, name, args, refs) in enumerate(tasks):
            if not child.begin(seq, j):
                break  # the worker took the rest back (this batch's current task ran long)
            task_frames = [frames[r] if isinstance(r, int) else arena.buf[r[0]:r[0] + r[1]].toreadonly() for r in refs]
            out, out_frames = run_task(REGISTRY, task_id, name, args, task_frames)
            del task_frames
            ran += 1
            why = _limit_reached(ran, max_tasks, max_memory_bytes)
            child.hold([*out, why], out_frames, last=bool(why) or j + 1 == len(tasks))
            if why:
                return  # the worker starts another child for this slot
        child.flush()  # what the worker's release left here
        child.begin(None, 0)
        child.watch(False)


class _Child:
    """The channel shared by the task thread and the reader thread, and the batch being run.

    While idle, the main thread reads the channel itself: a lone task crosses no thread
    here. While a batch with tasks behind the running one runs, the reader thread
    watches the channel and answers ``release`` at once (pure Python lets it have the
    GIL within 5 ms), so the tasks not started yet go back to the worker's queue
    instead of waiting behind one that runs long. One lock keeps the two from reading
    at once; whoever reads handles every message that came.
    """

    def __init__(self, channel: Channel, progress) -> None:
        self.channel = channel
        self.progress = progress  #: [batch seq, index of the task running], shared with the worker
        self._held: list = []  #: results not written yet: [task_id, ok, value, nframes, run_s, bye]
        self._held_frames: list = []  #: their result frames, in order
        self._held_since = 0.0
        self._batches: deque = deque()  #: "run" messages read, not begun; None: the channel closed
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._watching = threading.Event()  #: the reader thread reads while set
        self._unwatch_r, self._unwatch_w = os.pipe()  #: ends the reader's wait on the channel
        self._seq = None  #: the batch being run (seqs increase)
        self._next = 0  #: how many of its tasks were started
        self._finished = 0  #: the last batch run to its end
        self._released: set = set()  #: batches the worker took back, not begun or not finished here

    # ------------------------------------------------------------ writing

    def send(self, header, frames=()) -> None:
        with self._send_lock:
            self.channel.send_all([*self._take_held(), (header, frames)])

    def hold(self, result: list, frames: list, last: bool) -> None:
        """A task's result: written now (``last`` of its batch, or enough held) or with the next ones."""
        with self._send_lock:
            if not self._held:
                self._held_since = time.perf_counter()
            self._held.append(result)
            self._held_frames += frames
            if last or len(self._held) >= HOLD_MAX or time.perf_counter() - self._held_since >= HOLD_S:
                self.channel.send_all(self._take_held())

    def flush(self) -> None:
        if not self._held:
            return  # (only this thread holds results: nothing can come meanwhile)
        with self._send_lock:
            self.channel.send_all(self._take_held())

    def _take_held(self) -> list:
        """The held results as one message (none where nothing is held)."""
        if not self._held:
            return []
        message = (["done", self._held], self._held_frames)
        self._held, self._held_frames = [], []
        return [message]

    # ------------------------------------------------------------ the batch

    def begin(self, seq, j: int) -> bool:
        """May task ``j`` of batch ``seq`` start? (``seq`` None: the batch is over.)"""
        with self._lock:
            if seq != self._seq:
                if seq is None and self._seq is not None:
                    self._finished = self._seq
                    self._released.discard(self._seq)
                self._seq, self._next = seq, 0
            if seq is None or seq in self._released:
                return False
            self._next = j + 1
            self.progress[1] = j  # (the worker reads it once this process is dead: no tearing)
            self.progress[0] = seq
            return True

    def _release(self, seq: int) -> None:
        with self._lock:
            if seq <= self._finished or seq in self._released:
                return  # that batch is over: its results are on their way
            self._released.add(seq)
            started = self._next if seq == self._seq else 0  # else: not begun yet
        self.send(["released", seq, started])

    # ------------------------------------------------------------ reading

    def next_batch(self):
        """The next "run" message (header, frames), read on this thread; None once the channel closed."""
        while True:
            with self._read_lock:
                if not self._batches:
                    try:
                        self._dispatch(self.channel.read_available())
                    except (ChannelClosed, OSError):
                        self._batches.append(None)
                if self._batches:
                    return self._batches.popleft()

    def watch(self, on: bool) -> None:
        """Have the reader thread answer releases while this batch runs (``on``), or stop it."""
        if on:
            self._watching.set()
        elif self._watching.is_set():
            self._watching.clear()
            os.write(self._unwatch_w, b"x")

    def read_while_watched(self) -> None:
        """The reader thread's loop (started with the child, so a batch need not wait for it)."""
        sock = self.channel.fileno()
        while True:
            self._watching.wait()
            ready = select.select([sock, self._unwatch_r], [], [])[0]
            if self._unwatch_r in ready:
                os.read(self._unwatch_r, 4096)
                continue
            with self._read_lock:
                if not self._watching.is_set():
                    continue  # the batch is over: the main thread reads what came
                try:
                    self._dispatch(self.channel.read_nowait())
                except (ChannelClosed, OSError):
                    self._batches.append(None)
                    return

    def _dispatch(self, messages: list) -> None:
        """Answer releases; keep batches for the main thread (called under the read lock)."""
        for header, frames in messages:
            if header[0] == "run":
                self._batches.append((header, frames))
            elif header[0] == "release":
                self._release(header[1])


def _attach(name: str, old):
    if old is not None:
        try:
            old.close()
        except BufferError:
            pass  # a task kept a view of an argument: the mapping goes when that does
    # registers the name with the worker's resource tracker again (a no-op there): the worker
    # unlinks it once this child has attached, and that unregisters it
    return shared_memory.SharedMemory(name=name)


def _limit_reached(ran: int, max_tasks: int, max_memory_bytes: int) -> str | None:
    if max_tasks and ran >= max_tasks:
        return f"ran {ran} tasks (--max-tasks-per-child {max_tasks})"
    if max_memory_bytes:
        private = private_memory_bytes()
        if private > max_memory_bytes:
            return f"private memory {private >> 20} MiB over --max-memory-per-child {max_memory_bytes >> 20} MiB"
    return None


def private_memory_bytes() -> int:
    """Resident memory not shared (argument arrays mapped from the worker's shared memory do not count)."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _die_with_parent(parent: int) -> None:
    """Die when the parent does: the worker under spawn; under forkserver the forkserver, which
    exits when the worker does -- once no child holds its lifeline (inherited here, so closed)."""
    try:
        from multiprocessing import forkserver

        alive = forkserver._forkserver._forkserver_alive_fd
        if alive is not None and forkserver._forkserver._forkserver_pid is None:  # we are a forked child
            os.close(alive)
            forkserver._forkserver._forkserver_alive_fd = None
    except (ImportError, AttributeError, OSError):
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
