"""The broker's pure state machine: tasks, workers, sessions; (message, now) in, messages out.

It owns no socket and reads no clock. The server loop feeds it decoded messages
with ``on_client``/``on_worker``/``on_tick`` and then calls ``flush(now)``, which
runs dispatch and returns everything to send: replies to clients, batches to
workers and events. Replies go out only after the journal commits, so an
ACCEPTED means durable.

``Core`` reads peer messages and wires the parts together; each part owns one invariant:
``TaskTable`` (broker/tasks.py) the task states and what is counted and journaled of them,
``Lifecycle`` (broker/lifecycle.py) every move across parts and dispatch,
``Scheduler`` (broker/scheduler.py) the queues and the send-ahead policy,
``Workers`` (broker/workers.py) the workers, their leases and claim-back,
``Sessions`` (broker/sessions.py) results on their way to clients,
``Events``/``Stats`` (broker/events.py) the event stream and statistics.
"""

from __future__ import annotations

import math

from broker.events import Events, Outgoing, Stats
from broker.lifecycle import Lifecycle
from broker.logs import get_logger
from broker.protocol import (DEFER_ACCEPTED, MAX_DEFER_ACCEPTED_MS, Command, Message, ProtocolError, check_int, check_name,
                             records, task_digest)
from broker.scheduler import AHEAD_MAX_WAIT_S, AHEAD_PER_SLOT, Scheduler  # noqa: F401 (tests)
from broker.sessions import ACKED_GRACE_S, Sessions  # noqa: F401 (tests)
from broker.states import TERMINAL, TaskState, WorkerState
from broker.tasks import Task, TaskTable
from broker.workers import Worker, Workers

log = get_logger(__name__)

#: most tasks returned in one RESULTS reply
MAX_RESULTS_PER_REPLY = 5000
#: longest a FETCH may wait for results, in seconds
MAX_FETCH_WAIT_S = 60.0


