"""``AsyncClient``'s I/O shell: its DEALER socket watched by the event loop, the engine's deadlines as loop timers.

The engine (``client/engine.py``) decides; this carries it out on the caller's
loop with no thread: the socket's descriptor is a loop reader, a deadline a
``call_later``, a turn's submits one ``call_soon`` flush. It never blocks the
loop: a read handles at most ``READ_SLICE_S`` of messages before it lets other
coroutines run, and a reply that settles futures lets their callbacks run first.
"""

from __future__ import annotations

import asyncio
import time

import zmq

from broker.logs import get_logger
from broker.protocol import CLIENT_TAG, Message, encode
from broker.shared import NOBLOCK, readable, recv_frames, send_frames
from client.engine import Outbox
from client.errors import GridqError
from client.outcomes import FAILED, resolve, settle, settle_all

log = get_logger("client.aio")

#: longest the reader handles received messages before it lets other coroutines run
READ_SLICE_S = 0.005

PENDING = object()  #: a future's acceptance is not known yet


def _settle(future, kind: str, value) -> None:
    if future._accept is PENDING:  # a task that ended was accepted, unless it failed here
        future._set_accepted(value if kind == FAILED else None)
    settle(future, kind, value)


class LoopIO:
    """One ``AsyncClient``'s socket on its event loop (the client keeps the socket, ``_dial``
    makes a fresh one for Lazy Pirate); the client's ``_closed`` is set once it closed or its I/O
    failed."""

    def __init__(self, client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.engine = client._engine
        self.loop = loop
        self.fd = None  #: the socket's file descriptor, watched by the loop
        self.timer: asyncio.TimerHandle | None = None  #: calls service at the engine's next deadline
        self.timer_at = 0.0
        self.service_due = False
        self.flush_due = False

    def connect(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
        sock = self.client._dial(self.client._ctx)
        self.fd = sock.FD
        self.loop.add_reader(self.fd, self.service)
        self.service_soon()  # ZeroMQ's descriptor signals edges: look once, whatever it says

    def flush_soon(self) -> None:
        if not self.flush_due:  # every submit of this loop turn goes out in one batch
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_due = False
        if not self.client._closed:
            self.engine.pump(time.monotonic())
            self.send_now()

    def send_now(self) -> None:
        """Carry out what the engine decided, and be back at its next deadline."""
        self.carry_out(self.engine.take())
        self.arm_timer()

    def service_soon(self) -> None:
        if not self.service_due:
            self.service_due = True
            self.loop.call_soon(self.service)

    def service(self) -> None:
        """The socket is readable, a deadline passed, or input may wait: handle what came, a slice
        at a time, then resend what is late and send what is due. A reply that settles futures
        hands the loop to their callbacks first: the caller awaiting a result resumes before the
        rest of this (one more read, resends, the next FETCH) is done."""
        self.service_due = False
        if self.client._closed:
            return
        engine = self.engine
        try:
            started = time.monotonic()
            while readable(self.client._sock):  # re-read: a reply may make carry_out dial a fresh socket
                engine.on_frames(recv_frames(self.client._sock), time.monotonic())
                out = engine.take()
                self.carry_out(out)
                now = time.monotonic()
                if now - started > READ_SLICE_S:
                    self.service_soon()  # more later: other coroutines run first
                    break
                if out.settled and not self.deadline_passed(now):
                    self.service_soon()  # the rest after the callbacks (nothing is late meanwhile)
                    return
            now = time.monotonic()
            engine.on_tick(now)
            engine.pump(now)
            self.send_now()
        except Exception as exc:  # nothing may wait forever on a client that cannot read
            log.exception("async_client_io_failed")
            self.client._closed = True
            self.stop(GridqError(f"client I/O failed: {type(exc).__name__}: {exc}"))

    def deadline_passed(self, now: float) -> bool:
        soonest = self.engine.next_deadline()
        return soonest is not None and soonest <= now

    def arm_timer(self) -> None:
        """Be called back at the engine's next deadline (a timer already due sooner will do)."""
        soonest = self.engine.next_deadline()
        if soonest is None or (self.timer is not None and self.timer_at <= soonest):
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = soonest
        self.timer = self.loop.call_later(max(soonest - time.monotonic(), 0.0), self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.service()

    def carry_out(self, out: Outbox) -> None:
        if out.reconnect:
            self.connect()  # Lazy Pirate: a fresh socket; out.messages resends everything outstanding
        if out.messages:
            for msg in out.messages:
                try:
                    self.send(msg)
                except zmq.Again:
                    pass  # no pipe (a refused CURVE handshake): Lazy Pirate resends
            if readable(self.client._sock):
                self.service_soon()  # a send can take the descriptor's edge: a reply already in would wait
        for future, error in out.accepted:
            if future._accept is PENDING:
                future._set_accepted(error)
        settle_all(out.settled, _settle)
        for waiter, reply in out.replies:
            resolve(waiter, reply)

    def send(self, msg: Message) -> None:
        """One message out, never waiting; copied: a zero-copy send would start pyzmq's
        garbage-collector thread."""
        send_frames(self.client._sock, [b"", *encode(CLIENT_TAG, msg)], NOBLOCK, zero_copy=False)

    def cancel_at_exit(self) -> None:
        """The interpreter ends with this client open (its loop may be gone): cancel its queued
        tasks without a key, as ``close()`` would, without a loop, waiting at most ``timeout``."""
        if self.client._closed or self.client._sock is None:
            return
        self.client._closed = True
        sock, done = self.client._sock, object()  # ``done``: the waiter of the CANCEL's reply
        try:
            if self.client.cancel_on_close:
                self.engine.cancel_pending(done, time.monotonic(), keyed=False)
                out = self.engine.take()
                for msg in out.messages:
                    self.send(msg)
                deadline = time.monotonic() + self.client.timeout
                while not any(w is done for w, _ in out.replies) and sock.poll(
                        max(0.0, deadline - time.monotonic()) * 1000):
                    self.engine.on_frames(recv_frames(sock), time.monotonic())
                    out = self.engine.take()
        except (zmq.ZMQError, GridqError):
            pass  # the broker is away or the context is gone: nothing more to do
        finally:
            sock.close(linger=0)
            self.client._sock = None

    def stop(self, error: Exception) -> None:
        self.engine.fail_everything(error)
        out = self.engine.take()
        out.messages.clear()
        out.reconnect = False
        self.carry_out(out)
        if self.timer is not None:
            self.timer.cancel()
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
        if self.client._sock is not None:
            self.client._sock.close(linger=0)
