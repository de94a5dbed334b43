"""gridq started as users start it: ``python -m broker``, ``python -m worker``, ``from client import Client``;
and simulated one-slot workers that answer at once, for runs where the broker is the bottleneck."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq

from broker.protocol import WORKER_TAG, Command, DoneRecord, Message, ProtocolError, decode, encode, records
from client import BrokerUnavailable, Client
from scripts.benchmarks.baseline import stop_process
from scripts.benchmarks.common import JOIN_TIMEOUT_S, ROOT, STOP_TIMEOUT_S


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
                proc = mp_context().Process(target=sim_workers_main, args=(self.backend, self.sim_workers), daemon=True)
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


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def mp_context():
    import multiprocessing

    return multiprocessing.get_context("spawn")


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
                        batch = records(msg)
                    except ProtocolError:
                        continue
                    if msg.command is Command.TASKS:
                        log = [DoneRecord(rec.task_id, True, none_blob, 0, 0.0) for rec, _frames in batch]
                        sock.send_multipart(encode(WORKER_TAG, Message(Command.DONE, {"log": log})))
                    elif msg.command is Command.HEARTBEAT:
                        sock.send_multipart(heartbeat)
                    elif msg.command is Command.DISCONNECT:
                        sock.send_multipart(ready(index[sock]))
    finally:
        for sock in socks:
            sock.close()
        ctx.term()
