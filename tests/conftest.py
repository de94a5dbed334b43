"""Shared fixtures: real broker and worker processes on loopback ports they bind themselves, ended by PID."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq

from broker.protocol import read_events
from tests.harness import BrokerPeers, wait_until  # noqa: F401 (wait_until: test modules import it from here)

ROOT = Path(__file__).resolve().parent.parent
#: heartbeat used by process tests: fast enough to keep tests short, slow enough
#: that a loaded 2-core CI machine does not declare busy workers dead
TEST_HEARTBEAT_S = 0.2
TEST_LIVENESS = 5


#: what a broker binds when a test has no endpoint for it yet: the kernel picks the port
ANY_PORT = "tcp://127.0.0.1:*"
#: the broker's log line with the endpoints it bound (broker/server.py logs them on start)
_STARTED = re.compile(r".*\bbroker_started\b.*")
#: one endpoint in that line, as the console (key=value) or the JSON (--log-format json) renderer writes it
_ENDPOINT = re.compile(r"\b(frontend|backend|events)\"?[=:] ?\"?(tcp://[^\s\",]+)")


@contextlib.contextmanager
def silent_endpoints(count: int = 1):
    """Endpoints where something is bound and never answers: a broker that is down, as a client
    sees it, without naming a port nobody holds (someone else could take it meanwhile)."""
    ctx = zmq.Context.instance()
    socks = []
    try:
        for _ in range(count):
            sock = ctx.socket(zmq.ROUTER)
            sock.linger = 0
            sock.bind(ANY_PORT)
            socks.append(sock)
        yield [sock.getsockopt_string(zmq.LAST_ENDPOINT) for sock in socks]
    finally:
        for sock in socks:
            sock.close(linger=0)


class Cluster(BrokerPeers):
    """Starts gridq processes for one test and kills every one of them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        #: the broker's endpoints: bound on ports of its choosing by the first broker, kept for restarts
        self.frontend: str | None = None
        self.backend: str | None = None
        self.events: str | None = None
        self.procs: list[subprocess.Popen] = []
        self.broker: subprocess.Popen | None = None
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self._log_index = 0

    def _spawn(self, args: list[str], label: str) -> subprocess.Popen:
        self._log_index += 1
        path = self.tmp_path / f"{self._log_index:02d}-{label}.log"
        log = open(path, "wb")
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.tmp_path)
        log.close()
        proc.log_path = path
        self.procs.append(proc)
        return proc

    def start_broker(self, *extra: str, heartbeat: float = TEST_HEARTBEAT_S, liveness: int = TEST_LIVENESS) -> subprocess.Popen:
        """Start a broker and wait until it has bound its sockets (or exited). The first one binds
        ports of its choosing and the endpoints are read back from its log; a restarted one binds
        the same endpoints, so that clients and workers find it again."""
        self.broker = self._spawn(["-m", "broker", "--frontend", self.frontend or ANY_PORT,
                                   "--backend", self.backend or ANY_PORT, "--events", self.events or ANY_PORT,
                                   "--heartbeat", str(heartbeat), "--liveness", str(liveness), *extra], "broker")
        started = wait_until(lambda: self._started(self.broker), 30, what="the broker to bind its endpoints or exit")
        if started is not True:
            bound = dict(_ENDPOINT.findall(started))
            self.frontend, self.backend, self.events = bound["frontend"], bound["backend"], bound["events"]
        return self.broker

    @staticmethod
    def _started(proc: subprocess.Popen):
        """The broker's broker_started log line once written; True if it exited without one."""
        match = _STARTED.search(proc.log_path.read_text(errors="replace"))
        if match is not None:
            return match.group(0)
        return proc.poll() is not None

    def start_worker(self, *extra: str, heartbeat: float = TEST_HEARTBEAT_S, liveness: int = TEST_LIVENESS) -> subprocess.Popen:
        return self._spawn(["-m", "worker", "--broker", self.backend, "--heartbeat", str(heartbeat),
                            "--liveness", str(liveness), *extra], "worker")

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


@pytest.fixture
def local():
    """A broker on a thread of this process (see tests/harness.py LocalCluster); add workers with
    ``local.start_worker()``. For tests that kill nothing."""
    from tests.harness import LocalCluster

    c = LocalCluster(no_worker_timeout_s=1.5)
    yield c
    c.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


class EventLog:
    """Subscribes to a broker's events on a thread and keeps every (topic, fields)."""

    def __init__(self, address: str, topics: tuple[str, ...] = ("",)) -> None:
        self.events: list[tuple[str, dict]] = []
        self.messages = 0  #: messages received (one may carry several events of one topic)
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
                    with self._lock:  # one message may carry several events of its topic
                        self.messages += 1
                        self.events.extend((topic.decode(), fields) for fields in read_events(body))
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
def events(request):
    """Factory: ``events()`` subscribes to the events of the test's broker, ``local`` where the test
    uses one, else ``cluster`` (call before submitting)."""
    logs = []

    def make(*topics: str) -> EventLog:
        broker = request.getfixturevalue("local" if "local" in request.fixturenames else "cluster")
        log = EventLog(broker.events, (*(topics or ("",)), "broker.stats"))
        logs.append(log)
        # a SUB connects asynchronously: broker.stats (once a second) proves the subscription is live
        wait_until(lambda: log.of("broker.stats"), 10, what="first broker.stats event")
        return log

    yield make
    for log in logs:
        log.close()
