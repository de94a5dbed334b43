"""Client: submit tasks, get futures, map, cancel, status: a thread around the protocol engine.

One background I/O thread owns a DEALER socket to the broker's frontend and
carries out what ``client.engine.Engine`` decides: batched, pipelined SUBMITs,
one long-polling FETCH, STATUS/CANCEL calls, Lazy Pirate resends on a fresh
socket. Callers' threads hand it work through a queue and a wake-up pipe, and
get ``concurrent.futures`` futures back.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from concurrent.futures import CancelledError, Future
from functools import partial
from typing import Iterable, Iterator

import zmq

from broker.logs import get_logger
from broker.protocol import CLIENT_TAG, DEFAULT_FRONTEND, Command, EncodeError, encode
from broker.shared import NOBLOCK, Waker, readable, recv_frames, send_frames
from client.engine import FETCH_WAIT_S, SUBMIT_BATCH, Engine, Outbox
from client.submission import record_maker, split_options
from client.errors import GridqError, at_index, map_timeout
from client.outcomes import FAILED, MapResults, resolve, settle_all

log = get_logger(__name__)

#: default bound on tasks in flight in map()/stream(): enough to keep workers fed; more only
#: makes the garbage collector walk more live futures (measured in docs/PERFORMANCE.md)
DEFAULT_MAX_IN_FLIGHT = 5_000


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


#: Clients not closed yet: closed at interpreter exit, so a program that ends (or is
#: interrupted) without closing its Client still cancels its queued tasks without a key
_OPEN_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_OPEN_CLIENTS):
        client.close()


class BaseClient:
    """What ``Client`` and ``AsyncClient`` share: their options, the engine, the socket they dial."""

    #: most results per FETCH reply (None: as many as the broker sends at once)
    FETCH_MAX: int | None = None
    #: most tasks per SUBMIT message
    SUBMIT_BATCH = SUBMIT_BATCH
    #: the shell uses the engine's acceptances (AsyncFuture.accepted); Client's futures have none
    REPORT_ACCEPTED = False
    #: a lone task's ACCEPTED may wait this long (ms) at the broker to come with its result: one reply
    #: per lone round trip instead of two (0 where acceptance itself is awaited, as the gateway's POST does)
    DEFER_ACCEPTED_MS = 20

    def __init__(self, address: str = DEFAULT_FRONTEND, *, timeout: float = 2.5, retries: int = 3,
                 broker_key: str | None = None, secret: str | None = None, cancel_on_close: bool = True) -> None:
        self._engine = Engine(timeout_s=float(timeout), retries=int(retries), address=address,
                              fetch_max=self.FETCH_MAX, submit_batch=self.SUBMIT_BATCH,
                              report_accepted=self.REPORT_ACCEPTED, defer_accepted_ms=self.DEFER_ACCEPTED_MS)
        self.address = address
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.session = self._engine.session
        #: close() cancels this client's queued tasks that have no key
        self.cancel_on_close = cancel_on_close
        self._security = None
        if broker_key is not None or secret is not None:
            from broker.security import CurveClient

            self._security = CurveClient.from_files(broker_key, secret)
        self._sock = None

    def _patience(self) -> float:
        """How long a call may take, at most, before the engine gives up on the broker."""
        return (self.timeout + FETCH_WAIT_S) * (self.retries + 2) + 5.0

    def _dial(self, ctx: zmq.Context) -> zmq.Socket:
        """A fresh DEALER to the broker in place of the old one (Lazy Pirate starts over on a new socket)."""
        if self._sock is not None:
            self._sock.close(linger=0)
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0  # sends never wait: the engine bounds what is outstanding
        sock.rcvhwm = 0
        if self._security is not None:
            self._security.apply_client(sock)
        sock.connect(self.address)
        self._sock = sock
        return sock


class Client(BaseClient):
    """A connection to a gridq broker; safe to share between threads."""

    def __init__(self, address: str = DEFAULT_FRONTEND, *, timeout: float = 2.5, retries: int = 3,
                 broker_key: str | None = None, secret: str | None = None, cancel_on_close: bool = True) -> None:
        super().__init__(address, timeout=timeout, retries=retries, broker_key=broker_key, secret=secret,
                         cancel_on_close=cancel_on_close)
        self._ctx = zmq.Context.instance()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waker = Waker()
        self._wake_pending = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._io_loop, name="gridq-client-io", daemon=True)
        self._thread.start()
        _OPEN_CLIENTS.add(self)

    # ================================================================ public API

    def submit(self, name: str, *args, resources: dict | None = None, priority: int = 0, retries: int | None = None,
               timeout: float | None = None, key: str | None = None, retry_on=(), backoff: float = 0.0,
               **kwargs) -> GridFuture:
        """Submit one task; returns its future at once. Unencodable arguments raise here."""
        record, frames = self._engine.make_task(name, args, kwargs, resources=resources, priority=priority,
                                                retries=retries, timeout=timeout, key=key, retry_on=retry_on,
                                                backoff=backoff)
        future = GridFuture(self, record.task_id)
        self._post(("submit", future, record, frames))
        return future

    def map(self, name: str, iterable: Iterable, *, timeout: float | None = None,
            max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, return_exceptions: bool = False,
            task_timeout: float | None = None, **options) -> list:
        """Run ``name(item)`` for every item; results in input order. Raises the first failure
        (in input order, its ``index`` set; nothing more is submitted after a failure) unless
        ``return_exceptions``, which puts errors in place of results. ``timeout`` bounds the whole
        call, ``task_timeout`` each task's run. Holds the tasks in flight only: the results list
        is what grows. A map that raises (a failure, its timeout, Ctrl-C) cancels its tasks not
        started yet."""
        if task_timeout is not None:
            options["timeout"] = task_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        # the I/O thread hands this thread each reply's outcomes as one batch (outcomes.settle_all)
        results = MapResults(return_exceptions, queue.SimpleQueue(), CancelledError)
        in_flight, new_id, post = results.in_flight, self._engine.new_task_id, self._post
        make = record_maker(name, *split_options(options))

        def wait_some() -> None:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise queue.Empty
                batch = results.sink.get(timeout=left)
            except queue.Empty:
                raise map_timeout(len(results.results), len(results.results) - len(in_flight), timeout) from None
            results.finish_batch(batch)

        try:
            for item in iterable:
                if results.stopping:
                    break
                while len(in_flight) >= max_in_flight:
                    wait_some()
                record, frames = make(new_id(), item)
                post(("submit", results.start(record.task_id), record, frames))
            while not results.settled():
                wait_some()
            return results.outcome()
        except BaseException:
            self._cancel_ids(results.unfinished())
            raise

    def stream(self, name: str | None, submissions: Iterable, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
               on_submit=None, **options) -> Iterator[GridFuture]:
        """Submit lazily from ``submissions``, never more than ``max_in_flight`` unfinished, and
        yield futures as they finish (holding only those in flight).

        Items are ``(args, kwargs)`` (then ``name`` applies) or, with ``name=None``,
        ``(name, args, kwargs, options)``. ``on_submit(future, item)``, where given, is called
        as each task is submitted, so a caller can tie a future that finishes later back to
        the item it came from.
        """
        done: queue.SimpleQueue = queue.SimpleQueue()
        in_flight = 0
        for item in submissions:
            if name is None:
                task_name, args, kwargs, opts = item
            else:
                (args, kwargs), task_name, opts = item, name, options
            while in_flight >= max_in_flight:
                yield done.get()
                in_flight -= 1
            future = self.submit(task_name, *args, **opts, **kwargs)
            if on_submit is not None:
                on_submit(future, item)
            in_flight += 1
            future.add_done_callback(done.put)
        while in_flight:
            yield done.get()
            in_flight -= 1

    def gather(self, futures: Iterable[Future], timeout: float | None = None, *,
               return_exceptions: bool = False) -> list:
        """Results of ``futures`` in order; raises the first failure unless ``return_exceptions``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for i, f in enumerate(futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out.append(f.result(left))
            except (GridqError, CancelledError) as exc:
                at_index(exc, i)
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    def _cancel_ids(self, ids: list) -> None:
        """Ask the broker to cancel these tasks (not waiting for the answer)."""
        if ids and not self._closed.is_set():
            self._post(("do", partial(self._engine.call, Command.CANCEL, {"ids": ids}), Future()))

    def cancel(self, future: GridFuture | str, terminate: bool = False) -> bool:
        """Cancel a task (a future or a task id): True where it will never run (queued, or killed
        where ``terminate`` and the broker can), False where it runs or ran."""
        if isinstance(future, str):
            reply = self._call(Command.CANCEL, {"ids": [future], "terminate": bool(terminate)})
            return future in reply.get("cancelled", ())
        if future.done():
            return future.cancelled()
        reply = self._call(Command.CANCEL, {"ids": [future.task_id], "terminate": bool(terminate)})
        return future.task_id in reply.get("cancelled", ()) or future.cancelled()

    def cancel_all(self) -> int:
        """Cancel every queued task of this client; returns how many were cancelled."""
        return len(self._do(partial(self._engine.cancel_pending, keyed=True))["cancelled"])

    def status(self) -> dict:
        """A snapshot of the cluster (see SPEC): seq, workers, queued, running, done, failed."""
        return self._call(Command.STATUS, {})["snapshot"]

    def close(self) -> None:
        """Cancel this client's queued tasks without a key (unless ``cancel_on_close=False``), then stop."""
        _OPEN_CLIENTS.discard(self)
        if self._closed.is_set():
            return
        try:
            if self.cancel_on_close:  # abandoned work: queued tasks without a key never run (keyed ones stay)
                self._do(partial(self._engine.cancel_pending, keyed=False), patience_s=self.timeout)
            self._do(self._engine.flush_acks, patience_s=self.timeout)  # the broker may drop what we hold
        except (GridqError, TimeoutError):
            pass  # the broker is away: nothing more to do
        self._closed.set()
        self._waker.wake()
        self._thread.join(timeout=5)
        self._waker.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ================================================================ plumbing

    def _post(self, item) -> None:
        if self._closed.is_set():
            raise GridqError("client is closed")
        self._inbox.put(item)
        if not self._wake_pending:  # one wakeup per batch of posts, not a syscall per task
            self._wake_pending = True
            self._waker.wake()

    def _call(self, command: Command, header: dict) -> dict:
        return self._do(partial(self._engine.call, command, header))

    def _do(self, action, patience_s: float | None = None) -> dict:
        """Have the I/O thread call ``action(waiter, now)`` on the engine; wait for the reply it gets."""
        waiter: Future = Future()
        self._post(("do", action, waiter))
        return waiter.result(timeout=self._patience() if patience_s is None else patience_s)

    # ================================================================ the I/O thread

    def _io_loop(self) -> None:
        engine = self._engine
        self._connect()
        try:
            while not self._closed.is_set():
                events = dict(self._poller.poll(self._next_deadline_ms()))
                if self._waker.fd in events:
                    self._waker.clear()
                self._wake_pending = False  # before draining: a later post wakes us again
                self._take_inbox(time.monotonic())
                if self._sock in events:
                    self._drain_socket()
                now = time.monotonic()
                engine.on_tick(now)
                engine.pump(now)
                self._carry_out(engine.take())
        except Exception:
            log.exception("client_io_thread_crashed")
            raise
        finally:
            error = GridqError("client closed")
            engine.fail_everything(error)
            out = engine.take()
            out.messages.clear()
            self._carry_out(out)
            self._fail_inbox(error)
            self._sock.close(linger=0)

    def _connect(self) -> None:
        sock = self._dial(self._ctx)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._waker.fd, zmq.POLLIN)

    def _next_deadline_ms(self) -> int:
        soonest = self._engine.next_deadline()
        if soonest is None:
            return 1000
        return max(0, int((soonest - time.monotonic()) * 1000) + 1)

    def _take_inbox(self, now: float) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "submit":
                _, future, record, frames = item
                self._engine.submit(future, record, frames)
            else:
                _, action, waiter = item
                action(waiter, now)

    def _drain_socket(self) -> None:
        now = time.monotonic()
        while readable(self._sock):  # re-read: a reply may make _carry_out dial a fresh socket
            self._engine.on_frames(recv_frames(self._sock), now)
            self._carry_out(self._engine.take())  # a caller waiting for a result wakes now, not after the loop

    def _carry_out(self, out: Outbox) -> None:
        if out.reconnect:
            self._connect()  # Lazy Pirate: a fresh socket; out.messages resends everything outstanding
        for msg in out.messages:
            try:  # never block: a socket whose CURVE handshake was refused has no pipe left; Lazy Pirate resends
                send_frames(self._sock, [b"", *encode(CLIENT_TAG, msg)], NOBLOCK)
            except zmq.Again:
                pass
        settle_all(out.settled)
        for waiter, reply in out.replies:
            resolve(waiter, reply)

    def _fail_inbox(self, error: Exception) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "submit":
                settle_all([(item[1], FAILED, error)])
            elif not item[-1].done():
                item[-1].set_exception(error)


__all__ = ["BaseClient", "Client", "GridFuture", "CancelledError", "EncodeError", "DEFAULT_MAX_IN_FLIGHT"]
