"""The sans-IO half of a gridq client: requests, Lazy Pirate resends, batching, long polls, outcomes.

``Engine`` is what ``Client`` (a thread) and ``AsyncClient`` (an event loop)
share. Like the broker's core it owns no socket and reads no clock: the shell
hands it what it was asked (``submit``, ``call``), what arrived (``on_frames``)
and the time (``now``), and carries out what ``take()`` returns: messages to
send (on a fresh socket first, where ``reconnect`` says so), futures to settle,
acceptances and call replies. Futures stay the shell's own objects ("handles"):
the engine only reads and writes their ``task_id`` and ``info``.

What it does: every request gets an id (``rid``) and a deadline; a request
that misses its deadline is resent, with every other outstanding one, on a
fresh socket (Lazy Pirate) and after ``retries`` resends fails with
BrokerUnavailable. SUBMITs go in batches, a few in flight at once; one FETCH
long-polls for results and acknowledges those received last time. The broker's
incarnation (``boot``) is watched: tasks accepted by a broker that restarted
without a journal can never complete, so they fail with TaskLost.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field

from broker.logs import get_logger
from broker.protocol import (ACCEPTED_IN_RESULTS, CLIENT_TAG, DEFER_ACCEPTED, FETCH_IN_SUBMIT, Command, ErrorType, Message,
                             ProtocolError, decode, records)
from client.errors import BrokerUnavailable, GridqError, KeyConflict, TaskError, TaskLost
from client.outcomes import CANCELLED, FAILED, result_outcome
from client.submission import SubmitRecord, task_record

log = get_logger(__name__)

#: most tasks in one SUBMIT message
SUBMIT_BATCH = 2000
#: most payload bytes in one SUBMIT message (arrays beyond go in the next one)
SUBMIT_BATCH_BYTES = 64 << 20
#: most SUBMIT messages awaiting their ACCEPTED at once
SUBMIT_PIPELINE = 4
#: how long one FETCH may wait at the broker for results, at most
FETCH_WAIT_S = 1.0
#: how long acknowledgements of results wait for a FETCH that goes anyway (a new task's) before
#: one goes for them alone: one message per round trip fewer for a caller that submits one at a time
ACK_DELAY_S = 0.05

class BootWatch:
    """The broker's incarnation (``boot``) as replies report it, and which one accepted each task
    still pending: a broker that restarted without a journal has forgotten what its predecessor
    accepted, so those tasks can never complete."""

    __slots__ = ("boot", "_accepted_by")

    def __init__(self) -> None:
        self.boot = None  #: the incarnation last heard from
        self._accepted_by: dict[str, object] = {}  #: pending task id -> incarnation that accepted it

    def accepted(self, task_ids: list, boot, pending: dict) -> None:
        """``boot`` accepted these tasks (those still ``pending``: the others ended already)."""
        accepted_by = self._accepted_by
        for task_id in task_ids:
            if task_id in pending:
                accepted_by[task_id] = boot

    def forget(self, task_id: str) -> None:
        self._accepted_by.pop(task_id, None)

    def lost(self, header: dict) -> list[str]:
        """The tasks a reply's header shows lost: accepted by an incarnation before a restart without a journal."""
        boot = header.get("boot")
        if boot is None or boot == self.boot:
            return []
        old, self.boot = self.boot, boot
        if old is None or header.get("durable"):
            return []
        return [t for t, b in self._accepted_by.items() if b == old]


@dataclass(eq=False)
class Request:
    rid: int
    command: Command
    header: dict
    frames: list = field(default_factory=list)
    deadline: float = 0.0
    resends: int = 0
    wait_s: float = 0.0  #: how long the broker may hold it on purpose (a long-polling FETCH)
    waiter: object = None  #: for calls (status, cancel): the shell's object that gets the reply
    task_ids: list = field(default_factory=list)  #: for SUBMIT


