"""GPU executors: one thread per CUDA device, pinned host staging both ways, and the gpu.* built-in tasks.

A worker started with ``--gpu 0 1`` builds ``GpuPool([0, 1])``. Each device gets
one executor thread that made the device current, a non-default CUDA stream and
two reusable pinned (page-locked) host buffers. A task needing ``gpu`` runs on
the executor of a free device: its numpy arguments, nested anywhere in
lists/tuples/dicts, are copied to that device through the pinned buffers, the
task runs inside ``with cupy.cuda.Device(d)``, and cupy arrays in its result are
copied back the same way into fresh numpy arrays.

Why pinned staging: a copy from pageable memory makes the driver stage through
its own small pinned buffer, synchronously; from page-locked memory the copy
engine reads host memory directly (52 vs 6 GB/s host->device on an H100). We
copy each array in chunks that alternate between two pinned buffers, so the CPU
copy into one buffer overlaps the DMA out of the other.

No fork after CUDA initialisation: a forked child inherits a CUDA context it
cannot use. The worker runs tasks on threads (worker/executors.py), never in
forked processes, and a pool refuses to run in a process other than the one
that built it.

CuPy is imported only when a pool is built, so CPU-only workers never need it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from broker.logs import get_logger
from worker.registry import task

log = get_logger(__name__)

#: what each gpu.* built-in holds while it runs
GPU_NEEDS = {"gpu": 1}
#: largest piece of one copy that goes through a pinned buffer at a time
STAGING_CHUNK_BYTES = 8 * 1024 * 1024
#: smallest pinned buffer allocated, so that many small arrays do not grow it step by step
MIN_STAGING_BYTES = 256 * 1024
#: what a missing CuPy says
NO_CUPY = "CuPy is not installed: pip install gridq[gpu]"
#: dtype kinds that travel to the device: bool, ints, unsigned, floats, complex
_DEVICE_KINDS = "biufc"
#: cudaMemcpyKind values (CUDA runtime ABI)
_HOST_TO_DEVICE = 1
_DEVICE_TO_HOST = 2


def _import_cupy():
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "cupy":
            raise RuntimeError(NO_CUPY) from None
        raise RuntimeError(f"CuPy could not be imported: {exc}") from None
    except ImportError as exc:  # installed, but its CUDA libraries are missing or broken
        raise RuntimeError(f"CuPy could not be imported: {exc}") from None
    return cupy


def _device_count(cupy) -> tuple[int, str]:
    """Visible CUDA devices, and why there are none where the runtime itself failed."""
    try:
        return cupy.cuda.runtime.getDeviceCount(), ""
    except Exception as exc:  # no driver, no device, driver too old: all say 0 devices
        return 0, f": {exc}"


# ================================================================== staging


class PinnedStaging:
    """Two reusable pinned host buffers that carry copies between host memory and one device.

    Every copy runs on ``stream`` in chunks of at most ``chunk_bytes`` that
    alternate between the two buffers. Each buffer grows (never shrinks) to the
    largest chunk it has carried; ``allocations`` counts pinned allocations, so
    tests can see the buffers being reused. Used from one thread only: its
    device's executor.
    """

    def __init__(self, cupy, stream, chunk_bytes: int = STAGING_CHUNK_BYTES) -> None:
        self._cp = cupy
        self.stream = stream
        self.chunk_bytes = chunk_bytes
        self.allocations = 0  #: pinned allocations made so far
        self._memory: list = [None, None]  #: PinnedMemoryPointer per buffer
        self._views: list = [None, None]  #: uint8 numpy view on each buffer
        self._events = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(2)]
        self._pending = [False, False]  #: a copy through this buffer may still be in flight

    @property
    def capacity(self) -> list[int]:
        """Bytes of each pinned buffer (0 before first use)."""
        return [0 if v is None else v.size for v in self._views]

    def buffer_pointers(self) -> list[int]:
        """Host addresses of the pinned buffers, to tell a reused buffer from a new one."""
        return [0 if m is None else m.ptr for m in self._memory]

    def _buffer(self, i: int, nbytes: int) -> np.ndarray:
        view = self._views[i]
        if view is None or view.size < nbytes:
            size = min(max(nbytes, MIN_STAGING_BYTES, 2 * (0 if view is None else view.size)), self.chunk_bytes)
            size = max(size, nbytes)
            self._memory[i] = memory = self._cp.cuda.alloc_pinned_memory(size)
            self._views[i] = view = np.frombuffer(memory, np.uint8, size)
            self.allocations += 1
        return view

    def _wait(self, i: int) -> None:
        if self._pending[i]:
            self._events[i].synchronize()
            self._pending[i] = False

    def _chunks(self, nbytes: int) -> list[tuple[int, int]]:
        return [(off, min(self.chunk_bytes, nbytes - off)) for off in range(0, nbytes, self.chunk_bytes)]

    def to_device(self, src: np.ndarray, dst_ptr: int) -> None:
        """Copy the bytes of ``src`` (1-D uint8, any host memory) to device address ``dst_ptr``."""
        for k, (off, n) in enumerate(self._chunks(src.size)):
            i = k & 1
            self._wait(i)  # the DMA that last read this buffer is done
            view = self._buffer(i, n)
            np.copyto(view[:n], src[off:off + n])
            self._cp.cuda.runtime.memcpyAsync(dst_ptr + off, self._memory[i].ptr, n, _HOST_TO_DEVICE, self.stream.ptr)
            self._events[i].record(self.stream)
            self._pending[i] = True
        self.stream.synchronize()
        self._pending = [False, False]

    def to_host(self, src_ptr: int, dst: np.ndarray) -> None:
        """Copy ``dst.size`` bytes from device address ``src_ptr`` into ``dst`` (1-D uint8)."""
        chunks = self._chunks(dst.size)

        def issue(k: int) -> None:
            off, n = chunks[k]
            i = k & 1
            self._buffer(i, n)
            self._cp.cuda.runtime.memcpyAsync(self._memory[i].ptr, src_ptr + off, n, _DEVICE_TO_HOST, self.stream.ptr)
            self._events[i].record(self.stream)
            self._pending[i] = True

        if chunks:
            issue(0)
        for k, (off, n) in enumerate(chunks):
            if k + 1 < len(chunks):
                issue(k + 1)  # its buffer was emptied into dst in the previous round
            i = k & 1
            self._wait(i)
            # copy out of the pinned buffer before the next chunk reuses it
            np.copyto(dst[off:off + n], self._views[i][:n])


# ================================================================== devices


class _Device:
    """One CUDA device: its executor thread, stream and staging buffers."""

    def __init__(self, cupy, index: int, chunk_bytes: int) -> None:
        self._cp = cupy
        self.index = index
        self.inflight = 0  #: tasks handed to this device and not finished (guarded by the pool's lock)
        with cupy.cuda.Device(index):
            self.total_mem = int(cupy.cuda.runtime.getDeviceProperties(index)["totalGlobalMem"])
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self.staging = PinnedStaging(cupy, self.stream, chunk_bytes)
        # one thread per device: it made the device current once, and runs one task at a time
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gpu{index}",
                                           initializer=lambda: cupy.cuda.Device(index).use())

    def array_to_device(self, array: np.ndarray):
        cp = self._cp
        fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
        if not (array.flags.c_contiguous or fortran):
            array = np.ascontiguousarray(array)
        out = cp.empty(array.shape, array.dtype, order="F" if fortran else "C")
        if array.nbytes:
            raw = (array.T if fortran else array).reshape(-1).view(np.uint8)
            self.staging.to_device(raw, out.data.ptr)
        return out

    def array_to_host(self, array) -> np.ndarray:
        cp = self._cp
        if not (array.flags.c_contiguous or array.flags.f_contiguous):
            array = cp.ascontiguousarray(array)
        fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
        out = np.empty(array.shape, array.dtype, order="F" if fortran else "C")
        if array.nbytes:
            cp.cuda.get_current_stream().synchronize()  # whatever produced it is finished
            raw = (out.T if fortran else out).reshape(-1).view(np.uint8)
            self.staging.to_host(array.data.ptr, raw)
        return out

    def call(self, fn: Callable, args, kwargs) -> Any:
        """On this device's executor thread: stage in, run, stage out."""
        cp = self._cp
        with cp.cuda.Device(self.index):
            is_host = lambda x: isinstance(x, np.ndarray) and x.dtype.kind in _DEVICE_KINDS  # noqa: E731
            args = _map_arrays(args, is_host, self.array_to_device)
            kwargs = _map_arrays(kwargs, is_host, self.array_to_device)
            result = fn(*args, **kwargs)
            # waits for the task's kernels, and surfaces their asynchronous errors here, in this task
            cp.cuda.Device(self.index).synchronize()
            return _map_arrays(result, lambda x: isinstance(x, cp.ndarray), self.array_to_host)


