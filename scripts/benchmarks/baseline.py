"""The yardstick for scripts/bench: a plain pyzmq load-balancing broker, its workers and a pipelined client.

This is the ZeroMQ guide's load-balancing pattern (ROUTER frontend, ROUTER
backend, workers as DEALERs that tell the broker when they can take work) with
credit-based flow control: a worker announces N credits, each dispatched task
spends one, each reply gives it back. The broker reads the frontend only while
some worker has a credit, so queued work waits in ZeroMQ's pipes, not in the
broker. No scheduling by resource, no events, no retries, no journal: the
fastest thing a Python broker on pyzmq can be, to tell what gridq's features
cost. A request is one frame (its id and op), a reply one frame (its id and
result); the client keeps a thousand or more in flight (``THROUGHPUT_WINDOW``).
Payload arrays travel as zero-copy frames after the request frame, as in gridq.

Wire format (no serialization beyond raw bytes; ``body`` = 8-byte request id + op):

    client DEALER  -> broker:  [body, *payload]
    broker -> worker DEALER:   [client route, body, *payload]
    worker -> broker:          [credits]  or  [client route, reply]   (reply = request id + result)
    broker -> client:          [reply]

``op`` is ``noop`` (result empty) or ``sum`` (result: the float64 sum of the
payload frame, 8 bytes little-endian).

Processes are started with multiprocessing (spawn), report their endpoints
through a pipe, and stop on SIGTERM; callers end them by PID.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import signal
import subprocess
import struct
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

#: credits each real worker announces: tasks the broker may hand it before it answers
WORKER_CREDITS = 64
#: bytes of the request id that starts every request and reply frame
RID_BYTES = 8
#: how often the broker and workers wake to check for a stop signal, in milliseconds
POLL_MS = 100
#: how long to wait for a spawned process to report or to stop, in seconds
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
#: how long a client waits for any reply before it gives up, in seconds
REPLY_TIMEOUT_S = 30.0
#: ops a worker understands
NOOP = b"noop"
SUM = b"sum"


class _StopFlag:
    """Set by SIGTERM/SIGINT in a child process; loops check it between polls."""

    def __init__(self) -> None:
        self.stopped = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, *_args) -> None:
        self.stopped = True


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    return sock


# ------------------------------------------------------------------ broker


def broker_main(conn, host: str = "127.0.0.1") -> None:
    """Bind both ROUTERs on free ports, send their endpoints on ``conn``, then route until SIGTERM."""
    flag = _StopFlag()
    ctx = zmq.Context()
    frontend = _socket(ctx, zmq.ROUTER)
    backend = _socket(ctx, zmq.ROUTER)
    try:
        frontend.bind(f"tcp://{host}:*")
        backend.bind(f"tcp://{host}:*")
        conn.send({"frontend": frontend.last_endpoint.decode(), "backend": backend.last_endpoint.decode()})
        conn.close()
        _route(frontend, backend, flag)
    finally:
        frontend.close()
        backend.close()
        ctx.term()


def _route(frontend: zmq.Socket, backend: zmq.Socket, flag: _StopFlag) -> None:
    # One token per free credit; taking from the left and returning on the right
    # is the guide's least-recently-used queue, generalised to several credits.
    credits: collections.deque = collections.deque()
    backend_only = zmq.Poller()
    backend_only.register(backend, zmq.POLLIN)
    both = zmq.Poller()
    both.register(backend, zmq.POLLIN)
    both.register(frontend, zmq.POLLIN)
    while not flag.stopped:
        ready = dict((both if credits else backend_only).poll(POLL_MS))
        if backend in ready:
            while True:
                try:
                    frames = backend.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                wid = frames[0].bytes
                if len(frames) == 3:  # [wid, client route, reply]
                    credits.append(wid)
                    frontend.send_multipart(frames[1:], copy=False)
                else:  # [wid, credits]
                    credits.extend([wid] * int(frames[1].bytes))
        if frontend in ready:
            while credits:
                try:
                    frames = frontend.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                backend.send_multipart([credits.popleft(), *frames], copy=False)


# ------------------------------------------------------------------ workers


def worker_main(backend: str, credits: int = WORKER_CREDITS) -> None:
    """Announce ``credits``, then answer tasks one at a time until SIGTERM."""
    flag = _StopFlag()
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    try:
        sock.connect(backend)
        sock.send(str(credits).encode())
        while not flag.stopped:
            if not sock.poll(POLL_MS):
                continue
            while True:  # answer everything that waits before polling again
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                sock.send_multipart([frames[0], _reply(frames[1].bytes, frames[2:])], copy=False)
    finally:
        sock.close()
        ctx.term()


def _reply(body: bytes, payload: list) -> bytes:
    rid, op = body[:RID_BYTES], body[RID_BYTES:]
    if op == SUM:
        return rid + struct.pack("<d", float(np.frombuffer(payload[0].buffer, dtype=np.float64).sum()))
    return rid


def sim_workers_main(backend: str, count: int) -> None:
    """``count`` workers with one credit each, in one process, answering at once: broker cost at scale."""
    flag = _StopFlag()
    ctx = zmq.Context()
    socks = [_socket(ctx, zmq.DEALER) for _ in range(count)]
    poller = zmq.Poller()
    try:
        for sock in socks:
            sock.connect(backend)
            sock.send(b"1")
            poller.register(sock, zmq.POLLIN)
        while not flag.stopped:
            for sock, _ in poller.poll(POLL_MS):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    sock.send_multipart([frames[0], _reply(frames[1].bytes, frames[2:])], copy=False)
    finally:
        for sock in socks:
            sock.close()
        ctx.term()


# ------------------------------------------------------------------ processes


def _context():
    return multiprocessing.get_context("spawn")


def stop_process(proc, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM by PID, wait, then SIGKILL: a benchmark must never leave a process behind.

    ``proc`` is a ``multiprocessing.Process`` or a ``subprocess.Popen``.
    """
    if proc.pid is None:
        return
    popen = isinstance(proc, subprocess.Popen)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if (proc.poll() if popen else proc.exitcode) is not None:
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        if popen:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        else:
            proc.join(timeout_s)