class Outbox:
    """What the shell must do next, in this order. (A plain class: one is made per ``take()``,
    several per round trip.)"""

    __slots__ = ("reconnect", "messages", "accepted", "settled", "replies")

    def __init__(self) -> None:
        self.reconnect = False  #: close the socket and dial a fresh one before sending
        self.messages: list = []  #: Messages to send
        self.accepted: list = []  #: (handle, None or the error that refused it)
        self.settled: list = []  #: (handle, OK/ERROR/CANCELLED/FAILED, value)
        self.replies: list = []  #: (waiter, reply header or an exception)

    def __bool__(self) -> bool:
        return bool(self.reconnect or self.messages or self.accepted or self.settled or self.replies)


class Engine:
    """One client session's protocol state; see the module docstring."""

    def __init__(self, *, timeout_s: float, retries: int, address: str = "", session: str | None = None,
                 fetch_max: int | None = None, submit_batch: int = SUBMIT_BATCH, report_accepted: bool = True,
                 defer_accepted_ms: int = 0) -> None:
        if not timeout_s > 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        #: most results one FETCH reply may carry (None: the broker's limit); smaller replies are shorter to handle
        self.fetch_max = fetch_max
        #: most tasks per SUBMIT message (a smaller one is quicker to encode)
        self.submit_batch = submit_batch
        #: ``take().accepted`` lists every accepted task (a shell that has no use for it saves the work)
        self.report_accepted = report_accepted
        #: a lone task's SUBMIT lets the broker hold its ACCEPTED this long (ms) and send it with the
        #: task's RESULTS, one reply instead of two (0: never; a caller waiting on acceptance says 0)
        self.defer_accepted_ms = defer_accepted_ms
        self.session = session or os.urandom(8).hex()
        self._ids = itertools.count()
        self._id_prefix = os.urandom(6).hex() + "-"
        self.timeout_s = timeout_s
        self.retries = retries
        self.address = address  #: for error messages only
        self._rid = itertools.count(1)
        self.requests: dict[int, Request] = {}
        #: task id -> the handle waiting on it (a tuple of them where keys aliased several): sent, not finished.
        #: One object per task, no list: a map of many thousands keeps the garbage collector's work small.
        self.pending: dict[str, object] = {}
        self._keyed: set = set()  #: pending task ids submitted with an idempotency key
        self._to_submit: deque = deque()  #: (handle, record, frames) not yet sent
        self._acks: list = []  #: result ids to acknowledge with the next FETCH
        self._fetching: Request | None = None
        self._acks_due: float | None = None  #: when acknowledgements go in a FETCH of their own
        self._boots = BootWatch()
        self._out = Outbox()

    # ================================================================ input

    def make_task(self, name: str, args: tuple, kwargs: dict, **options) -> tuple[SubmitRecord, tuple | list]:
        """``task_record`` with a fresh task id. Safe to call from any thread: it touches only the id counter."""
        return task_record(self.new_task_id(), name, args, kwargs, **options)

    def new_task_id(self) -> str:
        """A task id unique to this session (any thread)."""
        return self._id_prefix + format(next(self._ids), "x")

    def submit(self, handle, record: SubmitRecord, frames) -> None:
        """Queue one task (a SUBMIT_FIELDS record and its array frames); sent by the next ``pump``."""
        self._to_submit.append((handle, record, frames))

    def call(self, command: Command, header: dict, waiter, now: float) -> None:
        """Send a request whose reply header goes to ``waiter`` (STATUS, CANCEL)."""
        if command is Command.CANCEL:
            # the broker must have the task before it can cancel it (and say so in a
            # task.cancelled event): send what waits here first, on the same socket, in order
            self.pump(now, pipeline=1 << 30)
        self._request(command, {"session": self.session, **header}, now, waiter=waiter)

    def cancel_pending(self, waiter, now: float, *, keyed: bool) -> None:
        """Cancel this session's unfinished tasks (those with a key too where ``keyed``); the reply
        goes to ``waiter`` (an empty one where there was nothing to cancel)."""
        self.pump(now, pipeline=1 << 30)  # what waits here goes first: the broker cancels only what it has
        ids = list(self.pending) if keyed else [t for t in self.pending if t not in self._keyed]
        if ids:
            self.call(Command.CANCEL, {"ids": ids}, waiter, now)
        elif waiter is not None:
            self._out.replies.append((waiter, {"cancelled": [], "refused": []}))

    def flush_acks(self, waiter, now: float) -> None:
        """Closing: acknowledge the results received (the broker drops them then), reply to ``waiter``
        once it did; at once where a FETCH is out anyway or there is nothing to acknowledge."""
        if self._fetching is not None or not self._acks:
            self._out.replies.append((waiter, {}))
            return
        acks, self._acks, self._acks_due = self._acks, [], None
        self._fetching = self._request(Command.FETCH, {"session": self.session, "ack": acks, "wait_ms": 0}, now,
                                       waiter=waiter)

    def on_frames(self, raw: list, now: float) -> None:
        """One multipart message off the DEALER socket (empty delimiter first)."""
        try:
            if len(raw) < 4 or bytes(raw[0]) != b"":
                raise ProtocolError("reply without the empty delimiter")
            msg = decode(raw[1:], CLIENT_TAG)
        except ProtocolError as exc:
            log.warning("broker_reply_dropped", error=str(exc))
            return
        req = self.requests.pop(msg.header.get("rid"), None)
        if req is None:
            if msg.command is Command.ERROR:
                log.warning("broker_error", error=msg.header.get("error"))
            return  # a reply to a request we already resent and got answered
        self._on_reply(req, msg)

    def on_tick(self, now: float) -> None:
        """Resend what missed its deadline (Lazy Pirate), give up past ``retries``."""
        late = [r for r in self.requests.values() if r.deadline <= now]
        if not late:
            return
        log.debug("broker_silent_resending", requests=len(self.requests), address=self.address)
        self._out.reconnect = True
        self._out.messages = []  # everything outstanding goes again, on the fresh socket
        for req in list(self.requests.values()):
            if req in late:
                req.resends += 1
                if req.resends > self.retries:
                    self._give_up(req)
                    continue
            req.deadline = now + self.timeout_s + req.wait_s
            self._out.messages.append(self._message(req))

    def pump(self, now: float, pipeline: int = SUBMIT_PIPELINE) -> None:
        """Send queued tasks in batches (a few SUBMITs in flight), and keep one FETCH outstanding.
        A FETCH that goes out with a SUBMIT travels inside it (``FETCH_IN_SUBMIT``): one message
        fewer per round trip for a caller that submits one task at a time."""
        submits = self._submits_out() if self._to_submit else 0
        while self._to_submit and submits < pipeline:
            records, frames, ids, size = [], [], [], 0
            while self._to_submit and len(records) < self.submit_batch and (size < SUBMIT_BATCH_BYTES or not records):
                handle, record, task_frames = self._to_submit.popleft()
                task_id = handle.task_id
                if task_id in self.pending:
                    self._wait(task_id, (handle,))
                else:
                    self.pending[task_id] = handle
                if record.key is not None:
                    self._keyed.add(task_id)
                records.append(record)
                ids.append(task_id)
                if task_frames:
                    frames.extend(task_frames)
                    size += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in task_frames)
            self._request(Command.SUBMIT, {"session": self.session, "tasks": records}, now, frames, task_ids=ids)
            submits += 1
        if self._fetching is None and (self.pending or self._acks):
            if not self.pending:  # acknowledgements alone: the next task's FETCH may carry them instead
                if self._acks_due is None:
                    self._acks_due = now + ACK_DELAY_S
                if now < self._acks_due:
                    return
            self._acks_due = None
            wait_s = min(FETCH_WAIT_S, self.timeout_s / 2) if self.pending else 0.0
            acks, self._acks = self._acks, []
            header = {"session": self.session, "ack": acks, "wait_ms": int(wait_s * 1000)}
            if self.fetch_max is not None:
                header["max"] = self.fetch_max
            self._fetching = self._request(Command.FETCH, header, now, wait_s=wait_s, send=False)
            self._send_fetch(self._fetching)

    def _send_fetch(self, fetch: Request) -> None:
        """Queue ``fetch``: inside the SUBMIT queued last where there is one (the FETCH keeps its own
        rid and is resent alone), else on its own."""
        messages = self._out.messages
        last = messages[-1] if messages else None
        if last is not None and last.command is Command.SUBMIT and FETCH_IN_SUBMIT not in last.header:
            # a copy: the SUBMIT's own request resends its header without this FETCH
            header = {**last.header, FETCH_IN_SUBMIT: fetch.header}
            if self.defer_accepted_ms and len(header["tasks"]) == 1 and self._submits_out() == 1:
                header[DEFER_ACCEPTED] = self.defer_accepted_ms  # a lone task: its ACCEPTED may come with its result
            messages[-1] = Message(Command.SUBMIT, header, last.frames)
        else:
            messages.append(self._message(fetch))

    def take(self) -> Outbox:
        """What to do now; the engine forgets it."""
        out, self._out = self._out, Outbox()
        return out

    # ================================================================ reading

    def next_deadline(self) -> float | None:
        """When ``on_tick``/``pump`` must run next (a monotonic time); None when nothing waits."""
        soonest = min((r.deadline for r in self.requests.values()), default=None)
        if self._acks_due is not None and (soonest is None or self._acks_due < soonest):
            return self._acks_due
        return soonest

    @property
    def lone_submit(self) -> bool:
        """One task waits to be sent and no SUBMIT is in flight: nothing to batch it with, send it now."""
        return len(self._to_submit) == 1 and not self._submits_out()

    def _submits_out(self) -> int:
        """SUBMIT requests awaiting their ACCEPTED."""
        submit = Command.SUBMIT
        return sum([r.command is submit for r in self.requests.values()])

    @property
    def busy(self) -> bool:
        """Tasks or requests whose end is not known yet."""
        return bool(self.requests or self.pending or self._to_submit)

    def fail_unsent(self, error: Exception) -> None:
        """Fail the tasks not sent yet (they never reached the broker)."""
        while self._to_submit:
            handle, _record, _frames = self._to_submit.popleft()
            self._out.accepted.append((handle, error))
            self._out.settled.append((handle, FAILED, error))

    def fail_everything(self, error: Exception) -> None:
        """Closing: every task and call still waiting ends with ``error``."""
        for task_id in list(self.pending):
            self._fail(task_id, error)
        self.fail_unsent(error)
        for req in self.requests.values():
            if req.waiter is not None:
                self._out.replies.append((req.waiter, error))
        self.requests.clear()
        self._fetching = None

    # ================================================================ plumbing

    def _request(self, command: Command, header: dict, now: float, frames: list = (), waiter=None, task_ids=(),
                 wait_s: float = 0.0, send: bool = True) -> Request:
        rid = next(self._rid)
        req = Request(rid, command, {**header, "rid": rid}, list(frames), now + self.timeout_s + wait_s, 0, wait_s,
                      waiter, list(task_ids))
        self.requests[rid] = req
        if send:
            self._out.messages.append(self._message(req))
        return req

    @staticmethod
    def _message(req: Request) -> Message:
        return Message(req.command, req.header, req.frames)

    def _on_reply(self, req: Request, msg: Message) -> None:
        if req is self._fetching:
            self._fetching = None
        if msg.command is Command.ERROR:
            error = GridqError(f"broker refused the request: {msg.header.get('error')}")
            if req.waiter is not None:
                self._out.replies.append((req.waiter, error))
            for task_id in req.task_ids:
                self._fail(task_id, error)
            if msg.header.get("fatal"):  # e.g. the wrong port: nothing sent here will ever succeed
                self.fail_everything(error)
            return
        self._check_boot(msg.header)
        if msg.command is Command.ACCEPTED:
            self._on_accepted(req, msg.header)
        elif msg.command is Command.RESULTS:
            held = msg.header.get(ACCEPTED_IN_RESULTS)
            rid = held.get("rid") if isinstance(held, dict) else None
            submit = self.requests.get(rid) if type(rid) is int else None
            if submit is not None and submit.command is Command.SUBMIT:  # its ACCEPTED, held back for this reply
                del self.requests[rid]
                self._on_reply(submit, Message(Command.ACCEPTED, held))
            self._on_results(msg)
        elif msg.command is Command.CANCELLED:
            for task_id in msg.header.get("cancelled") or ():
                # cancelled now; still pending, so the FETCH goes on until its "cancelled" result is acknowledged
                for h in self._handles(task_id):
                    self._out.settled.append((h, CANCELLED, None))
        if req.waiter is not None:
            self._out.replies.append((req.waiter, msg.header))

    def _on_accepted(self, req: Request, header: dict) -> None:
        for task_id, reason in header.get("rejected", ()):
            self._fail(task_id, TaskError("InvalidRequest", str(reason)))
        for task_id, reason in header.get("conflicts", ()):
            self._fail(task_id, KeyConflict(ErrorType.KEY_CONFLICT, str(reason), task_id=task_id))
        for task_id, first_id in header.get("aliases", ()):
            handles = self._pop(task_id)
            if task_id in self._keyed:
                self._keyed.discard(task_id)
                self._keyed.add(first_id)
            for h in handles:
                h.task_id = first_id
            self._wait(first_id, handles)
            self._out.accepted.extend((h, None) for h in handles)
        pending = self.pending
        self._boots.accepted(req.task_ids, header.get("boot"), pending)
        if not self.report_accepted:
            return
        accepted = self._out.accepted
        for task_id in req.task_ids:
            h = pending.get(task_id)
            if isinstance(h, tuple):
                accepted.extend((x, None) for x in h)
            elif h is not None:
                accepted.append((h, None))

    def _check_boot(self, header: dict) -> None:
        lost = self._boots.lost(header)
        if lost:
            log.warning("broker_restarted_without_journal", lost=len(lost))
        for task_id in lost:
            self._fail(task_id, TaskLost("TaskLost", f"task {task_id} was accepted by a broker that restarted "
                                                     "without a journal (--journal): it is gone"))

    def _on_results(self, msg: Message) -> None:
        try:
            results = records(msg)
        except ProtocolError as exc:
            log.warning("broker_reply_dropped", error=f"bad RESULTS: {exc}")
            return
        pending = self.pending
        for (task_id, status, value, _n, info), frames in results:
            self._acks.append(task_id)
            if task_id in pending:  # else delivered twice after a resend (or cancelled): the first delivery won
                self._settle(task_id, *result_outcome(task_id, status, value, frames, info), info)

    def _give_up(self, req: Request) -> None:
        del self.requests[req.rid]
        error = BrokerUnavailable(f"broker at {self.address} did not answer within {self.timeout_s:g} s "
                                  f"after {self.retries} retries")
        if req.waiter is not None:
            self._out.replies.append((req.waiter, error))
        if req is self._fetching:
            self._fetching = None
            for task_id in list(self.pending):  # nobody can tell us how these end
                self._fail(task_id, error)
        for task_id in req.task_ids:
            self._fail(task_id, error)

    def _fail(self, task_id: str, error: Exception) -> None:
        for h in self._handles(task_id):
            self._out.accepted.append((h, error))  # the shell ignores this where it was accepted already
        self._settle(task_id, FAILED, error)

    def _wait(self, task_id: str, handles: tuple) -> None:
        old = self._handles(task_id)
        self.pending[task_id] = handles[0] if not old and len(handles) == 1 else (*old, *handles)

    def _handles(self, task_id: str) -> tuple:
        h = self.pending.get(task_id)
        return () if h is None else h if isinstance(h, tuple) else (h,)

    def _pop(self, task_id: str) -> tuple:
        handles = self._handles(task_id)
        self.pending.pop(task_id, None)
        return handles

    def _settle(self, task_id: str, kind: str, value, info: dict | None = None) -> None:
        self._boots.forget(task_id)
        self._keyed.discard(task_id)
        h = self.pending.pop(task_id, None)
        for x in h if isinstance(h, tuple) else () if h is None else (h,):
            if info is not None:
                x.info = info
            self._out.settled.append((x, kind, value))


__all__ = ["Engine", "Outbox", "Request", "SUBMIT_BATCH", "SUBMIT_PIPELINE", "FETCH_WAIT_S"]
