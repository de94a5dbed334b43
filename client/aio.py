"""AsyncClient: gridq from asyncio, on the caller's event loop, with no thread of its own.

A DEALER socket around the same protocol engine as ``Client``
(``client.engine``), serviced by the event loop itself: the loop watches the
socket's file descriptor and calls back, as zmq.asyncio does inside, but with
no Future and no Poller per wait. Submits made in one loop turn
go out as one batched SUBMIT; a timer at the engine's next deadline resends
what is late (Lazy Pirate). Nothing here blocks the loop: sends never wait (no
high-water mark), replies are handled a few milliseconds at a time, and
``map`` yields to the loop every few hundred submissions. ``events()`` reads a
zmq.asyncio SUB socket (``client.follow``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import time
import weakref
from functools import partial
from typing import AsyncIterator, Iterable

import zmq

from broker.logs import get_logger
from broker.protocol import CLIENT_TAG, DEFAULT_FRONTEND, Command, Message, encode
from broker.shared import NOBLOCK, recv_frames, send_frames
from client.client import DEFAULT_MAX_IN_FLIGHT, BaseClient
from client.engine import Outbox
from client.errors import GridqError, at_index, map_timeout
from client.follow import follow
from client.outcomes import FAILED, MapResults, outcome, settle
from client.state import events_address_for

log = get_logger(__name__)

#: submissions between two yields to the event loop in map()
MAP_SLICE = 256
#: longest the reader handles received messages before it lets other coroutines run
READ_SLICE_S = 0.005

_PENDING = object()  #: a future's acceptance is not known yet

#: AsyncClients with a socket, not closed: a program whose loop ended (or was interrupted)
#: without closing one still cancels its queued tasks without a key when the interpreter exits
_OPEN_CLIENTS: "weakref.WeakSet[AsyncClient]" = weakref.WeakSet()


@atexit.register
def _abandon_open_clients() -> None:
    for client in list(_OPEN_CLIENTS):
        client._cancel_at_exit()


class AsyncFuture(asyncio.Future):
    """An asyncio.Future for one task, with ``task_id``, ``info`` and ``accepted``.

    ``cancel()`` cancels it here at once and asks the broker to cancel the task
    (so ``asyncio.wait_for`` timing out, or a cancelled ``gather``, abandons the
    work too); ``await client.cancel(f)`` says whether the broker did.
    """

    __slots__ = ("task_id", "info", "_client", "_accept", "_accepted")  # no __dict__: less for the GC to walk

    def __init__(self, client: "AsyncClient", task_id: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.task_id = task_id
        self.info: dict | None = None
        self._client = client
        self._accept = _PENDING  #: None once accepted, or the error that refused it
        self._accepted: asyncio.Future | None = None  #: made on first use: most callers never ask

    @property
    def accepted(self) -> asyncio.Future:
        """Resolves (None) once the broker accepted the task (journaled where it keeps a journal);
        raises the error the task gets where it was refused (or the broker could not be reached)."""
        if self._accepted is None:
            self._accepted = self.get_loop().create_future()
            if self._accept is not _PENDING:
                _resolve(self._accepted, self._accept)
        return self._accepted

    def _set_accepted(self, error: Exception | None) -> None:
        if self._accept is _PENDING:
            self._accept = error
            if self._accepted is not None:
                _resolve(self._accepted, error)

    def cancel(self, msg=None) -> bool:
        if self.done():
            return False
        self._client._abandon(self)
        return super().cancel(msg)

    def _cancel_locally(self) -> bool:
        return super().cancel()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled() else "finished" if self.done() else "pending"
        return f"<AsyncFuture {self.task_id} {state}>"


def _resolve(future: asyncio.Future, outcome) -> None:
    """Set ``future`` to ``outcome`` (an exception is raised from it), unless it is done already."""
    if not future.done():
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class AsyncClient(BaseClient):
    """A connection to a gridq broker for asyncio code; use it from one event loop."""

    #: a reply of this many results, or a SUBMIT of this many tasks, takes a few milliseconds of
    #: the loop: never long enough to hold it up
    FETCH_MAX = 1000
    SUBMIT_BATCH = 500

    def __init__(self, address: str = DEFAULT_FRONTEND, *, timeout: float = 2.5, retries: int = 3,
                 broker_key: str | None = None, secret: str | None = None, cancel_on_close: bool = True) -> None:
        super().__init__(address, timeout=timeout, retries=retries, broker_key=broker_key, secret=secret,
                         cancel_on_close=cancel_on_close)
        self._ctx = zmq.Context.instance()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = None  #: the socket's file descriptor, watched by the loop
        self._timer: asyncio.TimerHandle | None = None  #: calls _service at the engine's next deadline
        self._timer_at = 0.0
        self._service_due = False
        self._flush_due = False
        self._closed = False

    # ================================================================ tasks

    def submit(self, name: str, *args, resources: dict | None = None, priority: int = 0, retries: int | None = None,
               timeout: float | None = None, key: str | None = None, retry_on=(), backoff: float = 0.0,
               **kwargs) -> AsyncFuture:
        """Submit one task; returns its future at once. Bad arguments or options raise here."""
        loop = self._start()
        record, frames = self._engine.make_task(name, args, kwargs, resources=resources, priority=priority,
                                                retries=retries, timeout=timeout, key=key, retry_on=retry_on,
                                                backoff=backoff)
        future = AsyncFuture(self, record.task_id, loop)
        engine = self._engine
        engine.submit(future, record, frames)
        if engine.lone_submit and not self._flush_due:
            self._flush()  # nothing to batch it with: out now, not after a turn of the loop
        else:
            self._flush_soon()  # every submit of this loop turn goes out in one batch
        return future

    async def map(self, name: str, iterable: Iterable, *, timeout: float | None = None,
                  max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, return_exceptions: bool = False,
                  task_timeout: float | None = None, **options) -> list:
        """Run ``name(item)`` for every item; results in input order. Raises the first failure
        (in input order, its ``index`` set; nothing more is submitted after it) unless
        ``return_exceptions``; ``timeout`` bounds the whole call, ``task_timeout`` each task's run.
        Holds the futures in flight only. A map that raises (a failure, its timeout,
        cancellation) cancels its tasks not started yet."""
        if task_timeout is not None:
            options["timeout"] = task_timeout
        index_of: dict = {}  #: future in flight -> its item's index (only these are held)
        results = MapResults(return_exceptions)
        try:
            return await self._map(name, iterable, results, index_of, timeout, max_in_flight, options)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
            self._abandon(*index_of)
            raise map_timeout(len(results.results), len(results.results) - len(index_of), timeout) from None
        except BaseException:
            self._abandon(*index_of)
            raise

    async def _map(self, name: str, iterable: Iterable, results: MapResults, index_of: dict, timeout: float | None,
                   max_in_flight: int, options: dict) -> list:
        loop = self._start()
        deadline = None if timeout is None else loop.time() + timeout
        wake: asyncio.Future | None = None
        context = contextvars.copy_context()  # one for every callback, not a copy per task

        def finished(future) -> None:
            results.finish(index_of.pop(future), *outcome(future, asyncio.CancelledError))
            if wake is not None and not wake.done():
                wake.set_result(None)

        async def wait_one() -> None:
            nonlocal wake
            wake = loop.create_future()
            await self._until(wake, deadline)

        for i, item in enumerate(iterable, 1):
            if results.stopping:
                break
            while len(index_of) >= max_in_flight:
                await wait_one()
            future = self.submit(name, item, **options)
            index_of[future] = results.start()
            future.add_done_callback(finished, context=context)
            if i % MAP_SLICE == 0:
                await asyncio.sleep(0)  # let the batch go out and replies in; never hold the loop
        while not results.settled():
            await wait_one()
        return results.outcome()

    async def gather(self, futures: Iterable[asyncio.Future], return_exceptions: bool = False, *,
                     timeout: float | None = None) -> list:
        """Results of ``futures`` in order; raises the first failure unless ``return_exceptions``."""
        futures = list(futures)
        left = [f for f in futures if not f.done()]
        if left:
            loop = asyncio.get_running_loop()
            all_done = loop.create_future()
            count = len(left)
            context = contextvars.copy_context()

            def one_done(_f) -> None:
                nonlocal count
                count -= 1
                if not count and not all_done.done():
                    all_done.set_result(None)

            for f in left:
                f.add_done_callback(one_done, context=context)
            await self._until(all_done, None if timeout is None else loop.time() + timeout)
        out = []
        for i, f in enumerate(futures):
            if f.cancelled():
                if not return_exceptions:
                    f.result()  # raises asyncio.CancelledError
                out.append(asyncio.CancelledError())
            elif f.exception() is not None:
                error = at_index(f.exception(), i)
                if not return_exceptions:
                    raise error
                out.append(error)
            else:
                out.append(f.result())
        return out

    async def as_completed(self, futures: Iterable[asyncio.Future]) -> AsyncIterator[asyncio.Future]:
        """The futures, each as it finishes."""
        finished: asyncio.Queue = asyncio.Queue()
        futures = list(futures)
        for f in futures:
            f.add_done_callback(finished.put_nowait)
        for _ in futures:
            yield await finished.get()

    async def cancel(self, future: AsyncFuture | str, terminate: bool = False) -> bool:
        """Cancel a task (a future or a task id): True where it will never run (queued, or killed
        where ``terminate`` and the broker can), False where it runs or ran."""
        task_id = future if isinstance(future, str) else future.task_id
        if not isinstance(future, str) and future.done():
            return future.cancelled()
        reply = await self._call(Command.CANCEL, {"ids": [task_id], "terminate": bool(terminate)})
        return task_id in reply.get("cancelled", ()) or (not isinstance(future, str) and future.cancelled())

    async def cancel_all(self) -> int:
        """Cancel every queued task of this client; returns how many were cancelled."""
        return len((await self._do(partial(self._engine.cancel_pending, keyed=True)))["cancelled"])

    async def status(self) -> dict:
        """A snapshot of the cluster, as ``Client.status()``."""
        return (await self._call(Command.STATUS, {}))["snapshot"]

    # ================================================================ events

    def events(self, prefix: str = "", events_address: str | None = None) -> AsyncIterator[dict]:
        """The broker's events whose topic starts with ``prefix``, none missed: first a
        ``{"topic": "snapshot", "seq": s, "snapshot": status}`` item, then events with seq > s,
        each ``{"topic": ..., "seq": ..., ...}``; after a gap or a broker restart a new
        snapshot item, then on. ``events_address`` defaults to the broker's events port
        (``client.state.events_address_for``). A snapshot item after the first says the stream
        broke: events up to its seq are in it, not sent; its ``missed`` counts the task outcomes
        (``succeeded``, ``failed``, ``cancelled``, and ``submitted`` where the broker is the same)
        among them. A state that merely resynchronises itself costs readers no event."""
        self._start()
        return follow(self, prefix, events_address or events_address_for(self.address))

    # ================================================================ closing

    async def close(self) -> None:
        """Cancel this client's queued tasks without a key (unless ``cancel_on_close=False``), then
        stop; tasks still waiting fail with GridqError("client closed")."""
        if self._closed:
            return
        if self._loop is not None:
            try:
                if self.cancel_on_close:  # abandoned work: queued tasks without a key never run (keyed ones stay)
                    await self._do(partial(self._engine.cancel_pending, keyed=False), self.timeout)
                await self._do(self._engine.flush_acks, self.timeout)  # the broker may drop what we hold
            except (GridqError, asyncio.TimeoutError):
                pass  # the broker is away: nothing more to do
        self._closed = True
        _OPEN_CLIENTS.discard(self)
        self._stop(GridqError("client closed"))

    async def __aenter__(self) -> "AsyncClient":
        self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ================================================================ plumbing

    def _start(self) -> asyncio.AbstractEventLoop:
        """The running loop; on first use, the socket, watched by the loop."""
        if self._closed:
            raise GridqError("client is closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("AsyncClient is used from coroutines on a running event loop") from None
        if self._loop is None:
            self._loop = loop
            self._connect()
            _OPEN_CLIENTS.add(self)
        elif loop is not self._loop:
            raise RuntimeError("this AsyncClient belongs to another event loop")
        return loop

    def _connect(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
        sock = self._dial(self._ctx)
        self._fd = sock.FD
        self._loop.add_reader(self._fd, self._service)
        self._service_soon()  # ZeroMQ's descriptor signals edges: look once, whatever it says

    async def _until(self, future: asyncio.Future, deadline: float | None) -> None:
        if deadline is None:
            await future
        else:
            await asyncio.wait_for(future, max(0.0, deadline - asyncio.get_running_loop().time()))

    async def _call(self, command: Command, header: dict) -> dict:
        return await self._do(partial(self._engine.call, command, header))

    async def _do(self, action, patience_s: float | None = None) -> dict:
        """Call ``action(waiter, now)`` on the engine, send what it decided, await the reply."""
        waiter = self._start().create_future()
        action(waiter, time.monotonic())
        self._send_now()
        return await asyncio.wait_for(waiter, self._patience() if patience_s is None else patience_s)

    def _abandon(self, *futures: AsyncFuture) -> None:
        """Futures cancelled or given up here: ask the broker to cancel the tasks of those not
        finished, not waiting for the answer."""
        ids = [f.task_id for f in futures if not f.done()]
        if ids and not self._closed and self._loop is not None:
            self._engine.call(Command.CANCEL, {"ids": ids}, None, time.monotonic())
            self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flush_due:  # every submit of this loop turn goes out in one batch
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if not self._closed:
            self._engine.pump(time.monotonic())
            self._send_now()

    def _send_now(self) -> None:
        """Carry out what the engine decided, and be back at its next deadline."""
        self._carry_out(self._engine.take())
        self._arm_timer()

    def _service_soon(self) -> None:
        if not self._service_due:
            self._service_due = True
            self._loop.call_soon(self._service)

    def _service(self) -> None:
        """The socket is readable, a deadline passed, or input may wait: handle what came, a slice
        at a time, then resend what is late and send what is due. A reply that settles futures
        hands the loop to their callbacks first: the caller awaiting a result resumes before the
        rest of this (one more read, resends, the next FETCH) is done."""
        self._service_due = False
        if self._closed:
            return
        engine = self._engine
        try:
            started = time.monotonic()
            while True:
                try:
                    raw = recv_frames(self._sock)
                except zmq.Again:
                    break
                engine.on_frames(raw, time.monotonic())
                out = engine.take()
                self._carry_out(out)
                now = time.monotonic()
                if now - started > READ_SLICE_S:
                    self._service_soon()  # more later: other coroutines run first
                    break
                if out.settled and not self._deadline_passed(now):
                    self._service_soon()  # the rest after the callbacks (nothing is late meanwhile)
                    return
            now = time.monotonic()
            engine.on_tick(now)
            engine.pump(now)
            self._send_now()
        except Exception as exc:  # nothing may wait forever on a client that cannot read
            log.exception("async_client_io_failed")
            self._closed = True
            self._stop(GridqError(f"client I/O failed: {type(exc).__name__}: {exc}"))

    def _deadline_passed(self, now: float) -> bool:
        soonest = self._engine.next_deadline()
        return soonest is not None and soonest <= now

    def _arm_timer(self) -> None:
        """Be called back at the engine's next deadline (a timer already due sooner will do)."""
        soonest = self._engine.next_deadline()
        if soonest is None or (self._timer is not None and self._timer_at <= soonest):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = soonest
        self._timer = self._loop.call_later(max(soonest - time.monotonic(), 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._service()

    def _carry_out(self, out: Outbox) -> None:
        if out.reconnect:
            self._connect()  # Lazy Pirate: a fresh socket; out.messages resends everything outstanding
        if out.messages:
            for msg in out.messages:
                try:
                    self._send(msg)
                except zmq.Again:
                    pass  # no pipe (a refused CURVE handshake): Lazy Pirate resends
            if self._sock.get(zmq.EVENTS) & zmq.POLLIN:
                self._service_soon()  # a send can take the descriptor's edge: a reply already in would wait
        for future, error in out.accepted:
            if future._accept is _PENDING:
                future._set_accepted(error)
        for future, kind, value in out.settled:
            if future._accept is _PENDING:  # a task that ended was accepted, unless it failed here
                future._set_accepted(value if kind == FAILED else None)
            settle(future, kind, value)
        for waiter, reply in out.replies:
            _resolve(waiter, reply)

    def _send(self, msg: Message) -> None:
        """One message out, never waiting; copied: a zero-copy send would start pyzmq's
        garbage-collector thread."""
        send_frames(self._sock, [b"", *encode(CLIENT_TAG, msg)], NOBLOCK, zero_copy=False)

    def _cancel_at_exit(self) -> None:
        """The interpreter ends with this client open (its loop may be gone): cancel its queued
        tasks without a key, as ``close()`` would, without a loop, waiting at most ``timeout``."""
        _OPEN_CLIENTS.discard(self)
        if self._closed or self._sock is None:
            return
        self._closed = True
        sock, done = self._sock, object()  # ``done``: the waiter of the CANCEL's reply
        try:
            if self.cancel_on_close:
                self._engine.cancel_pending(done, time.monotonic(), keyed=False)
                out = self._engine.take()
                for msg in out.messages:
                    self._send(msg)
                deadline = time.monotonic() + self.timeout
                while not any(w is done for w, _ in out.replies) and sock.poll(
                        max(0.0, deadline - time.monotonic()) * 1000):
                    self._engine.on_frames(recv_frames(sock), time.monotonic())
                    out = self._engine.take()
        except (zmq.ZMQError, GridqError):
            pass  # the broker is away or the context is gone: nothing more to do
        finally:
            sock.close(linger=0)
            self._sock = None

    def _stop(self, error: Exception) -> None:
        self._engine.fail_everything(error)
        out = self._engine.take()
        out.messages.clear()
        out.reconnect = False
        self._carry_out(out)
        if self._timer is not None:
            self._timer.cancel()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
        if self._sock is not None:
            self._sock.close(linger=0)


__all__ = ["AsyncClient", "AsyncFuture"]