@dataclass
class BaselineCluster:
    """A running baseline broker and its workers; ``close()`` ends every process it started."""

    frontend: str
    backend: str
    broker: object
    workers: list = field(default_factory=list)

    @property
    def broker_pid(self) -> int:
        return self.broker.pid

    def add_sim_workers(self, count: int) -> None:
        """Attach ``count`` simulated one-credit workers, all in one extra process."""
        proc = _context().Process(target=sim_workers_main, args=(self.backend, count), daemon=True)
        proc.start()
        self.workers.append(proc)

    def close(self) -> None:
        for proc in [*self.workers, self.broker]:
            stop_process(proc)

    def __enter__(self) -> "BaselineCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_cluster(workers: int = 2, credits: int = WORKER_CREDITS, host: str = "127.0.0.1") -> BaselineCluster:
    """Start the broker and ``workers`` worker processes; raises if the broker does not report in time."""
    mp = _context()
    parent, child = mp.Pipe(duplex=False)
    broker = mp.Process(target=broker_main, args=(child, host), daemon=True)
    broker.start()
    child.close()
    cluster = BaselineCluster("", "", broker)
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise RuntimeError(f"baseline broker did not report its endpoints within {START_TIMEOUT_S} s")
        try:
            endpoints = parent.recv()
        except EOFError:
            raise RuntimeError(f"baseline broker exited before reporting its endpoints (exit code {broker.exitcode})") from None
        cluster.frontend, cluster.backend = endpoints["frontend"], endpoints["backend"]
        for _ in range(workers):
            proc = mp.Process(target=worker_main, args=(cluster.backend, credits), daemon=True)
            proc.start()
            cluster.workers.append(proc)
    except BaseException:
        cluster.close()
        raise
    finally:
        parent.close()
    return cluster


# ------------------------------------------------------------------ client


