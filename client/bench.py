"""scripts/bench: gridq measured against a plain pyzmq load-balancing broker, through public interfaces only.

gridq runs as users run it (``python -m broker``, ``python -m worker``,
``from client import Client``); the yardstick is client/bench_baseline.py. Both
run on tcp://127.0.0.1 free ports, alternating, several repetitions; the report
gives medians and gridq/baseline ratios, and the raw samples go to JSON.

Measured: no-op throughput with a pipelined client, one-at-a-time round-trip
latency, payload bandwidth (64 MiB and 1 MiB float64 arrays in, a float out)
with the broker's peak RSS, and what gridq's features cost: journal on vs off,
one event subscriber vs none, 200 connected workers vs 2.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import zmq

from broker.logs import configure_logging
from broker.protocol import WORKER_TAG, Command, Message, ProtocolError, decode, encode
from client import BrokerUnavailable, Client, bench_baseline
from client.bench_baseline import BaselineClient, stop_process

#: repository root: where ``python -m broker`` and ``python -m worker`` are run from
ROOT = Path(__file__).resolve().parents[1]
#: longest wait for any single result, in seconds
RESULT_TIMEOUT_S = 60.0
#: longest wait for a started cluster to show all its workers, in seconds
JOIN_TIMEOUT_S = 30.0
#: how long a stopping gridq process gets after SIGTERM before SIGKILL, in seconds
STOP_TIMEOUT_S = 10.0
#: how often the RSS sampler looks at the broker, in seconds
RSS_SAMPLE_S = 0.005
#: in-flight window of the baseline's pipelined client for the no-op runs
THROUGHPUT_WINDOW = 256
#: in-flight window of both systems for the 1 MiB payload runs
SMALL_PAYLOAD_WINDOW = 8

MIB = 1 << 20


@dataclass
class BenchConfig:
    reps: int = 3
    n: int = 10_000  #: no-op tasks per throughput run
    latency_n: int = 500  #: round trips per latency run
    big_payload_bytes: int = 64 * MIB
    big_payload_count: int = 3
    small_payload_bytes: int = MIB
    small_payload_count: int = 64
    scale_workers: int = 200
    quick: bool = False

    @classmethod
    def quick_config(cls) -> "BenchConfig":
        return cls(reps=1, n=5000, latency_n=200, big_payload_count=1, small_payload_count=16, quick=True)


# ======================================================================== processes


def free_ports(count: int) -> list[int]:
    """Ports the kernel calls free now (held together so they differ), for flags that need a number."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class GridqCluster:
    """A gridq broker and its workers started as subprocesses; ``close()`` ends them all by PID."""

    logdir: Path
    journal: str | None = None
    workers: int = 2
    worker_args: list = field(default_factory=lambda: ["--slots", "1"])
    sim_workers: int = 0
    procs: list = field(default_factory=list)  #: (label, Popen) in start order
    mp_procs: list = field(default_factory=list)
    client: object = None
    frontend: str = ""
    backend: str = ""
    events: str = ""
    broker_pid: int = 0

    def start(self) -> "GridqCluster":
        try:
            port_front, port_back, port_events = free_ports(3)
            self.frontend = f"tcp://127.0.0.1:{port_front}"
            self.backend = f"tcp://127.0.0.1:{port_back}"
            self.events = f"tcp://127.0.0.1:{port_events}"
            cmd = [sys.executable, "-m", "broker", "--frontend", self.frontend, "--backend", self.backend,
                   "--events", self.events]
            if self.journal:
                cmd += ["--journal", self.journal]
            broker = self._spawn("broker", cmd)
            self.broker_pid = broker.pid
            for i in range(self.workers):
                self._spawn(f"worker-{i}", [sys.executable, "-m", "worker", "--broker", self.backend, *self.worker_args])
            if self.sim_workers:
                proc = _mp().Process(target=sim_workers_main, args=(self.backend, self.sim_workers), daemon=True)
                proc.start()
                self.mp_procs.append(proc)
            self.client = Client(self.frontend)
            self._wait_for_workers(self.workers + self.sim_workers)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, label: str, cmd: list) -> subprocess.Popen:
        log = open(self.logdir / f"{label}.log", "wb")
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.procs.append((label, proc))
        return proc

    def _wait_for_workers(self, expected: int) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        seen = -1
        while time.monotonic() < deadline:
            for label, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"gridq {label} exited with {proc.returncode}: {self.log_tail(label)}")
            try:
                seen = len(self.client.status()["workers"])
            except BrokerUnavailable as exc:  # while the broker starts; retried until the deadline
                seen = f"no status ({type(exc).__name__}: {exc})"
            if seen == expected:
                return
            time.sleep(0.05)
        raise RuntimeError(f"gridq cluster: {seen} workers after {JOIN_TIMEOUT_S} s, expected {expected}; "
                           f"broker log: {self.log_tail('broker')}")

    def log_tail(self, label: str, nbytes: int = 2000) -> str:
        try:
            return (self.logdir / f"{label}.log").read_bytes()[-nbytes:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        for proc in self.mp_procs:
            stop_process(proc)
        for _label, proc in reversed(self.procs):  # workers first: they hand back and say goodbye
            stop_process(proc, STOP_TIMEOUT_S)

    def __enter__(self) -> "GridqCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _mp():
    import multiprocessing

    return multiprocessing.get_context("spawn")


# ======================================================================== simulated workers


def sim_workers_main(backend: str, count: int) -> None:
    """``count`` gridq workers of one slot in one process: they announce ``noop`` and answer at once.

    They speak the worker side of broker/protocol.py: READY on join (and again
    when the broker says it does not know them), DONE with a None result for
    every task of a TASKS batch, HEARTBEAT for HEARTBEAT.
    """
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.append(True))
    none_blob = msgpack.packb(None)
    ctx = zmq.Context()
    socks = []
    poller = zmq.Poller()
    pid = os.getpid()

    def ready(i: int) -> list:
        return encode(WORKER_TAG, Message(Command.READY, {"name": f"sim-{pid}-{i}", "slots": 1, "resources": {"cpu": 1},
                                                          "tasks": {"noop": {"cpu": 1}}}))

    heartbeat = encode(WORKER_TAG, Message(Command.HEARTBEAT, {}))
    try:
        for i in range(count):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(backend)
            sock.send_multipart(ready(i))
            poller.register(sock, zmq.POLLIN)
            socks.append(sock)
        index = {sock: i for i, sock in enumerate(socks)}
        while not stopped:
            for sock, _ in poller.poll(100):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        msg = decode(frames, WORKER_TAG)
                    except ProtocolError:
                        continue
                    if msg.command is Command.TASKS:
                        results = [[rec[0], True, none_blob, 0, 0.0] for rec in msg.header["tasks"]]
                        sock.send_multipart(encode(WORKER_TAG, Message(Command.DONE, {"results": results})))
                    elif msg.command is Command.HEARTBEAT:
                        sock.send_multipart(heartbeat)
                    elif msg.command is Command.DISCONNECT:
                        sock.send_multipart(ready(index[sock]))
    finally:
        for sock in socks:
            sock.close()
        ctx.term()


