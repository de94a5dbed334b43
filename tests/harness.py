"""Test harnesses shared by the test modules: the pure broker core driven with a fake clock
(``Harness``), and a broker with workers on threads of the test process (``LocalCluster``)."""

from __future__ import annotations

import threading
import time

from broker.core import Core
from broker.protocol import Command, Message, event_body, pack_value, read_events


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


def published(runs: list) -> list:
    """``(topic, event map)`` for every event of a flush's runs, as a subscriber reads them: each
    run packed as the broker sends it and read back as ``read_events`` reads it."""
    return [(topic, fields) for topic, events in runs for fields in read_events(event_body(events))]


class BrokerPeers:
    """What a test does with a running broker at ``self.frontend``: clients, and waiting for workers."""

    frontend: str | None = None

    def client(self, **kwargs):
        from client import Client

        kwargs.setdefault("timeout", 2.0)
        return Client(self.frontend, **kwargs)

    def wait_workers(self, n: int, timeout: float = 30.0) -> dict:
        """Wait until ``n`` workers are live; returns the status snapshot. A broker that does not
        answer yet (still starting on a loaded machine, beside workers booting theirs) is waited for."""
        from client import BrokerUnavailable

        def live():
            try:
                with self.client() as c:
                    return wait_until(lambda: (s := c.status()) and len(s["workers"]) >= n and s,
                                      max(0.0, deadline - time.monotonic()), interval=0.05, what=f"{n} workers")
            except BrokerUnavailable:
                return None  # a fresh client tries again

        deadline = time.monotonic() + timeout
        return wait_until(live, timeout, interval=0.05, what=f"{n} workers")

ALL_TASKS = {"noop": {"cpu": 1}, "square": {"cpu": 1}, "sleep": {"cpu": 1}}


class Harness:
    """Drives a Core like the socket loop does, with a fake clock."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("heartbeat_s", 1.0)
        kwargs.setdefault("liveness", 3)
        kwargs.setdefault("no_worker_timeout_s", 5.0)
        self.core = Core(**kwargs)
        self.now = 100.0
        self.n = 0
        self.to_workers: dict[bytes, list] = {}
        self.to_clients: list = []
        self.events: list = []

    def flush(self, send_events: bool = True):
        out = self.core.flush(self.now, send_events)
        for wid, msg in out.workers:
            self.to_workers.setdefault(wid, []).append(msg)
        self.to_clients.extend(out.clients)
        self.events.extend(published(out.events))
        return out

    def join(self, wid: bytes, slots: int = 1, tasks=None, resources=None, name=None, running=()):
        header = {"name": name or wid.decode(), "slots": slots, "resources": resources or {},
                  "tasks": tasks or ALL_TASKS, "running": list(running)}
        self.core.on_worker(wid, Message(Command.READY, header), self.now)
        return self.flush()

    def submit(self, name="noop", *args, session="s1", task_id=None, resources=None, priority=0, retries=None,
               timeout_s=None, key=None, route=b"c1"):
        self.n += 1
        task_id = task_id or f"t{self.n}"
        blob, frames = pack_value([list(args), {}])
        rec = [task_id, name, blob, len(frames), resources, priority, retries, timeout_s, key]
        self.core.on_client(route, Message(Command.SUBMIT, {"rid": self.n, "session": session, "tasks": [rec]}, frames),
                            self.now)
        self.flush()
        return task_id

    def dispatched(self, wid: bytes) -> list:
        """Task ids sent to ``wid`` so far (and forget them)."""
        ids = [r[0] for m in self.to_workers.pop(wid, []) if m.command is Command.TASKS for r in m.header["tasks"]]
        return ids

    def done(self, wid: bytes, task_id: str, value=None, ok=True):
        blob, frames = pack_value(value)
        rec = [task_id, ok, blob if ok else {"type": "ValueError", "message": "boom", "traceback": ""}, len(frames) if ok else 0, 0.01]
        self.core.on_worker(wid, Message(Command.DONE, {"results": [rec]}, frames if ok else []), self.now)
        return self.flush()

    def fetch(self, session="s1", ack=(), wait_ms=0, route=b"c1"):
        self.to_clients.clear()
        self.core.on_client(route, Message(Command.FETCH, {"rid": 0, "session": session, "ack": list(ack),
                                                            "wait_ms": wait_ms}), self.now)
        self.flush()
        results = [m for r, m in self.to_clients if m.command is Command.RESULTS]
        return {rec[0]: rec for m in results for rec in m.header["results"]}

    def tick(self, dt: float):
        self.now += dt
        self.core.on_tick(self.now)
        return self.flush()

    def state(self, task_id):
        return self.core.tasks[task_id].state

    def topics(self, topic):
        return [e for t, e in self.events if t == topic]


class LocalCluster(BrokerPeers):
    """A broker and its workers on threads of the test process, on loopback ports they bind
    themselves: for tests that need real sockets but no process boundary (nothing here is killed).
    ``close()`` stops every worker and the broker and waits for their threads."""

    def __init__(self, heartbeat_s: float = 0.2, liveness: int = 5, **broker_options) -> None:
        from broker.server import Broker, BrokerConfig

        any_port = "tcp://127.0.0.1:*"
        config = BrokerConfig(frontend=any_port, backend=any_port, events=any_port, heartbeat_s=heartbeat_s,
                              liveness=liveness, **broker_options)
        self.heartbeat_s, self.liveness = heartbeat_s, liveness
        self.broker = Broker(config)
        self.frontend = self.broker.endpoints["frontend"]
        self.backend = self.broker.endpoints["backend"]
        self.events = self.broker.endpoints["events"]
        self.workers: list = []
        self._threads = [self._thread(self.broker.run, "broker")]

    @staticmethod
    def _thread(target, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"local-{name}", daemon=True)
        thread.start()
        return thread

    def start_worker(self, slots: int = 1, name: str | None = None, resources: dict | None = None, **options):
        """A worker on a thread; ``options``: more WorkerConfig fields (``pool="process"``, ...)."""
        import worker.builtins  # noqa: F401  (registers the built-in tasks, as python -m worker does)
        from worker.registry import REGISTRY
        from worker.worker import Worker, WorkerConfig

        config = WorkerConfig(broker=self.backend, slots=slots, resources=resources or {},
                              name=name or f"local-{len(self.workers)}", heartbeat_s=self.heartbeat_s,
                              liveness=self.liveness, **options)
        worker = Worker(config, REGISTRY)
        self.workers.append(worker)
        self._threads.append(self._thread(worker.run, config.name))
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for thread in self._threads[1:]:
            thread.join(timeout=30)
        self.broker.stop()
        self._threads[0].join(timeout=30)
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"threads still running after close: {stuck}"