class BaselineClient:
    """A DEALER client that keeps up to ``window`` requests in flight."""

    def __init__(self, frontend: str, reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.ctx = zmq.Context()
        self.sock = _socket(self.ctx, zmq.DEALER)
        self.sock.connect(frontend)
        self.reply_timeout_s = reply_timeout_s
        self._next_rid = 0

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> "BaselineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, n: int, window: int, op: bytes = NOOP, payload: tuple = ()) -> tuple[collections.Counter, list]:
        """Send ``n`` tasks, at most ``window`` unanswered; return replies per request id and the results."""
        sock = self.sock
        replies: collections.Counter = collections.Counter()
        results: list = []
        first = self._next_rid
        self._next_rid += n
        sent = received = 0
        while received < n:
            while sent < n and sent - received < window:
                body = (first + sent).to_bytes(RID_BYTES, "little") + op
                if payload:
                    sock.send_multipart([body, *payload], copy=False)
                else:
                    sock.send(body)
                sent += 1
            if not sock.poll(self.reply_timeout_s * 1000):
                raise TimeoutError(f"no reply within {self.reply_timeout_s} s: {received} of {n} answered")
            while True:
                try:
                    reply = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                replies[int.from_bytes(reply[:RID_BYTES], "little") - first] += 1
                results.append(reply[RID_BYTES:])
                received += 1
        return replies, results

    def roundtrip(self, op: bytes = NOOP, payload: tuple = ()) -> bytes:
        _replies, results = self.run(1, 1, op, payload)
        return results[0]


# ------------------------------------------------------------------ measurements


def measure_throughput(client: BaselineClient, n: int, window: int = 1000) -> float:
    """Tasks per second for ``n`` no-op tasks with ``window`` in flight."""
    start = time.perf_counter()
    replies, _ = client.run(n, window)
    elapsed = time.perf_counter() - start
    _check_exactly_once(replies, n)
    return n / elapsed


def measure_latency(client: BaselineClient, n: int) -> dict:
    """Round-trip latency of one no-op task at a time: p50 and p99 in milliseconds."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        client.roundtrip()
        samples.append(time.perf_counter() - start)
    return latency_summary(samples)


def latency_summary(samples_s: list) -> dict:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(samples_s)}


def measure_payload(client: BaselineClient, array: np.ndarray, count: int, window: int = 1) -> float:
    """MB/s moving ``array`` ``count`` times to a worker that sums it (10^6 bytes per MB)."""
    expected = float(array.sum())
    start = time.perf_counter()
    replies, results = client.run(count, window, SUM, (memoryview(array),))
    elapsed = time.perf_counter() - start
    _check_exactly_once(replies, count)
    for result in results:
        if struct.unpack("<d", result)[0] != expected:
            raise RuntimeError(f"baseline sum returned {struct.unpack('<d', result)[0]}, expected {expected}")
    return array.nbytes * count / elapsed / 1e6


def payload_array(nbytes: int) -> np.ndarray:
    """A float64 array of ``nbytes`` whose sum is exact (small integers), so any bench can check it."""
    return (np.arange(nbytes // 8, dtype=np.int64) % 7).astype(np.float64)


def _check_exactly_once(replies: collections.Counter, n: int) -> None:
    if len(replies) != n or any(count != 1 for count in replies.values()) or set(replies) != set(range(n)):
        raise RuntimeError(f"baseline lost or duplicated replies: {len(replies)} distinct of {n}")


# ------------------------------------------------------------------ command line


def main(argv=None) -> int:
    """Run the baseline's three measurements once and print them as JSON (the full report is scripts/bench)."""
    p = argparse.ArgumentParser(prog="python -m scripts.benchmarks.baseline", description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=10_000, help="no-op tasks for the throughput run")
    p.add_argument("--latency-n", type=int, default=500, help="round trips for the latency run")
    args = p.parse_args(argv)
    with start_cluster() as cluster, BaselineClient(cluster.frontend) as client:
        measure_throughput(client, 200)  # warm-up: both workers joined, the connection is up
        out = {
            "throughput_tps": measure_throughput(client, args.n),
            "latency": measure_latency(client, args.latency_n),
            "payload_64MiB_MBps": measure_payload(client, payload_array(64 << 20), 2),
            "payload_1MiB_MBps": measure_payload(client, payload_array(1 << 20), 64, window=8),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
