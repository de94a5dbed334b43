"""What runs inside a process slot's child: read task batches, run them in order, answer each.

The worker starts a child per CPU slot (forkserver or spawn, never a fork of the
threaded worker). Messages, on a socket pair (worker/channel.py):

    worker -> child  ["run", arena, tasks]   arena: [shm name, size] when it changed, else nil;
                                             tasks: [[task_id, name, args_blob, refs]], a ref is a
                                             frame index of this message or [offset, length] in the arena
    child -> worker  ["hello", pid]          once, when it is ready
                     ["done", task_id, ok, value, nframes, run_s, bye] + result frames, one per task, at
                                             once; bye: why it exits now (--max-tasks/memory-per-child), or nil

A child never outlives its worker: the kernel kills it when its parent goes
(PR_SET_PDEATHSIG, with a watchdog thread where that is missing).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from multiprocessing import shared_memory

from worker.channel import Channel, ChannelClosed

#: prctl option: the signal a process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


def child_main(sock, modules: list, max_tasks: int, max_memory_bytes: int) -> None:
    parent = os.getppid()
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which drains its children
    from worker.run import run_task
    from worker.registry import REGISTRY, load_modules

    import worker.builtins  # noqa: F401  (preloaded by the forkserver; imported here under spawn)

    load_modules(modules)
    channel = Channel(sock)
    channel.send(["hello", os.getpid()])
    arena = None
    ran = 0
    while True:
        try:
            header, frames = channel.receive()
        except (ChannelClosed, OSError):
            return  # the worker closed our channel: stop
        if header[0] != "run":
            continue
        if header[1] is not None:
            arena = _attach(header[1][0], arena)
        for task_id, name, args, refs in header[2]:
            task_frames = [frames[r] if isinstance(r, int) else arena.buf[r[0]:r[0] + r[1]].toreadonly() for r in refs]
            out, out_frames = run_task(REGISTRY, task_id, name, args, task_frames)
            del task_frames
            ran += 1
            why = _limit_reached(ran, max_tasks, max_memory_bytes)
            channel.send(["done", *out, why], out_frames)
            if why:
                return  # the worker starts another child for this slot


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