def _map_arrays(value, is_array: Callable, convert: Callable):
    """``value`` with every array that ``is_array`` accepts replaced by ``convert(array)``, at any depth."""
    if is_array(value):
        return convert(value)
    if isinstance(value, list):
        return [_map_arrays(v, is_array, convert) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_arrays(v, is_array, convert) for v in value)
    if isinstance(value, dict):
        return {k: _map_arrays(v, is_array, convert) for k, v in value.items()}
    return value


class GpuPool:
    """The CUDA devices a worker drives; ``run`` is what the Runner's slot threads call for GPU tasks.

    Raises RuntimeError naming what is missing where CuPy or a device is.
    """

    def __init__(self, devices: list[int], chunk_bytes: int = STAGING_CHUNK_BYTES) -> None:
        if not devices:
            raise ValueError("GpuPool needs at least one CUDA device index")
        if len(set(devices)) != len(devices):
            raise ValueError(f"CUDA devices listed more than once: {devices}")
        cp = _import_cupy()
        count, why = _device_count(cp)
        for d in devices:
            if not 0 <= d < count:
                raise RuntimeError(f"CUDA device {d} not found ({count} devices visible{why})")
        self._cp = cp
        self._pid = os.getpid()  #: CUDA was initialised in this process; a forked child must not use it
        self._lock = threading.Lock()
        self._devices = [_Device(cp, d, chunk_bytes) for d in devices]
        log.info("gpu_pool_ready", devices=devices, total_mem=[d.total_mem for d in self._devices])

    @property
    def devices(self) -> list[int]:
        return [d.index for d in self._devices]

    def resources(self) -> dict:
        """What the worker announces: one ``gpu`` per device, and ``gpu_mem`` in bytes.

        ``gpu_mem`` is the smallest device's memory times the device count, so
        a task admitted against it with ``gpu: 1`` fits on whichever device it
        gets (the broker counts capacity, it does not pick devices).
        """
        smallest = min(d.total_mem for d in self._devices)
        return {"gpu": len(self._devices), "gpu_mem": smallest * len(self._devices)}

    def run(self, fn: Callable, args, kwargs) -> Any:
        """Run ``fn(*args, **kwargs)`` on a free device; numpy in, cupy inside, numpy out."""
        if os.getpid() != self._pid:
            raise RuntimeError("this GPU pool was built before a fork: CUDA does not survive fork, "
                               "build a new pool in the child")
        device = self._acquire()
        try:
            return device.executor.submit(device.call, fn, args, kwargs).result()
        finally:
            with self._lock:
                device.inflight -= 1

    def _acquire(self) -> _Device:
        # the broker sends at most one gpu=1 task per device, so an idle one exists;
        # fractional gpu tasks share the least busy device and queue on its thread
        with self._lock:
            device = min(self._devices, key=lambda d: d.inflight)
            device.inflight += 1
            return device

    def staging_stats(self) -> list[dict]:
        """Per device: pinned allocations made and buffer sizes, to check that staging is reused."""
        return [{"device": d.index, "allocations": d.staging.allocations, "capacity": d.staging.capacity,
                 "pointers": d.staging.buffer_pointers()} for d in self._devices]

    def close(self) -> None:
        for d in self._devices:
            d.executor.shutdown(wait=True)


# ================================================================== built-in tasks


def gpu_matmul(a, b):
    return a @ b


def gpu_sum(a) -> float:
    return float(a.sum())


def gpu_fft(a):
    import cupy

    return cupy.get_array_module(a).fft.fft(a)


def register_gpu_builtins() -> None:
    """Serve gpu.matmul, gpu.sum and gpu.fft (only on workers started with --gpu)."""
    task(name="gpu.matmul", resources=GPU_NEEDS)(gpu_matmul)
    task(name="gpu.sum", resources=GPU_NEEDS)(gpu_sum)
    task(name="gpu.fft", resources=GPU_NEEDS)(gpu_fft)