class Core:
    """All broker decisions. Methods take ``now`` (monotonic seconds); ``wall`` (unix time,
    set by the loop) only stamps events."""

    def __init__(
        self,
        *,
        heartbeat_s: float = 1.0,
        liveness: int = 3,
        max_retries: int = 3,
        no_worker_timeout_s: float = 10.0,
        result_ttl_s: float = 3600.0,
        journal=None,
        boot: str | None = None,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_retries = max_retries
        self.no_worker_timeout_s = no_worker_timeout_s
        self.result_ttl_s = result_ttl_s
        self.journal = journal
        #: which broker process this is, in replies that clients match results against: a client
        #: whose broker restarted without a journal knows its accepted tasks are gone
        self._incarnation = {"boot": boot, "durable": journal is not None} if boot else {}
        self._out = Outgoing()
        self.table = TaskTable(journal)
        self.tasks = self.table.tasks
        self.keys = self.table.keys
        self.counts = self.table.counts
        self.events = Events()
        self.sched = Scheduler()
        self.results = Sessions(self.table, self._out, result_ttl_s, self._incarnation)
        self.sessions = self.results.sessions
        self.workers: dict[bytes, Worker] = {}
        self.stats = Stats(self.events, self.table, self.workers, self.sched)
        self.moves = Lifecycle(self.table, self.results, self.sched, self.events, self.stats, self.workers,
                               no_worker_timeout_s)
        self.leases = Workers(self.moves, heartbeat_s, liveness)

    # the event stream's state, set by the loop and read by tests
    seq = property(lambda self: self.events.seq)
    publish = property(lambda self: self.events.publish, lambda self, v: setattr(self.events, "publish", v))
    wall = property(lambda self: self.events.wall, lambda self, v: setattr(self.events, "wall", v))
    # timers, read by tests that check none is left behind
    _held = property(lambda self: self.leases.held)
    _expiry = property(lambda self: self.results.expiry)
    _recent = property(lambda self: self.results.recent)
    _deadlines = property(lambda self: self.moves.deadlines)
    _last_stats_at = property(lambda self: self.stats.last_at, lambda self, v: setattr(self.stats, "last_at", v))

    # ================================================================ clients

    def on_client(self, route: bytes, msg: Message, now: float) -> None:
        """A decoded request from the frontend. Bad requests get an ERROR reply; anything else
        raised here is a broker bug and propagates."""
        rid = msg.header.get("rid")
        try:
            handler = _CLIENT_HANDLERS.get(msg.command)
            if handler is None:
                raise ProtocolError(f"command {msg.command.name} is not a client request")
            handler(self, route, rid, msg, now)
        except ValueError as exc:  # ProtocolError included: what explicit validation raises
            self.reply_error(route, rid, str(exc) or type(exc).__name__)

    def reply_error(self, route: bytes, rid, error: str) -> None:
        log.info("client_request_refused", error=error)
        self._reply(route, Command.ERROR, {"rid": rid, "error": error})

    def _reply(self, route: bytes, command: Command, header: dict, frames: list | None = None) -> None:
        self._out.clients.append((route, Message(command, header, frames or [])))

    def _on_submit(self, route: bytes, rid, msg: Message, now: float) -> None:
        session = check_name(msg.header.get("session"), "session")
        rejected, aliases, conflicts = [], [], []
        # the loop runs per task: what it calls, looked up once
        known, recent, max_retries, wall = self.tasks.get, self.results.recent, self.max_retries, self.wall
        add, enqueue, needs_of, submitted = self.table.add, self.moves.enqueue, self.moves.needs_of, self.events.submitted
        for raw, frames in records(msg):
            try:
                rec = raw.checked(max_retries)
            except ValueError as exc:
                rejected.append([raw.task_id if isinstance(raw.task_id, str) else None, str(exc)])
                continue
            task_id, name, key = rec.task_id, rec.name, rec.key
            existing = known(task_id)
            if existing is not None:
                if existing.session != session:
                    rejected.append([task_id, "task id already in use by another session"])
                continue  # a resend: accepted once already
            if (session, task_id) in recent:
                continue  # a late resend of a task whose result was fetched already
            digest = None
            if key is not None:
                digest = task_digest(name, rec.args, frames)
                if self._by_key(key, digest, task_id, session, aliases, conflicts, now):
                    continue
            task = Task(task_id, session, name, rec.args, frames, rec.resources, rec.priority, rec.retries,
                        rec.timeout_s, key, now, wall_submitted=wall, digest=digest, retry_on=rec.retry_on,
                        backoff_s=rec.backoff_s)
            add(task)
            enqueue(task, now)
            submitted(task_id, name, needs_of(task), task.priority)
        header = {"rid": rid, "rejected": rejected, "aliases": aliases, "conflicts": conflicts, **self._incarnation}
        defer_ms = msg.header.get(DEFER_ACCEPTED)
        if type(defer_ms) is int and defer_ms > 0 and not (rejected or aliases or conflicts):
            self.results.hold_accepted(session, route, header, now + min(defer_ms, MAX_DEFER_ACCEPTED_MS) / 1000,
                                       [raw.task_id for raw, _ in records(msg)])
        else:
            self._reply(route, Command.ACCEPTED, header)

    def _by_key(self, key: str, digest: bytes, task_id: str, session: str, aliases: list, conflicts: list,
                now: float) -> bool:
        """A submission whose key another task holds already: answered as an alias of that task (or a
        conflict, where the key stands for other work); False where the key is new."""
        first = self._keyed(key, now)
        if first is None:
            return False
        if first.digest is not None and first.digest != digest:
            conflicts.append([task_id, f"key {key!r} belongs to another task ({first.name!r}, id {first.task_id}): "
                                       "a key stands for one task name and its arguments"])
            return True
        aliases.append([task_id, first.task_id])
        if first.session != session and session not in first.watchers:
            first.watchers = first.watchers | {session}
            self.table.mark(first)  # a restarted broker must still deliver to it
        if first.result is not None:  # to this session too: it may have fetched it already
            self.results.deliver(first, session)
        return True

    def _keyed(self, key: str, now: float) -> Task | None:
        """The task first submitted with ``key``: in memory, or a finished one read back from the journal."""
        task = self.table.keyed(key)
        if task is None and self.journal is not None:
            rec = self.journal.keyed(key, self.result_ttl_s)
            if rec is not None:
                task = self.restore_task(rec, now, counted=False)
        return task

    def _on_fetch(self, route: bytes, rid, msg: Message, now: float) -> None:
        session = check_name(msg.header.get("session"), "session")
        acks = msg.header.get("ack") or []
        if not isinstance(acks, list) or not all(isinstance(t, str) for t in acks):
            raise ValueError("ack must be a list of task ids")
        wait_ms = msg.header.get("wait_ms") or 0
        if isinstance(wait_ms, bool) or not isinstance(wait_ms, (int, float)) or not math.isfinite(wait_ms):
            raise ValueError(f"wait_ms must be a finite number, got {wait_ms!r}")  # NaN would stall fetch expiry
        wait_s = min(max(wait_ms / 1000.0, 0.0), MAX_FETCH_WAIT_S)
        limit = check_int(msg.header.get("max") or MAX_RESULTS_PER_REPLY, "max", 1, MAX_RESULTS_PER_REPLY)
        self.results.fetch(session, route, rid, acks, wait_s, limit, now)

    def _on_cancel(self, route: bytes, rid, msg: Message, now: float) -> None:
        session = check_name(msg.header.get("session"), "session")
        ids = msg.header.get("ids") or []
        if not isinstance(ids, list):
            raise ValueError("ids must be a list of task ids")
        terminate = msg.header.get("terminate") is True  # also kill it where it runs on a process slot
        cancelled, refused = [], []
        for task_id in ids:
            task = self.tasks.get(task_id) if isinstance(task_id, str) else None
            if terminate and task is not None and task.session == session and self.moves.terminate(task, now):
                cancelled.append(task_id)
            elif task is None or task.session != session or task.state is not TaskState.QUEUED:
                refused.append(task_id)
            elif task_id in self.leases.held:  # restored after a restart: it may still be running on its worker
                refused.append(task_id)
            else:
                self.moves.cancel(task, now)
                cancelled.append(task_id)
        self._reply(route, Command.CANCELLED, {"rid": rid, "cancelled": cancelled, "refused": refused})

    def _on_status(self, route: bytes, rid, msg: Message, now: float) -> None:
        # the incarnation tells a subscriber resyncing after a gap whether this is still the broker it followed
        self._reply(route, Command.SNAPSHOT, {"rid": rid, "snapshot": self.snapshot(now), **self._incarnation})

    def snapshot(self, now: float) -> dict:
        return self.stats.snapshot(now)

    # ================================================================ workers

    def on_worker(self, wid: bytes, msg: Message, now: float) -> None:
        """A decoded message from the backend. Bad input is dropped and logged."""
        worker = self.workers.get(wid)
        if worker is not None:
            self.leases.heard(worker, now)
        try:
            if msg.command is Command.READY:
                self.leases.join(wid, msg.header, now)
            elif worker is None:
                if msg.command is not Command.DISCONNECT:
                    # a worker we declared dead, or one from before a restart: make it re-announce
                    self._out.workers.append((wid, Message(Command.DISCONNECT, {"reason": "unknown worker, announce again"})))
            elif msg.command is Command.DONE:
                self._on_done(worker, msg, now)
            elif msg.command is Command.HEARTBEAT:
                log.debug("heartbeat_received", worker=worker.name)
            elif msg.command is Command.RETURN:
                self._on_return(worker, msg, now)
            elif msg.command is Command.DISCONNECT:
                self.leases.remove(worker, WorkerState.LEFT, now)
            else:
                raise ProtocolError(f"command {msg.command.name} is not a worker message")
        except ValueError as exc:  # ProtocolError included: what explicit validation raises
            log.warning("worker_message_dropped", worker=worker.name if worker else wid.hex(), error=str(exc))
            current = self.workers.get(wid)  # not ``worker``: a failed READY may have replaced it already
            if current is not None and msg.command is Command.READY:
                self.leases.remove(current, WorkerState.LOST, now)

    def drop_worker_input(self, wid: bytes, error: str, now: float) -> None:
        """Frames from a worker that are not a gridq message at all: drop them, forget the worker."""
        worker = self.workers.get(wid)
        log.warning("worker_message_dropped", worker=worker.name if worker else wid.hex(), error=error)
        if worker is not None:
            self.leases.remove(worker, WorkerState.LOST, now)

    def _on_done(self, worker: Worker, msg: Message, now: float) -> None:
        """The worker's log since its last message, in order: ids of tasks sent ahead that
        started, and results ``[task_id, ok, value, nframes, run_s]``."""
        for entry in records(msg):
            if isinstance(entry, str):
                self.moves.started_ahead(worker, entry, now)
                continue
            rec, frames = entry
            task_id = rec.task_id
            if isinstance(task_id, str) and task_id in worker.ahead:
                self.moves.started_ahead(worker, task_id, now)  # a worker that does not report starts
            elif isinstance(task_id, str) and task_id not in worker.running:
                # finished while this broker was down, the first DONE lost with the old one: resent now
                self.leases.reclaim(task_id, worker, now)
            self.moves.result(worker, rec, frames, now)

    def _on_return(self, worker: Worker, msg: Message, now: float) -> None:
        """Tasks handed back unstarted; with draining, the worker takes nothing new."""
        if msg.header.get("draining"):
            self.leases.drain(worker)
        ids = msg.header.get("ids") or []
        if not isinstance(ids, list):
            raise ProtocolError("RETURN 'ids' must be a list of task ids")
        for task_id in ids:
            if not isinstance(task_id, str):
                continue
            if task_id in worker.ahead:
                self.moves.unsend(worker, task_id, now)
                continue
            held = worker.running.pop(task_id, None)
            if held is None:
                continue
            self.moves.release(worker, held)
            task = self.tasks.get(task_id)
            if task is not None and task.state is TaskState.RUNNING and task.worker == worker.wid:
                self.moves.requeue(task, f"handed back by {worker.name}", now, lost=False)

    # ================================================================ time

    def on_tick(self, now: float, wall: float | None = None) -> None:
        """Heartbeats, expiries, timeouts, stats. Call often (every ~100 ms)."""
        if wall is not None:
            self.wall = wall
        self.leases.tick(now)
        self.moves.expire_deadlines(now)
        self.moves.expire_backoffs(now)
        self.moves.check_unservable(now)
        self.results.expire(now)
        if self.stats.due(now):
            self.sched.prune()
            self.moves.compact_deadlines()
            self.stats.emit(now)
            self.results.tidy()
            if self.journal is not None:
                self.journal.sweep(self.result_ttl_s)

    def next_tick_in(self) -> float:
        return min(0.1, self.heartbeat_s / 4)

    def restore_task(self, rec: dict, now: float, counted: bool = True) -> Task:
        """Take one journaled task back (broker restart, or a keyed result read back). Running
        ones wait for their worker."""
        task = Task(rec["task_id"], rec["session"], rec["name"], rec["args"], rec["frames"], rec["override"],
                    rec["priority"], rec["retries"], rec["timeout_s"], rec["key"], now,
                    attempts=rec["attempts"], worker_name=rec["worker_name"], lost_on=tuple(rec["lost_on"]),
                    watchers=frozenset(rec["watchers"]), wall_submitted=rec["submitted_wall"], digest=rec.get("digest"),
                    retry_on=tuple(rec.get("retry_on") or ()), backoff_s=rec.get("backoff_s"),
                    error_retries=rec.get("error_retries") or 0)
        state = rec["state"]
        if state in TERMINAL:
            task.state = state
            task.result = rec["result"]
            task.args, task.frames = b"", []
            task.finished_at = now
            self.table.add(task, restored=True, counted=counted)
            self.results.finished(task, now, ttl_s=max(0.0, rec["ttl_left_s"] or 0.0), deliver=not rec["acked"])
            return task
        self.table.add(task, restored=True)
        if state in (TaskState.RUNNING, TaskState.DISPATCHED) and task.worker_name:
            self.leases.hold_for(task.task_id, task.worker_name, now)
        else:
            self.moves.enqueue(task, now)
        return task

    # ================================================================ flush

    def flush(self, now: float, send_events: bool = True) -> Outgoing:
        """Dispatch what fits, deliver finished results, hand over all output. With ``send_events``
        False the events are held for a later flush (the loop's choice: fewer, longer messages
        while more input waits); they are numbered already and put in runs when they go."""
        if self.moves.dirty:
            self.moves.dispatch(now)
        self.results.flush()
        if self.results.has_held:
            self.results.release_held(now, self._running)
        out = self._out.take()
        if send_events:
            out.events = self.events.take()
        return out

    def _running(self, task_id: str) -> bool:
        task = self.tasks.get(task_id)
        return task is not None and task.state is TaskState.RUNNING

    @property
    def events_held(self) -> int:
        """Events held for a later flush."""
        return self.events.held

    def shutdown(self) -> None:
        """Tell every worker the broker is going away; send the ACCEPTEDs held back."""
        self.results.release_held(math.inf)
        for worker in self.workers.values():
            self._out.workers.append((worker.wid, Message(Command.DISCONNECT, {"reason": "broker stopping"})))


_CLIENT_HANDLERS = {
    Command.SUBMIT: Core._on_submit,
    Command.FETCH: Core._on_fetch,
    Command.CANCEL: Core._on_cancel,
    Command.STATUS: Core._on_status,
}
