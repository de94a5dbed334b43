"""The worker's DEALER loop: announce, heartbeat, reconnect, hand tasks to slots, send results.

One thread owns the socket. Tasks run on the Runner's slot threads; the loop
wakes on the broker socket, on the Runner's pipe, on the channels of process
slots whose small batches it reads the results of itself (``Runner.watched``),
and on heartbeat deadlines.
A broker silent for heartbeat x liveness means a fresh socket, exponential
backoff, and a new READY that claims the tasks still running here. When to do
which is decided by ``worker.liveness.Liveness`` (pure, tested with a fake clock).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from broker.logs import get_logger
from broker.protocol import (DEFAULT_BACKEND, NAME_IN_USE, WORKER_TAG, WRONG_PORT, Command, Message, ProtocolError,
                             decode, encode, records)
from broker.shared import NOBLOCK, drain, send_frames
from worker.executors import Runner
from worker.liveness import Liveness
from worker.pool import PoolOptions
from worker.registry import TaskSpec

log = get_logger(__name__)

#: how long a stopping worker waits for its running tasks before handing them back
DEFAULT_DRAIN_S = 30.0


@dataclass
class WorkerConfig:
    broker: str = DEFAULT_BACKEND
    slots: int = 1
    resources: dict = field(default_factory=dict)
    name: str | None = None
    heartbeat_s: float = 1.0
    liveness: int = 3
    drain_s: float = DEFAULT_DRAIN_S
    #: "process": CPU tasks run in a child process per slot; "thread": on the worker's own threads
    pool: str = "thread"
    pool_options: PoolOptions = field(default_factory=PoolOptions)  #: --tasks modules, child limits


class Worker:
    def __init__(self, config: WorkerConfig, registry: dict[str, TaskSpec], gpu=None,
                 context: zmq.Context | None = None, security=None) -> None:
        self.config = config
        self.name = config.name or f"{socket.gethostname()}-{os.getpid()}"
        self.registry = dict(registry)
        self.resources = {"cpu": config.slots, **config.resources}
        if gpu is not None:
            self.resources.update(gpu.resources())
        self.ctx = context or zmq.Context.instance()
        self.security = security
        self.runner = Runner(self.registry, config.slots, self.resources, gpu,
                             pool=config.pool_options if config.pool == "process" else None, watch=True)
        self.log = log.bind(worker=self.name)
        self.sock: zmq.Socket | None = None
        self._polled: set = set()  #: the Runner's watched channel fds that the poller watches
        self._stopping = False
        self._stop_now = False  #: hand back what it holds at once, without waiting for the drain
        self.refused: str | None = None  #: why the broker refused this worker for good, if it did
        self.liveness: Liveness | None = None  #: set while run() runs
        #: (sent_at, results, frames) of DONEs that a broker may have lost with a crash: sent, but
        #: nothing heard from it since that it could only have sent after committing them
        self._unconfirmed: deque = deque()

    # -------------------------------------------------------------- control

    @property
    def stopping(self) -> bool:
        return self._stopping

    def running(self) -> int:
        """Tasks it holds that are not finished (waiting here or running)."""
        return len(self.runner.unfinished())

    def stop(self, at_once: bool = False) -> None:
        """Finish (within the drain timeout) or hand back what this worker holds, say goodbye,
        return from run(); ``at_once``: hand back what it holds now, running tasks too."""
        self._stopping = True
        self._stop_now = self._stop_now or at_once

    def announcement(self) -> Message:
        tasks = {name: spec.resources for name, spec in self.registry.items()}
        retry = {name: [list(spec.retry_on), spec.backoff_s] for name, spec in self.registry.items() if spec.retry_on}
        return Message(Command.READY, {"name": self.name, "slots": self.config.slots, "resources": self.resources,
                                       "tasks": tasks, "retry": retry, "running": self.runner.held(),
                                       "pid": os.getpid(), "pool": self.config.pool,
                                       "killable": self.runner.killable()})

    def _announce(self) -> None:
        """READY, then the results a restarted broker may never have seen (it restored their
        tasks as still running here, and takes a result for them as if it had just come)."""
        self._send(self.announcement())
        if self._unconfirmed:
            # resent with every announcement while the broker stays silent (a fresh socket's
            # queue dies with it at the next redial); kept with their first send time, so once
            # the broker is heard again they age out as usual -- a DONE it refuses (too big,
            # say) cannot make every later announcement fail the same way
            results = [r for _, rs, _ in self._unconfirmed for r in rs]
            frames = [f for _, _, fs in self._unconfirmed for f in fs]
            self._send(Message(Command.DONE, {"log": results}, frames))

    # -------------------------------------------------------------- loop

    def run(self) -> None:
        cfg = self.config
        self._connect()
        self.liveness = live = Liveness(cfg.heartbeat_s, cfg.liveness, cfg.drain_s, time.monotonic())
        try:
            while True:
                now = time.monotonic()
                if self.refused:
                    return  # it holds nothing, and the peer is not a broker that would take a goodbye
                if self._stopping and self._drain_step(now):
                    return
                events = dict(self._poller.poll(self._wait_s(now) * 1000))
                now = time.monotonic()
                if self.sock in events:
                    live.heard(now)
                    if not self._drain_socket():
                        while self._unconfirmed and live.confirmed(self._unconfirmed[0][0]):
                            self._unconfirmed.popleft()
                if self.runner.waker.fd in events:
                    self.runner.waker.clear()
                if self.runner.watched:
                    self.runner.collect_watched(events, now)
                if self.runner.has_output():
                    self._send_done()
                    live.sent(now)
                if self.runner.watched.keys() != self._polled:
                    self._poll_watched()
                if live.heartbeat_due(now):
                    self._send(Message(Command.HEARTBEAT, {}))
                    live.sent(now)
                if live.broker_silent(now):
                    # a fresh socket at once, READY queued on it: ZeroMQ keeps dialling underneath, so
                    # a restarted broker hears us the moment it is up (its claim-back grace is short);
                    # the backoff only spaces out the fresh sockets while it stays away
                    self.log.warning("broker_silent", silent_s=round(now - live.heard_at, 2),
                                     next_try_in_s=live.backoff_s)
                    self._connect()
                    live.redialled(time.monotonic())
        finally:
            self._close()
            self.runner.close()

    def _wait_s(self, now: float) -> float:
        """How long to poll: what Liveness allows, and no longer than a watched batch's deadline."""
        wait_s = self.liveness.wait_s(now, self.runner.has_output())
        deadline = self.runner.watch_deadline()
        return wait_s if deadline is None else min(wait_s, max(0.0, deadline - now))

    def _poll_watched(self) -> None:
        """Have the poller watch exactly the channels whose results this thread reads."""
        fds = set(self.runner.watched)
        for fd in self._polled - fds:
            self._poller.unregister(fd)
        for fd in fds - self._polled:
            self._poller.register(fd, zmq.POLLIN)
        self._polled = fds

    def _drain_step(self, now: float) -> bool:
        """One look at a stopping worker: hand back what has not started (once), say goodbye when
        nothing runs, or hand back the rest when the drain time is over. True once it said goodbye."""
        if self.liveness.start_drain(now):
            self._send(Message(Command.RETURN, {"draining": True, "ids": self.runner.take_unstarted()}))
        if not self.runner.busy() and not self.runner.has_output():
            self._send(Message(Command.DISCONNECT, {}))
            self.log.info("worker_left")
            return True
        if self.liveness.drain_over(now) or self._stop_now:
            if self.runner.has_output():
                self._send_done()  # finished work is reported, never handed back to run again
            unfinished = self.runner.unfinished()
            self._send(Message(Command.RETURN, {"ids": unfinished}))
            self._send(Message(Command.DISCONNECT, {}))
            self.log.warning("worker_stopped_at_once" if self._stop_now else "worker_drain_timeout",
                             handed_back=unfinished)
            return True
        return False

    def _sleep_interruptibly(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _connect(self) -> None:
        self._close()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm = 0
        self.sock.sndhwm = 0
        if self.security is not None:
            self.security.apply_client(self.sock)
        self.sock.connect(self.config.broker)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self.runner.waker.fd, zmq.POLLIN)
        self._polled = set()
        self._poll_watched()
        self._announce()
        self.log.info("worker_announced", broker=self.config.broker, resources=self.resources, slots=self.config.slots)

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=200 if self._stopping else 0)
            self.sock = None

    def _send(self, msg: Message) -> None:
        try:  # never block: a refused CURVE handshake leaves no pipe; broker silence makes a fresh socket
            send_frames(self.sock, encode(WORKER_TAG, msg), NOBLOCK)
        except zmq.Again:
            pass

    def _send_done(self) -> None:
        entries, frames = self.runner.take_output()
        self._send(Message(Command.DONE, {"log": entries}, frames))
        results = [e for e in entries if not isinstance(e, str)]
        if results:
            self._unconfirmed.append((time.monotonic(), results, frames))

    def _drain_socket(self) -> bool:
        """Handle what the broker sent; True where this worker announced itself again."""
        announce = False  # once, however many "announce again" came in (one per message it sent us)
        for raw in drain(self.sock):
            try:
                msg = decode(raw, WORKER_TAG)
            except ProtocolError as exc:
                self.log.warning("broker_message_dropped", error=str(exc))
                continue
            if msg.command is Command.TASKS:
                self._on_tasks(msg)
            elif msg.command is Command.KILL:
                ids = msg.header.get("ids")
                if isinstance(ids, list):
                    self.runner.kill([i for i in ids if isinstance(i, str)], str(msg.header.get("reason")))
            elif msg.command is Command.DISCONNECT:
                reason = str(msg.header.get("reason"))
                self.log.info("broker_disconnect", reason=reason)
                if reason.startswith((NAME_IN_USE, WRONG_PORT)):
                    self.log.error("worker_refused", reason=reason)
                    self.refused = reason
                    self._stopping = True
                    return False
                if reason == "broker stopping":
                    self._sleep_interruptibly(self.config.heartbeat_s)
                    self._connect()
                    return True
                else:
                    announce = True
            # HEARTBEAT: hearing anything is all it says
        if announce:
            self._announce()
        return announce

    def _on_tasks(self, msg: Message) -> None:
        try:
            batch = records(msg)
        except ProtocolError as exc:
            self.log.warning("broker_message_dropped", error=f"bad TASKS batch: {exc}")
            return
        if self._stopping:
            self._send(Message(Command.RETURN, {"ids": [record.task_id for record, _ in batch]}))
            return
        self.runner.submit_all(batch)