# ======================================================================== measurement helpers


class RssSampler:
    """Samples a process's RSS from a thread; ``peak_mib`` after the ``with`` block."""

    def __init__(self, pid: int) -> None:
        import psutil  # here, not at the top: the GPU machine has no psutil, and bench_gpu imports this module

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
    """One SUB socket on the events endpoint, subscribed to everything, drained by a thread."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.received = 0
        self.seq_gaps = 0
        self._last_seq = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-subscriber", daemon=True)

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = 0  # the cost measured is the broker's; never drop on our side
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                if not sub.poll(50):
                    continue
                while True:
                    try:
                        _topic, body = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:  # not two frames: not ours to judge here
                        continue
                    self.received += 1
                    seq = msgpack.unpackb(body).get("seq")
                    if self._last_seq is not None and isinstance(seq, int) and seq != self._last_seq + 1:
                        self.seq_gaps += 1
                    self._last_seq = seq
        finally:
            sub.close()

    def settle(self, quiet_s: float = 0.2, limit_s: float = 5.0) -> int:
        """Wait until nothing new arrived for ``quiet_s`` (at most ``limit_s``); the count received."""
        deadline = time.monotonic() + limit_s
        last = -1
        while self.received != last and time.monotonic() < deadline:
            last = self.received
            time.sleep(quiet_s)
        return self.received

    def __enter__(self) -> "EventSubscriber":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5.0)


def _median(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ======================================================================== gridq measurements


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
    return bench_baseline.latency_summary(samples)


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


def gridq_events_throughput(cluster: GridqCluster, n: int) -> dict:
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


# ======================================================================== dask (optional)


def _dask_available() -> bool:
    return importlib.util.find_spec("distributed") is not None


def _dask_noop(*_args):
    return None


def _dask_sum(a):
    return float(np.sum(a))


def dask_run(cfg: BenchConfig) -> dict:
    """The same measurements on a 2-process dask LocalCluster (only where ``distributed`` is installed)."""
    from distributed import Client as DaskClient, LocalCluster

    n = min(cfg.n, 500) if cfg.quick else cfg.n  # dask is ~100x slower per task; keep --quick quick
    out: dict = collections.defaultdict(list)
    big = bench_baseline.payload_array(cfg.big_payload_bytes)
    small = bench_baseline.payload_array(cfg.small_payload_bytes)
    with warnings.catch_warnings(), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            DaskClient(lc) as dc:
        warnings.simplefilter("ignore")  # dask warns that a 64 MiB argument is large: here that is the point
        dc.gather(dc.map(_dask_noop, range(200), pure=False))
        for _ in range(cfg.reps):
            start = time.perf_counter()
            dc.gather(dc.map(_dask_noop, range(n), pure=False))
            out["throughput_tps"].append(n / (time.perf_counter() - start))
            samples = []
            for _ in range(cfg.latency_n):
                t0 = time.perf_counter()
                dc.submit(_dask_noop, pure=False).result(timeout=10)
                samples.append(time.perf_counter() - t0)
            lat = bench_baseline.latency_summary(samples)
            out["latency_p50_ms"].append(lat["p50_ms"])
            out["latency_p99_ms"].append(lat["p99_ms"])
            start = time.perf_counter()
            for _ in range(cfg.big_payload_count):
                dc.submit(_dask_sum, big, pure=False).result(timeout=RESULT_TIMEOUT_S)
            out["payload_big_MBps"].append(big.nbytes * cfg.big_payload_count / (time.perf_counter() - start) / 1e6)
            start = time.perf_counter()
            dc.gather([dc.submit(_dask_sum, small, pure=False) for _ in range(cfg.small_payload_count)])
            out["payload_small_MBps"].append(
                small.nbytes * cfg.small_payload_count / (time.perf_counter() - start) / 1e6)
    return dict(out)


# ======================================================================== the run


#: (key, label, unit, better) of the report rows; better is "higher" or "lower". A row's samples are
#: runs[system][key], except where GRIDQ_SAME_AS says gridq's come from another row.
ROWS = [
    ("throughput_tps", "no-op throughput, 2 workers", "tasks/s", "higher"),
    ("throughput_1credit_tps", "  vs baseline at 1 credit/worker", "tasks/s", "higher"),
    ("latency_p50_ms", "round trip p50", "ms", "lower"),
    ("latency_p99_ms", "round trip p99", "ms", "lower"),
    ("payload_big_MBps", "payload 64 MiB -> sum", "MB/s", "higher"),
    ("payload_small_MBps", "payload 1 MiB -> sum, window 8", "MB/s", "higher"),
    ("broker_peak_rss_MiB", "broker peak RSS during payload", "MiB", "lower"),
    ("broker_rss_growth_MiB", "  of which growth during payload", "MiB", "lower"),
    ("throughput_events_tps", "throughput, 1 event subscriber", "tasks/s", "higher"),
    ("throughput_journal_tps", "throughput, journal on", "tasks/s", "higher"),
    ("scale_throughput_tps", "throughput, {scale} sim workers", "tasks/s", "higher"),
    ("scale_throughput_events_tps", "  with 1 event subscriber", "tasks/s", "higher"),
    ("scale_throughput_journal_tps", "  with journal on", "tasks/s", "higher"),
]

#: (key, numerator, denominator, label) of gridq's throughput against itself
COSTS = [
    ("journal_on_over_off", "throughput_journal_tps", "throughput_tps", "journal on / off, 2 workers"),
    ("events_sub_over_none", "throughput_events_tps", "throughput_tps", "1 event subscriber / none, 2 workers"),
    ("scale_journal_on_over_off", "scale_throughput_journal_tps", "scale_throughput_tps",
     "journal on / off, {scale} sim workers"),
    ("scale_events_sub_over_none", "scale_throughput_events_tps", "scale_throughput_tps",
     "1 event subscriber / none, {scale} sim workers"),
    ("scale_over_2_workers", "scale_throughput_tps", "throughput_tps", "{scale} sim workers / 2 real workers"),
]

#: rows whose gridq samples are another row's: gridq has one configuration, compared with two baselines
GRIDQ_SAME_AS = {"throughput_1credit_tps": "throughput_tps"}


def _baseline_rep(cluster, client: BaselineClient, client1: BaselineClient, cfg: BenchConfig, arrays: dict,
                  out: dict) -> None:
    out["throughput_tps"].append(bench_baseline.measure_throughput(client, cfg.n, THROUGHPUT_WINDOW))
    out["throughput_1credit_tps"].append(bench_baseline.measure_throughput(client1, cfg.n, THROUGHPUT_WINDOW))
    lat = bench_baseline.measure_latency(client, cfg.latency_n)
    out["latency_p50_ms"].append(lat["p50_ms"])
    out["latency_p99_ms"].append(lat["p99_ms"])
    with RssSampler(cluster.broker_pid) as rss:
        out["payload_big_MBps"].append(bench_baseline.measure_payload(
            client, arrays["big"], cfg.big_payload_count, window=1))
        out["payload_small_MBps"].append(bench_baseline.measure_payload(
            client, arrays["small"], cfg.small_payload_count, window=SMALL_PAYLOAD_WINDOW))
    out["broker_peak_rss_MiB"].append(rss.peak_mib)
    out["broker_rss_growth_MiB"].append(rss.growth_mib)


def _gridq_rep(cluster: GridqCluster, journal: GridqCluster | None, cfg: BenchConfig, arrays: dict, out: dict) -> None:
    c = cluster.client
    out["throughput_tps"].append(gridq_throughput(c, cfg.n))
    lat = gridq_latency(c, cfg.latency_n)
    out["latency_p50_ms"].append(lat["p50_ms"])
    out["latency_p99_ms"].append(lat["p99_ms"])
    with RssSampler(cluster.broker_pid) as rss:
        out["payload_big_MBps"].append(gridq_payload(c, arrays["big"], cfg.big_payload_count, window=1))
        out["payload_small_MBps"].append(gridq_payload(c, arrays["small"], cfg.small_payload_count,
                                                       window=SMALL_PAYLOAD_WINDOW))
    out["broker_peak_rss_MiB"].append(rss.peak_mib)
    out["broker_rss_growth_MiB"].append(rss.growth_mib)
    ev = gridq_events_throughput(cluster, cfg.n)
    out["throughput_events_tps"].append(ev["tps"])
    out["events_during_run"].append(ev["events_during_run"])
    out["events_seq_gaps"].append(ev["seq_gaps"])
    if journal is not None:
        out["throughput_journal_tps"].append(gridq_throughput(journal.client, cfg.n))


def _gridq_scale_rep(cluster: GridqCluster, journal: GridqCluster | None, cfg: BenchConfig, out: dict) -> None:
    out["scale_throughput_tps"].append(gridq_throughput(cluster.client, cfg.n))
    ev = gridq_events_throughput(cluster, cfg.n)
    out["scale_throughput_events_tps"].append(ev["tps"])
    out["scale_events_during_run"].append(ev["events_during_run"])
    out["scale_events_seq_gaps"].append(ev["seq_gaps"])
    if journal is not None:
        out["scale_throughput_journal_tps"].append(gridq_throughput(journal.client, cfg.n))


def run(cfg: BenchConfig) -> dict:
    runs = {"baseline": collections.defaultdict(list), "gridq": collections.defaultdict(list)}
    arrays = {"big": bench_baseline.payload_array(cfg.big_payload_bytes),
              "small": bench_baseline.payload_array(cfg.small_payload_bytes)}
    errors: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gridq-bench-") as tmp:
        tmpdir = Path(tmp)
        # Phase 1: both systems with 2 real workers, plus a journaled gridq, measured in alternation.
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(bench_baseline.start_cluster(workers=2))
            base_client = stack.enter_context(BaselineClient(base.frontend))
            # a baseline that never sends a worker more than it runs: what prefetching is worth on its own
            base1 = stack.enter_context(bench_baseline.start_cluster(workers=2, credits=1))
            base1_client = stack.enter_context(BaselineClient(base1.frontend))
            gridq = stack.enter_context(GridqCluster(_mkdir(tmpdir / "plain")).start())
            journal = None
            try:
                journal = stack.enter_context(GridqCluster(
                    _mkdir(tmpdir / "journal"), journal=str(tmpdir / "journal" / "journal.sqlite")).start())
            except RuntimeError as exc:  # report the rest even where the journal cannot start
                errors["journal"] = str(exc)
            bench_baseline.measure_throughput(base_client, 200)  # warm-up: connections up, code paths hot
            bench_baseline.measure_throughput(base1_client, 200)
            gridq_throughput(gridq.client, 200)
            if journal is not None:
                gridq_throughput(journal.client, 200)
            for rep in range(cfg.reps):
                order = [lambda: _baseline_rep(base, base_client, base1_client, cfg, arrays, runs["baseline"]),
                         lambda: _gridq_rep(gridq, journal, cfg, arrays, runs["gridq"])]
                for fn in order if rep % 2 == 0 else reversed(order):
                    fn()
        # Phase 2: scale, both brokers with many simulated one-slot workers that answer at once, so
        # the broker is the bottleneck and gridq's journal and events costs show undiluted.
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(bench_baseline.start_cluster(workers=0))
            base.add_sim_workers(cfg.scale_workers)
            base_client = stack.enter_context(BaselineClient(base.frontend))
            gridq = stack.enter_context(GridqCluster(_mkdir(tmpdir / "scale"), workers=0,
                                                     sim_workers=cfg.scale_workers).start())
            journal = None
            try:
                journal = stack.enter_context(GridqCluster(
                    _mkdir(tmpdir / "scale-journal"), workers=0, sim_workers=cfg.scale_workers,
                    journal=str(tmpdir / "scale-journal" / "journal.sqlite")).start())
            except RuntimeError as exc:
                errors["scale_journal"] = str(exc)
            bench_baseline.measure_throughput(base_client, 500)
            gridq_throughput(gridq.client, 500)
            if journal is not None:
                gridq_throughput(journal.client, 500)
            for rep in range(cfg.reps):
                order = [lambda: runs["baseline"]["scale_throughput_tps"].append(
                             bench_baseline.measure_throughput(base_client, cfg.n, THROUGHPUT_WINDOW)),
                         lambda: _gridq_scale_rep(gridq, journal, cfg, runs["gridq"])]
                for fn in order if rep % 2 == 0 else reversed(order):
                    fn()
    if _dask_available():
        try:
            runs["dask"] = dask_run(cfg)
        except Exception as exc:  # an optional comparison must not sink the report
            runs["dask"] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"config": vars(cfg), "machine": _machine(), "elapsed_s": time.perf_counter() - started,
            "runs": {k: dict(v) for k, v in runs.items()}, "summary": summarize(runs), "errors": errors}


def summarize(runs: dict) -> dict:
    summary = {}
    for key, _label, _unit, _better in ROWS:
        row = {system: _median(samples.get(GRIDQ_SAME_AS.get(key, key) if system == "gridq" else key, []))
               for system, samples in runs.items() if isinstance(samples, dict)}
        g, b = row.get("gridq"), row.get("baseline")
        row["ratio"] = g / b if g is not None and b else None
        summary[key] = row
    def ratio(num: str, den: str):
        n, d = _median(runs["gridq"].get(num, [])), _median(runs["gridq"].get(den, []))
        return n / d if n and d else None

    summary["gridq_costs"] = {key: ratio(num, den) for key, num, den, _label in COSTS}
    return summary


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "platform": platform.platform()}


def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("tasks/s", "MB/s"):
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def report(result: dict) -> str:
    cfg, summary, m = result["config"], result["summary"], result["machine"]
    has_dask = "dask" in result["runs"] and "error" not in result["runs"]["dask"]
    head = f"{'metric':<40} {'unit':>8} {'gridq':>10} {'baseline':>10} {'gridq/base':>11}"
    if has_dask:
        head += f" {'dask':>10}"
    lines = [f"gridq bench: {cfg['reps']} rep(s), medians; n={cfg['n']:,} no-op tasks, latency n={cfg['latency_n']}; "
             f"{m['cpus']} CPUs, python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}",
             "", head, "-" * len(head)]
    for key, label, unit, better in ROWS:
        row = summary[key]
        ratio = row.get("ratio")
        line = (f"{label.format(scale=cfg['scale_workers']):<40} {unit:>8} {_fmt(row.get('gridq'), unit):>10} "
                f"{_fmt(row.get('baseline'), unit):>10} {(f'{ratio:.2f}' if ratio else '-'):>11}")
        if has_dask:
            line += f" {_fmt(row.get('dask'), unit):>10}"
        lines.append(line)
    costs = summary["gridq_costs"]
    lines += ["", "gridq against itself (throughput ratios):"]
    for key, _num, _den, label in COSTS:
        lines.append(f"  {label.format(scale=cfg['scale_workers']):<46} {(f'{costs[key]:.2f}' if costs[key] else '-')}")
    g = result["runs"]["gridq"]
    gaps = [*g.get("events_seq_gaps", []), *g.get("scale_events_seq_gaps", [])]
    if any(gaps):
        lines.append(f"  WARNING: event seq gaps seen by the subscriber: {gaps}")
    heard = [*g.get("events_during_run", []), *g.get("scale_events_during_run", [])]
    if any(count < 3 * cfg["n"] for count in heard):  # submitted, started, succeeded: at least 3 per task
        lines.append(f"  WARNING: fewer than 3 events per task reached the subscriber: {heard} for {cfg['n']} tasks")
    for what, error in result["errors"].items():
        lines.append(f"  {what} skipped: {error.splitlines()[0][:300]}")
    if "dask" in result["runs"] and "error" in result["runs"]["dask"]:
        lines.append(f"  dask skipped: {result['runs']['dask']['error']}")
    lines.append(f"\nratios are gridq/baseline: above 1 is better for rates, worse for latency and RSS. "
                 f"took {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


class Watchdog:
    """Ends the bench, and every process it started, should a run outlast ``limit_s``: a bench never hangs."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watchdog", daemon=True)

    def _run(self) -> None:
        if self._done.wait(self.limit_s):
            return
        import psutil

        for child in psutil.Process().children(recursive=True):  # ours alone: we started each of them
            try:
                child.kill()
            except psutil.Error:
                pass
        sys.stderr.write(f"scripts/bench: gave up after {self.limit_s:.0f} s (see --timeout); stopped its processes\n")
        sys.stderr.flush()
        os._exit(3)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, smaller runs (about 30 s)")
    p.add_argument("--reps", type=int, help="repetitions of each measurement (default 3, quick 1)")
    p.add_argument("-n", type=int, help="no-op tasks per throughput run (default 10000, quick 5000)")
    p.add_argument("--latency-n", type=int, help="round trips per latency run (default 500, quick 200)")
    p.add_argument("--scale-workers", type=int, help="simulated workers for the scale run (default 200)")
    p.add_argument("--json", default="bench-results.json", metavar="PATH", help="where to write all samples")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up, stopping every process started, after this long (default 120 quick, 900 otherwise)")
    args = p.parse_args(argv)
    configure_logging("console", "warning")  # the client's info lines would drown the report
    cfg = BenchConfig.quick_config() if args.quick else BenchConfig()
    for name in ("reps", "n", "latency_n", "scale_workers"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1")
            setattr(cfg, name, value)
    with Watchdog(args.timeout or (120.0 if cfg.quick else 900.0)):
        result = run(cfg)
    from client import bench_gpu

    if bench_gpu.gpu_available():
        result["gpu"] = bench_gpu.run()
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(bench_gpu.report(result["gpu"]) if "gpu" in result else "GPU part: skipped (no CuPy or no CUDA device here; "
          "scripts/gpu-check runs it on a GPU machine)")
    print(f"samples written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
