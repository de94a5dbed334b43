"""Client: submit tasks, get futures, map, cancel, status; Lazy Pirate retries.

One background I/O thread owns a DEALER socket to the broker's frontend and
pipelines requests: batched SUBMITs, one long-polling FETCH that acknowledges
the results it received last time, and STATUS/CANCEL calls. Every request has a
deadline; a request that misses it is resent, with every other outstanding one,
on a fresh socket, and after ``retries`` resends fails with BrokerUnavailable.
Task ids are made here, so a resent SUBMIT can never create a duplicate.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import structlog
import zmq

from broker.protocol import (CLIENT_TAG, Command, EncodeError, Message, ProtocolError, check_resources, decode, encode,
                             pack_value, split_frames, unpack_value)
from broker.wake import Waker
from client.errors import BrokerUnavailable, GridqError, TaskError, TaskLost, task_error

log = structlog.get_logger(__name__)

#: most tasks in one SUBMIT message
SUBMIT_BATCH = 2000
#: most payload bytes in one SUBMIT message (arrays beyond go in the next one)
SUBMIT_BATCH_BYTES = 64 << 20
#: most SUBMIT messages awaiting their ACCEPTED at once
SUBMIT_PIPELINE = 4
#: how long one FETCH may wait at the broker for results, at most
FETCH_WAIT_S = 1.0
#: default bound on tasks in flight in map()/stream()
DEFAULT_MAX_IN_FLIGHT = 50_000


class GridFuture(Future):
    """A concurrent.futures.Future for one task; ``cancel()`` asks the broker."""

    def __init__(self, client: "Client", task_id: str) -> None:
        super().__init__()
        self.task_id = task_id
        self.info: dict | None = None
        self._client = client

    def cancel(self) -> bool:
        return self._client.cancel(self)

    def _cancel_locally(self) -> bool:
        return super().cancel()

    def __repr__(self) -> str:
        return f"<GridFuture {self.task_id} {self._state}>"


@dataclass(eq=False)
class _Request:
    rid: int
    command: Command
    header: dict
    frames: list = field(default_factory=list)
    deadline: float = 0.0
    resends: int = 0
    waiter: Future | None = None  #: for synchronous calls (status, cancel)
    task_ids: list = field(default_factory=list)  #: for SUBMIT


class Client:
    """A connection to a gridq broker; safe to share between threads."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", *, timeout: float = 2.5, retries: int = 3,
                 broker_key: str | None = None, secret: str | None = None) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self.address = address
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.session = os.urandom(8).hex()
        self._ids = itertools.count()
        self._id_prefix = os.urandom(6).hex() + "-"
        self._security = None
        if broker_key is not None or secret is not None:
            from broker.security import CurveClient

            self._security = CurveClient.from_files(broker_key, secret)
        self._ctx = zmq.Context.instance()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waker = Waker()
        self._wake_pending = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._io_loop, name="gridq-client-io", daemon=True)
        self._thread.start()

    # ================================================================ public API

    def submit(self, name: str, *args, resources: dict | None = None, priority: int = 0, retries: int | None = None,
               timeout: float | None = None, key: str | None = None, **kwargs) -> GridFuture:
        """Submit one task; returns its future at once. Unencodable arguments raise here."""
        if not isinstance(name, str) or not name:
            raise ValueError("task name must be a non-empty string")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if retries is not None and (not isinstance(retries, int) or retries < 0):
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if resources is not None:
            resources = check_resources(resources)
        blob, frames = pack_value([args, kwargs])  # raises EncodeError for what cannot travel
        task_id = self._id_prefix + format(next(self._ids), "x")
        future = GridFuture(self, task_id)
        record = [task_id, name, blob, len(frames), resources, priority, retries, timeout, key]
        self._post(("submit", future, record, frames))
        return future

    def map(self, name: str, iterable: Iterable, *, timeout: float | None = None,
            max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, **options) -> list:
        """Run ``name(item)`` for every item; results in input order. Raises the first failure."""
        submissions = (((item,), {}) for item in iterable)
        futures = list(self.stream(name, submissions, max_in_flight=max_in_flight, ordered=True, **options))
        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]

    def stream(self, name: str | None, submissions: Iterable, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
               ordered: bool = False, on_submit=None, **options) -> Iterator[GridFuture]:
        """Submit lazily from ``submissions``, never more than ``max_in_flight`` unfinished.

        Items are ``(args, kwargs)`` (then ``name`` applies) or, with ``name=None``,
        ``(name, args, kwargs, options)``. Yields futures as they finish
        (``ordered=False``) or all of them in submission order once submitted
        (``ordered=True``; wait on them yourself). ``on_submit(future, item)``,
        where given, is called as each task is submitted, so a caller can tie a
        future that finishes later back to the item it came from.
        """
        done: queue.SimpleQueue = queue.SimpleQueue()
        in_flight = 0
        submitted: list = []
        for item in submissions:
            if name is None:
                task_name, args, kwargs, opts = item
            else:
                (args, kwargs), task_name, opts = item, name, options
            while in_flight >= max_in_flight:
                finished = done.get()
                in_flight -= 1
                if not ordered:
                    yield finished
            future = self.submit(task_name, *args, **opts, **kwargs)
            if on_submit is not None:
                on_submit(future, item)
            in_flight += 1
            future.add_done_callback(done.put)
            if ordered:
                submitted.append(future)
        if ordered:
            yield from submitted
            return
        while in_flight:
            yield done.get()
            in_flight -= 1

    def gather(self, futures: Iterable[Future], timeout: float | None = None) -> list:
        """Results of ``futures`` in order; raises the first failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]

    def cancel(self, future: GridFuture) -> bool:
        """Cancel a queued task: True where it will never run, False where it runs or ran."""
        if future.done():
            return future.cancelled()
        reply = self._call(Command.CANCEL, {"session": self.session, "ids": [future.task_id]})
        if future.task_id in reply.get("cancelled", ()):
            future._cancel_locally()
            return True
        return future.cancelled()

    def status(self) -> dict:
        """A snapshot of the cluster (see SPEC): seq, workers, queued, running, done, failed."""
        return self._call(Command.STATUS, {})["snapshot"]

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._waker.wake()
            self._thread.join(timeout=5)
            self._waker.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ================================================================ plumbing

    def _patience(self) -> float:
        """How long the I/O thread may take, at most, to give up on the broker."""
        return (self.timeout + FETCH_WAIT_S) * (self.retries + 2) + 5.0

    def _post(self, item) -> None:
        if self._closed.is_set():
            raise GridqError("client is closed")
        self._inbox.put(item)
        if not self._wake_pending:  # one wakeup per batch of posts, not a syscall per task
            self._wake_pending = True
            self._waker.wake()

    def _call(self, command: Command, header: dict) -> dict:
        waiter: Future = Future()
        self._post(("call", command, header, waiter))
        return waiter.result(timeout=self._patience())

    # ================================================================ the I/O thread

    def _io_loop(self) -> None:
        self._rid = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._pending: dict[str, list[GridFuture]] = {}  #: task id -> futures waiting on it
        self._to_submit: deque = deque()  #: (future, record, frames) not yet sent
        self._acks: list = []  #: result ids to acknowledge with the next FETCH
        self._fetching: _Request | None = None
        self._boot = None  #: the broker incarnation last heard from
        self._accepted_by: dict[str, str] = {}  #: pending task id -> incarnation that accepted it
        self._sock = None
        self._connect()
        try:
            while not self._closed.is_set():
                timeout_ms = self._next_deadline_ms()
                events = dict(self._poller.poll(timeout_ms))
                if self._waker.fd in events:
                    self._waker.clear()
                self._wake_pending = False  # before draining: a later post wakes us again
                self._take_inbox()
                if self._sock in events:
                    self._drain_socket()
                self._expire(time.monotonic())
                self._send_more()
        except Exception:
            log.exception("client_io_thread_crashed")
            raise
        finally:
            self._fail_everything(GridqError("client closed"))
            self._sock.close(linger=0)

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0
        sock.rcvhwm = 0
        if self._security is not None:
            self._security.apply_client(sock)
        sock.connect(self.address)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._waker.fd, zmq.POLLIN)

    def _next_deadline_ms(self) -> int:
        if not self._requests:
            return 1000
        soonest = min(r.deadline for r in self._requests.values())
        return max(0, int((soonest - time.monotonic()) * 1000) + 1)

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "submit":
                _, future, record, frames = item
                self._to_submit.append((future, record, frames))
            else:
                _, command, header, waiter = item
                if command is Command.CANCEL:
                    # the broker must have the task before it can cancel it (and say so in a
                    # task.cancelled event): send what waits here first, on the same socket, in order
                    self._send_more(pipeline=1 << 30)
                self._request(command, header, waiter=waiter)

    def _request(self, command: Command, header: dict, frames: list = (), waiter=None, task_ids=(), wait_s=0.0) -> _Request:
        rid = next(self._rid)
        req = _Request(rid, command, {**header, "rid": rid}, list(frames), waiter=waiter, task_ids=list(task_ids))
        req.deadline = time.monotonic() + self.timeout + wait_s
        self._requests[rid] = req
        self._transmit(req)
        return req

    def _transmit(self, req: _Request) -> None:
        try:  # never block: a socket whose CURVE handshake was refused has no pipe left; Lazy Pirate resends
            self._sock.send_multipart([b"", *encode(CLIENT_TAG, Message(req.command, req.header, req.frames))],
                                      zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def _send_more(self, pipeline: int = SUBMIT_PIPELINE) -> None:
        submits = sum(1 for r in self._requests.values() if r.command is Command.SUBMIT)
        while self._to_submit and submits < pipeline:
            records, frames, ids, size = [], [], [], 0
            while self._to_submit and len(records) < SUBMIT_BATCH and (size < SUBMIT_BATCH_BYTES or not records):
                future, record, task_frames = self._to_submit.popleft()
                self._pending.setdefault(future.task_id, []).append(future)
                records.append(record)
                frames.extend(task_frames)
                ids.append(future.task_id)
                size += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in task_frames)
            self._request(Command.SUBMIT, {"session": self.session, "tasks": records}, frames, task_ids=ids)
            submits += 1
        if self._fetching is None and self._pending:
            wait_s = min(FETCH_WAIT_S, self.timeout / 2)
            acks, self._acks = self._acks, []
            self._fetching = self._request(Command.FETCH, {"session": self.session, "ack": acks,
                                                           "wait_ms": int(wait_s * 1000)}, wait_s=wait_s)
        elif self._acks and not self._pending and self._fetching is None:
            acks, self._acks = self._acks, []
            self._fetching = self._request(Command.FETCH, {"session": self.session, "ack": acks, "wait_ms": 0})

    def _drain_socket(self) -> None:
        while True:
            try:
                raw = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                if len(raw) < 4 or raw[0].bytes != b"":
                    raise ProtocolError("reply without the empty delimiter")
                msg = decode(raw[1:], CLIENT_TAG)
            except ProtocolError as exc:
                log.warning("broker_reply_dropped", error=str(exc))
                continue
            req = self._requests.pop(msg.header.get("rid"), None)
            if req is None:
                if msg.command is Command.ERROR:
                    log.warning("broker_error", error=msg.header.get("error"))
                continue  # a reply to a request we already resent and got answered
            self._on_reply(req, msg)

    def _on_reply(self, req: _Request, msg: Message) -> None:
        if req is self._fetching:
            self._fetching = None
        if msg.command is Command.ERROR:
            error = GridqError(f"broker refused the request: {msg.header.get('error')}")
            if req.waiter is not None:
                req.waiter.set_exception(error)
            for task_id in req.task_ids:
                self._fail(task_id, error)
            return
        self._check_boot(msg.header)
        if msg.command is Command.ACCEPTED:
            for task_id, reason in msg.header.get("rejected", ()):
                self._fail(task_id, TaskError("InvalidRequest", str(reason)))
            for task_id, first_id in msg.header.get("aliases", ()):
                futures = self._pending.pop(task_id, [])
                for f in futures:
                    f.task_id = first_id
                self._pending.setdefault(first_id, []).extend(futures)
            boot = msg.header.get("boot")
            for task_id in req.task_ids:
                if task_id in self._pending:
                    self._accepted_by[task_id] = boot
        elif msg.command is Command.RESULTS:
            self._on_results(msg)
        elif req.waiter is not None:
            req.waiter.set_result(msg.header)

    def _check_boot(self, header: dict) -> None:
        """A broker that restarted without a journal has forgotten what its predecessor
        accepted: those tasks can never complete, so they fail now instead of waiting forever."""
        boot = header.get("boot")
        if boot is None or boot == self._boot:
            return
        old, self._boot = self._boot, boot
        if old is None or header.get("durable"):
            return
        lost = [t for t, b in self._accepted_by.items() if b == old]
        if lost:
            log.warning("broker_restarted_without_journal", lost=len(lost))
        for task_id in lost:
            self._fail(task_id, TaskLost("TaskLost", f"task {task_id} was accepted by a broker that restarted "
                                                     "without a journal (--journal): it is gone"))

    def _on_results(self, msg: Message) -> None:
        records = msg.header.get("results") or []
        try:
            per_task = split_frames(msg.frames, [r[3] for r in records])
        except (ProtocolError, TypeError, IndexError) as exc:
            log.warning("broker_reply_dropped", error=f"bad RESULTS: {exc}")
            return
        for (task_id, status, value, _n, info), frames in zip(records, per_task):
            self._acks.append(task_id)
            futures = self._pending.pop(task_id, None)
            self._accepted_by.pop(task_id, None)
            if not futures:
                continue  # delivered twice after a resend: the first delivery won
            for f in futures:
                f.info = info
                if f.done():
                    continue
                if status == "succeeded":
                    try:
                        f.set_result(unpack_value(value, frames))
                    except ProtocolError as exc:
                        f.set_exception(TaskError("ProtocolError", f"result could not be decoded: {exc}"))
                elif status == "cancelled":
                    f._cancel_locally()
                else:
                    f.set_exception(task_error(value if isinstance(value, dict) else {"message": str(value)}))

    def _expire(self, now: float) -> None:
        late = [r for r in self._requests.values() if r.deadline <= now]
        if not late:
            return
        log.info("broker_silent_resending", requests=len(self._requests), address=self.address)
        self._connect()  # Lazy Pirate: a fresh socket, then resend everything outstanding
        for req in list(self._requests.values()):
            if req in late:
                req.resends += 1
                if req.resends > self.retries:
                    self._give_up(req)
                    continue
            wait_s = FETCH_WAIT_S if req.command is Command.FETCH else 0.0
            req.deadline = now + self.timeout + min(wait_s, self.timeout / 2)
            self._transmit(req)

    def _give_up(self, req: _Request) -> None:
        del self._requests[req.rid]
        error = BrokerUnavailable(f"broker at {self.address} did not answer within {self.timeout:g} s "
                                  f"after {self.retries} retries")
        if req.waiter is not None:
            req.waiter.set_exception(error)
        if req is self._fetching:
            self._fetching = None
            for task_id in list(self._pending):  # nobody can tell us how these end
                self._fail(task_id, error)
        for task_id in req.task_ids:
            self._fail(task_id, error)

    def _fail(self, task_id: str, error: Exception) -> None:
        self._accepted_by.pop(task_id, None)
        for f in self._pending.pop(task_id, ()):
            if not f.done():
                f.set_exception(error)

    def _fail_everything(self, error: Exception) -> None:
        for task_id in list(self._pending):
            self._fail(task_id, error)
        for future, _record, _frames in self._to_submit:
            if not future.done():
                future.set_exception(error)
        for req in self._requests.values():
            if req.waiter is not None and not req.waiter.done():
                req.waiter.set_exception(error)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            target = item[1] if item[0] == "submit" else item[3]
            if not target.done():
                target.set_exception(error)



__all__ = ["Client", "GridFuture", "CancelledError", "EncodeError"]
