"""What the benchmark times through gridq's public client, and the samplers it times with."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
import zmq

from broker.protocol import ProtocolError, read_events
from broker.shared import recv_pair, skip_rest
from scripts.benchmarks import baseline
from scripts.benchmarks.common import MIB, RESULT_TIMEOUT_S

#: how often the RSS sampler looks at the broker, in seconds
RSS_SAMPLE_S = 0.005


class RssSampler:
    """Samples a process's RSS from a thread; ``peak_mib`` after the ``with`` block."""

    def __init__(self, pid: int) -> None:
        import psutil  # here, not at the top: the GPU machine has no psutil, and the GPU section imports us

        self.proc = psutil.Process(pid)
        self._gone = psutil.Error  #: what memory_info raises once the process is gone
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except self._gone:
                return
            self._stop.wait(RSS_SAMPLE_S)

    def __enter__(self) -> "RssSampler":
        self.peak = self.start = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5.0)

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / MIB


class EventSubscriber:
    """One SUB socket on the events endpoint, subscribed to everything, drained in a process of its own.

    A subscriber is another program (gridq-status, the web gateway): run here as a
    thread of the benchmark's process it would take the GIL from the client's I/O
    thread, charging the client for the subscriber's own decoding. ``received`` and
    ``seq_gaps`` are read from shared counters.
    """

    def __init__(self, endpoint: str) -> None:
        from scripts.benchmarks.cluster import mp_context

        ctx = mp_context()
        self.endpoint = endpoint
        self._counts = ctx.RawArray("q", 2)  #: events received, seq gaps seen (written by the child only)
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_subscribe, args=(endpoint, self._counts, self._stop), name="event-subscriber",
                                 daemon=True)

    @property
    def received(self) -> int:
        return self._counts[0]

    @property
    def seq_gaps(self) -> int:
        return self._counts[1]

    def settle(self, quiet_s: float = 0.2, limit_s: float = 5.0) -> int:
        """Wait until nothing new arrived for ``quiet_s`` (at most ``limit_s``); the count received."""
        deadline = time.monotonic() + limit_s
        last = -1
        while self.received != last and time.monotonic() < deadline:
            last = self.received
            time.sleep(quiet_s)
        return self.received

    def __enter__(self) -> "EventSubscriber":
        self._proc.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._proc.join(5.0)
        if self._proc.exitcode is None:
            baseline.stop_process(self._proc)


def _subscribe(endpoint: str, counts, stop) -> None:
    """The subscriber process: count events and seq gaps until ``stop`` is set."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 0  # the cost measured is the broker's; never drop on our side
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    received = gaps = 0
    last_seq = None
    try:
        while not stop.is_set():
            if not sub.poll(50):
                continue
            while True:
                try:
                    _topic, body = recv_pair(sub)  # as client/state.py reads: two plain receives
                except zmq.Again:
                    break
                try:
                    events = read_events(body)  # one message may carry several events, of consecutive seqs
                except ProtocolError:  # not two frames: not ours to judge here; realign
                    skip_rest(sub)
                    gaps += 1
                    continue
                first, last = events[0].get("seq"), events[-1].get("seq")
                if not (isinstance(first, int) and isinstance(last, int) and last - first == len(events) - 1):
                    gaps += 1  # a message whose seqs are not consecutive
                elif last_seq is not None and first != last_seq + 1:
                    gaps += 1
                last_seq = last
                received += len(events)
            counts[0], counts[1] = received, gaps  # once per drain: shared memory writes cost
    finally:
        sub.close()
        ctx.term()


def gridq_throughput(client, n: int) -> float:
    start = time.perf_counter()
    results = client.map("noop", range(n))
    elapsed = time.perf_counter() - start
    if len(results) != n or any(r is not None for r in results):
        raise RuntimeError(f"gridq map returned {len(results)} results, expected {n} Nones")
    return n / elapsed


def gridq_latency(client, n: int) -> dict:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        client.submit("noop").result(timeout=10)
        samples.append(time.perf_counter() - start)
    return baseline.latency_summary(samples)


def gridq_payload(client, array: np.ndarray, count: int, window: int) -> float:
    expected = float(array.sum())
    pending: collections.deque = collections.deque()
    results = []
    start = time.perf_counter()
    for _ in range(count):
        if len(pending) >= window:
            results.append(pending.popleft().result(timeout=RESULT_TIMEOUT_S))
        pending.append(client.submit("sum", array))
    while pending:
        results.append(pending.popleft().result(timeout=RESULT_TIMEOUT_S))
    elapsed = time.perf_counter() - start
    if any(r != expected for r in results):
        raise RuntimeError(f"gridq sum returned {set(results)}, expected {expected}")
    return array.nbytes * count / elapsed / 1e6


def gridq_events_throughput(cluster, n: int) -> dict:
    """Throughput with one subscriber to everything; waits until it hears events before timing."""
    with EventSubscriber(cluster.events) as sub:
        deadline = time.monotonic() + 10.0
        while sub.received == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("event subscriber heard nothing within 10 s")
            cluster.client.map("noop", range(1))
        before = sub.settle()
        tps = gridq_throughput(cluster.client, n)
        heard = sub.settle() - before  # after the timing: the subscriber may lag the broker
    return {"tps": tps, "events_during_run": heard, "seq_gaps": sub.seq_gaps}
