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
from broker.protocol import DEFAULT_FRONTEND, Command
from client.aio_io import PENDING, LoopIO
from client.client import DEFAULT_MAX_IN_FLIGHT, BaseClient
from client.submission import record_maker, split_options
from client.errors import GridqError, at_index, map_timeout
from client.follow import follow
from client.outcomes import MapResults, resolve
from client.state import events_address_for

log = get_logger(__name__)

#: submissions between two yields to the event loop in map()
MAP_SLICE = 256
#: AsyncClients with a socket, not closed: a program whose loop ended (or was interrupted)
#: without closing one still cancels its queued tasks without a key when the interpreter exits
_OPEN_CLIENTS: "weakref.WeakSet[AsyncClient]" = weakref.WeakSet()


@atexit.register
def _abandon_open_clients() -> None:
    for client in list(_OPEN_CLIENTS):
        _OPEN_CLIENTS.discard(client)
        client._io.cancel_at_exit()


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
        self._accept = PENDING  #: None once accepted, or the error that refused it
        self._accepted: asyncio.Future | None = None  #: made on first use: most callers never ask

    @property
    def accepted(self) -> asyncio.Future:
        """Resolves (None) once the broker accepted the task (journaled where it keeps a journal);
        raises the error the task gets where it was refused (or the broker could not be reached).
        A lone task's acceptance may be told with its result, or up to 20 ms late (docs/PROTOCOL.md,
        "A lone task's ACCEPTED"); a caller that must know at once uses a client whose
        ``DEFER_ACCEPTED_MS`` is 0, as the gateway does."""
        if self._accepted is None:
            self._accepted = self.get_loop().create_future()
            if self._accept is not PENDING:
                resolve(self._accepted, self._accept)
        return self._accepted

    def _set_accepted(self, error: Exception | None) -> None:
        if self._accept is PENDING:
            self._accept = error
            if self._accepted is not None:
                resolve(self._accepted, error)

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


class _Wakeup:
    """An ``AsyncClient.map``'s sink: the outcomes of a reply go to its results at once, and the
    map's coroutine, where it waits for room or for the end, is woken."""

    __slots__ = ("results", "future")

    def __init__(self) -> None:
        self.results: MapResults | None = None
        self.future: asyncio.Future | None = None  #: what the map awaits, if it waits

    def put(self, batch: list) -> None:
        self.results.finish_batch(batch)
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


class AsyncClient(BaseClient):
    """A connection to a gridq broker for asyncio code; use it from one event loop."""

    #: a reply of this many results, or a SUBMIT of this many tasks, takes a few milliseconds of
    #: the loop: never long enough to hold it up
    FETCH_MAX = 1000
    SUBMIT_BATCH = 500
    REPORT_ACCEPTED = True

    def __init__(self, address: str = DEFAULT_FRONTEND, *, timeout: float = 2.5, retries: int = 3,
                 broker_key: str | None = None, secret: str | None = None, cancel_on_close: bool = True) -> None:
        super().__init__(address, timeout=timeout, retries=retries, broker_key=broker_key, secret=secret,
                         cancel_on_close=cancel_on_close)
        self._ctx = zmq.Context.instance()
        self._io: LoopIO | None = None  #: made on first use, on the running loop
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
        self._engine.submit(future, record, frames)
        self._send_submitted()
        return future

    def _send_submitted(self) -> None:
        """After ``engine.submit``: a lone task goes out now (nothing to batch it with); the
        submits of one loop turn go out together at its end."""
        if self._engine.lone_submit and not self._io.flush_due:
            self._io.flush()
        else:
            self._io.flush_soon()

    async def map(self, name: str, iterable: Iterable, *, timeout: float | None = None,
                  max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, return_exceptions: bool = False,
                  task_timeout: float | None = None, **options) -> list:
        """Run ``name(item)`` for every item; results in input order. Raises the first failure
        (in input order, its ``index`` set; nothing more is submitted after it) unless
        ``return_exceptions``; ``timeout`` bounds the whole call, ``task_timeout`` each task's run.
        Holds the tasks in flight only. A map that raises (a failure, its timeout,
        cancellation) cancels its tasks not started yet."""
        if task_timeout is not None:
            options["timeout"] = task_timeout
        results = MapResults(return_exceptions, _Wakeup(), asyncio.CancelledError)
        results.sink.results = results
        try:
            make = record_maker(name, *split_options(options))
            return await self._map(iterable, make, results, timeout, max_in_flight)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
            self._abandon_ids(results.unfinished())
            raise map_timeout(len(results.results), len(results.results) - len(results.in_flight), timeout) from None
        except BaseException:
            self._abandon_ids(results.unfinished())
            raise

    async def _map(self, iterable: Iterable, make, results: MapResults, timeout: float | None,
                   max_in_flight: int) -> list:
        loop = self._start()
        deadline = None if timeout is None else loop.time() + timeout
        in_flight, wakeup, engine = results.in_flight, results.sink, self._engine

        async def wait_some() -> None:
            wakeup.future = loop.create_future()
            await self._until(wakeup.future, deadline)

        for i, item in enumerate(iterable, 1):
            if results.stopping:
                break
            while len(in_flight) >= max_in_flight:
                await wait_some()
            if self._closed:  # closed meanwhile (as submit() says)
                raise GridqError("client is closed")
            record, frames = make(engine.new_task_id(), item)
            engine.submit(results.start(record.task_id), record, frames)
            self._send_submitted()
            if i % MAP_SLICE == 0:
                await asyncio.sleep(0)  # let the batch go out and replies in; never hold the loop
        while not results.settled():
            await wait_some()
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
        if self._io is not None:
            try:
                if self.cancel_on_close:  # abandoned work: queued tasks without a key never run (keyed ones stay)
                    await self._do(partial(self._engine.cancel_pending, keyed=False), self.timeout)
                await self._do(self._engine.flush_acks, self.timeout)  # the broker may drop what we hold
            except (GridqError, asyncio.TimeoutError):
                pass  # the broker is away: nothing more to do
        self._closed = True
        _OPEN_CLIENTS.discard(self)
        if self._io is not None:
            self._io.stop(GridqError("client closed"))

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
        if self._io is None:
            self._io = LoopIO(self, loop)
            self._io.connect()
            _OPEN_CLIENTS.add(self)
        elif loop is not self._io.loop:
            raise RuntimeError("this AsyncClient belongs to another event loop")
        return loop

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
        self._io.send_now()
        return await asyncio.wait_for(waiter, self._patience() if patience_s is None else patience_s)

    def _abandon(self, *futures: AsyncFuture) -> None:
        """Futures cancelled or given up here: ask the broker to cancel the tasks of those not
        finished, not waiting for the answer."""
        self._abandon_ids([f.task_id for f in futures if not f.done()])

    def _abandon_ids(self, ids: list) -> None:
        """Ask the broker to cancel these tasks, not waiting for the answer."""
        if ids and not self._closed and self._io is not None:
            self._engine.call(Command.CANCEL, {"ids": ids}, None, time.monotonic())
            self._io.flush_soon()


__all__ = ["AsyncClient", "AsyncFuture"]
