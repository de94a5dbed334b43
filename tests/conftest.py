"""Shared fixtures: real broker and worker processes on free loopback ports, ended by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

ROOT = Path(__file__).resolve().parent.parent
#: heartbeat used by process tests: fast enough to keep tests short, slow enough
#: that a loaded 2-core CI machine does not declare busy workers dead
TEST_HEARTBEAT_S = 0.2
TEST_LIVENESS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """Starts gridq processes for one test and kills every one of them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.events = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.broker: subprocess.Popen | None = None
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self._log_index = 0

    def _spawn(self, args: list[str], label: str) -> subprocess.Popen:
        self._log_index += 1
        log = open(self.tmp_path / f"{self._log_index:02d}-{label}.log", "wb")
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.tmp_path)
        log.close()
        self.procs.append(proc)
        return proc

    def start_broker(self, *extra: str, heartbeat: float = TEST_HEARTBEAT_S, liveness: int = TEST_LIVENESS) -> subprocess.Popen:
        self.broker = self._spawn(["-m", "broker", "--frontend", self.frontend, "--backend", self.backend,
                                   "--events", self.events, "--heartbeat", str(heartbeat), "--liveness", str(liveness),
                                   *extra], "broker")
        return self.broker

    def start_worker(self, *extra: str, heartbeat: float = TEST_HEARTBEAT_S, liveness: int = TEST_LIVENESS) -> subprocess.Popen:
        return self._spawn(["-m", "worker", "--broker", self.backend, "--heartbeat", str(heartbeat),
                            "--liveness", str(liveness), *extra], "worker")

    def client(self, **kwargs):
        from client import Client

        kwargs.setdefault("timeout", 2.0)
        return Client(self.frontend, **kwargs)

    def wait_workers(self, n: int, timeout: float = 15.0) -> dict:
        """Wait until ``n`` workers are live; returns the status snapshot."""
        with self.client() as c:
            return wait_until(lambda: (s := c.status()) and len(s["workers"]) >= n and s, timeout,
                              interval=0.05, what=f"{n} workers")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.tmp_path.glob("*.log")))

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def cluster(tmp_path, request):
    c = Cluster(tmp_path)
    yield c
    c.close()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(c.logs()[-20000:])


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


class EventLog:
    """Subscribes to a broker's events on a thread and keeps every (topic, fields)."""

    def __init__(self, address: str, topics: tuple[str, ...] = ("",)) -> None:
        self.events: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.linger = 0
        self._sock.rcvhwm = 0
        for t in topics:
            self._sock.setsockopt_string(zmq.SUBSCRIBE, t)
        self._sock.connect(address)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(50):
                while True:
                    try:
                        topic, body = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    with self._lock:
                        self.events.append((topic.decode(), msgpack.unpackb(body, strict_map_key=False)))
        self._sock.close(linger=0)

    def of(self, topic: str) -> list[dict]:
        with self._lock:
            return [f for t, f in self.events if t == topic]

    def wait_for(self, topic: str, predicate=lambda f: True, timeout: float = 10.0) -> dict:
        return wait_until(lambda: next((f for f in self.of(topic) if predicate(f)), None), timeout, what=f"event {topic}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def events(cluster):
    """Factory: ``events()`` subscribes to the cluster's events (call before submitting)."""
    logs = []

    def make(*topics: str) -> EventLog:
        log = EventLog(cluster.events, (*(topics or ("",)), "broker.stats"))
        logs.append(log)
        # a SUB connects asynchronously: broker.stats (once a second) proves the subscription is live
        wait_until(lambda: log.of("broker.stats"), 10, what="first broker.stats event")
        return log

    yield make
    for log in logs:
        log.close()
