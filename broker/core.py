"""The broker's pure state machine: tasks, workers, sessions; (message, now) in, messages out.

It owns no socket and reads no clock. The server loop feeds it decoded messages
with ``on_client``/``on_worker``/``on_tick`` and then calls ``flush(now)``, which
runs dispatch and returns everything to send: replies to clients, batches to
workers and events. Replies go out only after the journal commits, so an
ACCEPTED means durable.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.protocol import (MAX_NAME_LEN, NAME_IN_USE, SUBMIT_FIELDS, Command, Message, ProtocolError,
                             check_resources, hold, split_frames)
from broker.scheduler import DEFAULT_NEEDS, Scheduler, class_key, fits, missing
from broker.states import TERMINAL, TaskState, WorkerState, check_task_move, check_worker_move

log = structlog.get_logger(__name__)

#: most tasks returned in one RESULTS reply
MAX_RESULTS_PER_REPLY = 5000
#: longest a FETCH may wait for results, in seconds
MAX_FETCH_WAIT_S = 60.0
#: highest retries a submission may ask for
MAX_RETRIES = 100
#: how many recent completions the stats window keeps
STATS_WINDOW = 2048
#: how long a task whose result was fetched is still remembered (to recognise late resends)
ACKED_GRACE_S = 120.0
#: tasks a busy worker may hold ahead of its slots, per slot (sent ahead, started when a slot frees)
AHEAD_PER_SLOT = 64
#: only tasks whose name runs shorter than this on average are sent ahead, so a
#: task never waits long behind another on a busy worker while one is idle
AHEAD_MAX_RUN_S = 0.005
#: at most this much (estimated) work waits ahead per slot of a worker
AHEAD_MAX_WAIT_S = 0.02


@dataclass(eq=False, slots=True)
class Task:
    task_id: str
    session: str
    name: str
    args: bytes  #: opaque msgpack blob, never decoded by the broker
    frames: list  #: payload frames the blob references, forwarded as they are
    override: dict | None  #: resources given at submission, or None
    priority: int
    retries: int
    timeout_s: float | None
    key: str | None
    submitted_at: float
    state: TaskState = TaskState.QUEUED
    attempts: int = 0
    worker: str | None = None  #: worker id holding it while RUNNING
    worker_name: str | None = None
    needs: dict | None = None  #: resources held on its worker while RUNNING
    started_at: float | None = None
    queued_s: float = 0.0
    lost_on: list = field(default_factory=list)  #: names of workers that died holding it
    watchers: set = field(default_factory=set)  #: other sessions submitted with its key
    result: tuple | None = None  #: (status, value, frames, info) once terminal
    finished_at: float | None = None
    cls: Any = None  #: its TaskClass while queued
    wall_submitted: float = 0.0  #: unix time of acceptance (journal)

    def move(self, new: TaskState) -> None:
        check_task_move(self.task_id, self.state, new)
        self.state = new


@dataclass(eq=False, slots=True)
class Worker:
    wid: bytes  #: socket routing id on the backend
    name: str
    resources: dict  #: total offered
    free: dict  #: not held by running tasks
    slots: int
    serves: dict  #: task name -> declared resources
    expires_at: float
    state: WorkerState = WorkerState.READY
    running: dict = field(default_factory=dict)  #: task_id -> resources held
    ahead: dict = field(default_factory=dict)  #: task_id -> needs: sent ahead, not started, holds nothing
    tiebreak: int = 0
    served: int = 0
    pid: int | None = None  #: its process id as it announced it (tells two workers of one name apart)
    last_heard: float = 0.0
    last_sent: float = 0.0

    def could_serve(self, name: str, needs: dict) -> bool:
        return name in self.serves and not missing(needs, self.resources)

    def load(self) -> float:
        return len(self.running) / self.slots

    def has_free_slot(self) -> bool:
        # tasks sent ahead start first on the worker (FIFO): nothing may overtake them
        return self.state is WorkerState.READY and len(self.running) < self.slots and not self.ahead

    def load_ahead(self) -> float:
        return (len(self.running) + len(self.ahead)) / self.slots

    def wants_refill(self) -> bool:
        # refill only once half drained: one TASKS message then carries many tasks
        return self.state is WorkerState.READY and len(self.ahead) <= AHEAD_PER_SLOT * self.slots // 2

    def has_room_ahead(self) -> bool:
        return self.state is WorkerState.READY and len(self.ahead) < AHEAD_PER_SLOT * self.slots

    def move(self, new: WorkerState) -> None:
        check_worker_move(self.name, self.state, new)
        self.state = new


@dataclass(eq=False, slots=True)
class Session:
    """A client's mailbox: finished task ids to deliver, and a parked FETCH."""

    sid: str
    outbox: OrderedDict = field(default_factory=OrderedDict)  #: task_id -> None
    fetch: tuple | None = None  #: (route, rid, max, expires_at)


@dataclass(slots=True)
class Outgoing:
    """What one flush asks the loop to send."""

    clients: list = field(default_factory=list)  #: (route, Message)
    workers: list = field(default_factory=list)  #: (wid, Message)
    events: list = field(default_factory=list)  #: (topic, dict)


class Core:
    """All broker decisions. Methods take ``now`` (monotonic seconds) and a
    wall-clock ``wall`` only where an event needs a timestamp."""

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
        self.tasks: dict[str, Task] = {}
        self.keys: dict[str, str] = {}  #: idempotency key -> task id
        self.workers: dict[bytes, Worker] = {}
        self.sessions: dict[str, Session] = {}
        self.sched = Scheduler()
        self.seq = 0  #: last event sequence number used
        self.publish = True  #: build event maps (off while nobody subscribes)
        self.wall = 0.0  #: unix time of the latest call, for event timestamps
        self.counts = {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        self._out = Outgoing()
        self._new_results: set = set()  #: sessions with results since the last flush
        self._ready: dict[bytes, Worker] = {}  #: workers that may have a free slot
        self._dirty_dispatch = False
        self._deadlines: list = []  #: (deadline, task_id, attempt) of running tasks with a timeout
        self._fetch_expiry: list = []  #: (expires_at, seq, sid, rid); seq: rids are peer data, never compared
        self._fetch_seq = 0
        #: finished tasks -> when they are forgotten: after --result-ttl, or soon after their result
        #: was fetched; insertion order is expiry order (each delay is a constant)
        self._expiry: OrderedDict = OrderedDict()
        self._acked_expiry: OrderedDict = OrderedDict()
        self._tiebreak = 0
        self._recent: deque = deque(maxlen=STATS_WINDOW)  #: (finished_at, queued_s, run_s)
        self._last_stats_at: float | None = None
        #: task_id -> (worker name, until): tasks a restarted broker found running; their
        #: worker may claim them back when it rejoins, else they count as lost
        self._held: dict[str, tuple[str, float]] = {}
        self._ahead_count = 0  #: tasks in DISPATCHED state
        self._run_s: dict[str, float] = {}  #: task name -> moving average of its run time

    # ================================================================ clients

    def on_client(self, route: bytes, msg: Message, now: float) -> None:
        """A decoded request from the frontend. Bad requests get an ERROR reply."""
        rid = msg.header.get("rid")
        try:
            handler = _CLIENT_HANDLERS.get(msg.command)
            if handler is None:
                raise ProtocolError(f"command {msg.command.name} is not a client request")
            handler(self, route, rid, msg, now)
        except (ProtocolError, TypeError, ValueError, KeyError, AttributeError) as exc:
            self.reply_error(route, rid, str(exc) or type(exc).__name__)

    def reply_error(self, route: bytes, rid, error: str) -> None:
        log.info("client_request_refused", error=error)
        self._out.clients.append((route, Message(Command.ERROR, {"rid": rid, "error": error})))

    def _reply(self, route: bytes, command: Command, header: dict, frames: list | None = None) -> None:
        self._out.clients.append((route, Message(command, header, frames or [])))

    def _on_submit(self, route: bytes, rid, msg: Message, now: float) -> None:
        session = _name(msg.header.get("session"), "session")
        records = msg.header.get("tasks")
        if not isinstance(records, list):
            raise ProtocolError("SUBMIT needs a list 'tasks'")
        counts = []
        for rec in records:
            if not isinstance(rec, list) or len(rec) != len(SUBMIT_FIELDS):
                raise ProtocolError(f"each task is a list of {len(SUBMIT_FIELDS)} fields {SUBMIT_FIELDS}")
            if not isinstance(rec[3], int) or rec[3] < 0:
                raise ProtocolError("nframes must be a non-negative integer")
            counts.append(rec[3])
        per_task = split_frames(msg.frames, counts)
        rejected, aliases = [], []
        for rec, frames in zip(records, per_task):
            task_id, name, args, _n, resources, priority, retries, timeout_s, key = rec
            try:
                task_id = _name(task_id, "task_id")
                name = _name(name, "task name")
                if not isinstance(args, bytes):
                    raise ValueError("args must be a msgpack blob (bytes)")
                override = None if resources is None else check_resources(resources)
                priority = _int(priority, "priority", -(2**31), 2**31)
                retries = self.max_retries if retries is None else _int(retries, "retries", 0, MAX_RETRIES)
                if timeout_s is not None:
                    timeout_s = _positive(timeout_s, "timeout")
                if key is not None:
                    key = _name(key, "key")
            except (ValueError, TypeError) as exc:
                rejected.append([task_id if isinstance(task_id, str) else None, str(exc)])
                continue
            existing = self.tasks.get(task_id)
            if existing is not None:
                if existing.session != session:
                    rejected.append([task_id, "task id already in use by another session"])
                continue  # a resend: accepted once already
            if key is not None and key in self.keys and self.keys[key] in self.tasks:
                first = self.tasks[self.keys[key]]
                aliases.append([task_id, first.task_id])
                if first.session != session and session not in first.watchers:
                    first.watchers.add(session)
                    if self.journal is not None:
                        self.journal.state(first)  # a restarted broker must still deliver to it
                if first.result is not None:  # to this session too: it may have fetched it already
                    self._deliver(first, session)
                continue
            task = Task(task_id, session, name, args, frames, override, priority, retries, timeout_s, key, now,
                        wall_submitted=self.wall)
            self.tasks[task_id] = task
            if key is not None:
                self.keys[key] = task_id
            self._enqueue(task, now)
            self.counts["queued"] += 1
            if self.journal is not None:
                self.journal.accepted(task)
            self._event("task.submitted", task_id=task_id, name=name,
                        resources=override if override is not None else self.sched.declared.get(name, DEFAULT_NEEDS),
                        priority=priority)
        self._reply(route, Command.ACCEPTED, {"rid": rid, "rejected": rejected, "aliases": aliases,
                                              **self._incarnation})

    def _on_fetch(self, route: bytes, rid, msg: Message, now: float) -> None:
        sess = self._session(_name(msg.header.get("session"), "session"))
        for task_id in msg.header.get("ack") or ():
            if sess.outbox.pop(task_id, 0) is None:
                self._acked(task_id, sess.sid, now)
        wait_ms = msg.header.get("wait_ms") or 0
        if isinstance(wait_ms, bool) or not isinstance(wait_ms, (int, float)) or not math.isfinite(wait_ms):
            raise ValueError(f"wait_ms must be a finite number, got {wait_ms!r}")  # NaN would stall fetch expiry
        wait_s = min(max(wait_ms / 1000.0, 0.0), MAX_FETCH_WAIT_S)
        limit = _int(msg.header.get("max") or MAX_RESULTS_PER_REPLY, "max", 1, MAX_RESULTS_PER_REPLY)
        if sess.fetch is not None:  # a newer fetch replaces a parked one (client resent)
            old_route, old_rid, _, _ = sess.fetch
            self._reply(old_route, Command.RESULTS, {"rid": old_rid, "results": [], **self._incarnation})
            sess.fetch = None
        if sess.outbox or wait_s <= 0:
            self._send_results(sess, route, rid, limit)
        else:
            sess.fetch = (route, rid, limit, now + wait_s)
            self._fetch_seq += 1
            heapq.heappush(self._fetch_expiry, (now + wait_s, self._fetch_seq, sess.sid, rid))

    def _on_cancel(self, route: bytes, rid, msg: Message, now: float) -> None:
        session = _name(msg.header.get("session"), "session")
        cancelled, refused = [], []
        for task_id in msg.header.get("ids") or ():
            task = self.tasks.get(task_id) if isinstance(task_id, str) else None
            if task is None or task.session != session or task.state is not TaskState.QUEUED:
                refused.append(task_id)
                continue
            if task_id in self._held:  # restored after a restart: it may still be running on its worker
                refused.append(task_id)
                continue
            self.sched.discard(task.cls)
            self.counts["queued"] -= 1
            self._finish(task, TaskState.CANCELLED, None, [], now)
            cancelled.append(task_id)
            self._event("task.cancelled", task_id=task_id, name=task.name, resources=self._needs_of(task))
        self._reply(route, Command.CANCELLED, {"rid": rid, "cancelled": cancelled, "refused": refused})

    def _on_status(self, route: bytes, rid, msg: Message, now: float) -> None:
        self._reply(route, Command.SNAPSHOT, {"rid": rid, "snapshot": self.snapshot(now)})

    def snapshot(self, now: float) -> dict:
        # copies, not the live dicts: the reply is encoded after later messages of this loop turn
        workers, running = [], []
        for w in self.workers.values():
            workers.append({
                "name": w.name, "resources": dict(w.resources), "free": dict(w.free), "slots": w.slots,
                "running": len(w.running), "tasks": w.served, "serves": sorted(w.serves),
                "state": w.state.value, "heartbeat_age_s": round(max(now - w.last_heard, 0.0), 3),
            })
            for task_id, held in w.running.items():
                task = self.tasks.get(task_id)
                if task is not None and task.state is TaskState.RUNNING and task.worker == w.wid:
                    running.append({"task_id": task_id, "name": task.name, "worker": w.name, "attempt": task.attempts,
                                    "resources": dict(held), "running_s": round(max(now - (task.started_at or now), 0.0), 3)})
        return {"seq": self.seq, "workers": workers, "queues": self._queues(), **self.counts, "running_tasks": running}

    def _queues(self) -> dict:
        """Per resource, how many queued tasks ask for it."""
        queues: dict = {}
        for cls in self.sched.pending():
            for res in cls.needs(self.sched.declared):
                queues[res] = queues.get(res, 0) + cls.queued
        for w in self.workers.values():  # sent ahead: still waiting (and counted as queued) until task.started
            for needs in w.ahead.values():
                for res in needs:
                    queues[res] = queues.get(res, 0) + 1
        return queues

    # ================================================================ workers

    def on_worker(self, wid: bytes, msg: Message, now: float) -> None:
        """A decoded message from the backend. Bad input is dropped and logged."""
        worker = self.workers.get(wid)
        if worker is not None:
            worker.expires_at = now + self.heartbeat_s * self.liveness
            worker.last_heard = now
        try:
            if msg.command is Command.READY:
                self._on_ready(wid, msg, now)
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
                self._remove_worker(worker, WorkerState.LEFT, now)
            else:
                raise ProtocolError(f"command {msg.command.name} is not a worker message")
        except (ProtocolError, TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("worker_message_dropped", worker=worker.name if worker else wid.hex(), error=str(exc))
            current = self.workers.get(wid)  # not ``worker``: a failed READY may have replaced it already
            if current is not None and msg.command is Command.READY:
                self._remove_worker(current, WorkerState.LOST, now)

    def drop_worker_input(self, wid: bytes, error: str, now: float) -> None:
        """Frames from a worker that are not a gridq message at all: drop them, forget the worker."""
        worker = self.workers.get(wid)
        log.warning("worker_message_dropped", worker=worker.name if worker else wid.hex(), error=error)
        if worker is not None:
            self._remove_worker(worker, WorkerState.LOST, now)

    def _on_ready(self, wid: bytes, msg: Message, now: float) -> None:
        h = msg.header
        name = _name(h.get("name"), "worker name")
        slots = _int(h.get("slots"), "slots", 1, 1_000_000)
        resources = check_resources(h.get("resources") or {})
        resources.setdefault("cpu", slots)
        serves = h.get("tasks")
        if not isinstance(serves, dict) or not serves:
            raise ProtocolError("READY needs a map 'tasks' of task name -> resources")
        serves = {_name(n, "task name"): check_resources(r if r is not None else DEFAULT_NEEDS) for n, r in serves.items()}
        listed = [t for t in (h.get("running") or ()) if isinstance(t, str)]
        claims = set(listed)
        self._tiebreak += 1
        pid = h.get("pid") if isinstance(h.get("pid"), int) else None
        worker = Worker(wid, name, resources, dict(resources), slots, serves, now + self.heartbeat_s * self.liveness,
                        tiebreak=self._tiebreak, last_heard=now, last_sent=now, pid=pid)
        for old in list(self.workers.values()):
            if old.wid == wid:
                # the same connection announcing again (told to, maybe more than once): tasks sent to
                # it since are still on their way to it, in order, so none of them is lost
                self._hand_over(old, worker, claims | set(old.running) | set(old.ahead))
                worker.served = old.served
                self.workers.pop(wid)
                self.sched.worker_gone(old)
            elif old.name == name:  # the same worker on a fresh socket: what it does not claim is lost
                if old.pid is not None and pid != old.pid and now - old.last_heard < self.heartbeat_s:
                    # another live process under the same name: two workers must not evict each other
                    reason = f"{NAME_IN_USE}: {name!r} belongs to a live worker (pid {old.pid})"
                    log.warning("worker_refused", worker=name, pid=pid, reason=reason)
                    self._out.workers.append((wid, Message(Command.DISCONNECT, {"reason": reason})))
                    return
                self._hand_over(old, worker, claims)
                self._remove_worker(old, WorkerState.LOST, now)
        self.workers[wid] = worker
        self.sched.declare(serves, self.workers.values())
        self.sched.worker_joined(worker)
        # tasks it still holds that a restarted broker restored; the worker lists those waiting
        # in its queue first, so the last ones get its slots and the others wait as sent ahead
        for task_id in reversed(listed):
            self._reclaim(task_id, worker, now, may_wait=True)
        self._ready[wid] = worker
        self._dirty_dispatch = True
        self._event("worker.joined", worker=name, resources=resources, slots=slots, tasks=sorted(serves))
        log.info("worker_joined", worker=name, resources=resources, slots=slots)

    def _reclaim(self, task_id: str, worker: Worker, now: float, may_wait: bool = False) -> bool:
        """A task this broker restored as running on ``worker``'s name is that worker's again:
        running, or with ``may_wait`` and no room left on it, waiting there as if sent ahead."""
        held = self._held.get(task_id)
        if held is None or held[0] != worker.name:
            return False
        del self._held[task_id]
        task = self.tasks[task_id]
        needs = self._needs_of(task)
        if may_wait and not (len(worker.running) < worker.slots and fits(needs, worker.free)):
            self._bind(task, worker, needs)
            task.move(TaskState.DISPATCHED)
            worker.ahead[task_id] = needs
            self._ahead_count += 1
            if self.journal is not None:
                self.journal.state(task)
        else:
            self._start(task, worker, needs, now, announce=False)
        return True

    def _hand_over(self, old: Worker, new: Worker, claims: set) -> None:
        """Move the tasks that a rejoining worker says it still runs to its new registration."""
        for task_id in [t for t in old.running if t in claims]:
            held = old.running.pop(task_id)
            self._release(old, held)
            new.running[task_id] = held  # held even if it timed out here: the worker still runs it
            hold(new.free, held, -1)
            task = self.tasks.get(task_id)
            if task is not None and task.state is TaskState.RUNNING and task.worker == old.wid:
                task.worker = new.wid
        for task_id in [t for t in old.ahead if t in claims]:
            task = self.tasks.get(task_id)
            new.ahead[task_id] = old.ahead.pop(task_id)
            if task is not None:
                task.worker = new.wid

    def _on_done(self, worker: Worker, msg: Message, now: float) -> None:
        """The worker's log since its last message, in order: ids of tasks sent ahead that
        started, and results ``[task_id, ok, value, nframes, run_s]``."""
        entries = msg.header.get("log", msg.header.get("results"))
        if not isinstance(entries, list):
            raise ProtocolError("DONE needs a list 'log'")
        counts = []
        for rec in entries:
            if isinstance(rec, str):
                continue
            if not isinstance(rec, list) or len(rec) != 5 or not isinstance(rec[3], int) or rec[3] < 0:
                raise ProtocolError("each result is [task_id, ok, value, nframes, run_s]")
            counts.append(rec[3])
        per_task = iter(split_frames(msg.frames, counts))
        for rec in entries:
            if isinstance(rec, str):
                self._started_ahead(worker, rec, now)
            else:
                self._result(worker, rec, next(per_task), now)

    def _started_ahead(self, worker: Worker, task_id: str, now: float) -> None:
        if worker.ahead.pop(task_id, None) is None:
            return  # started at once (no report needed) or not ours
        self._ahead_count -= 1
        task = self.tasks.get(task_id)
        if task is not None and task.state is TaskState.DISPATCHED and task.worker == worker.wid:
            self._begin(task, worker, now, announce=True)

    def _result(self, worker: Worker, rec: list, frames: list, now: float) -> None:
        task_id, ok, value, _n, run_s = rec
        if isinstance(task_id, str) and task_id in worker.ahead:
            self._started_ahead(worker, task_id, now)  # a worker that does not report starts
        elif isinstance(task_id, str) and task_id not in worker.running:
            # finished while this broker was down, the first DONE lost with the old one: resent now
            self._reclaim(task_id, worker, now)
        held = worker.running.pop(task_id, None) if isinstance(task_id, str) else None
        if held is None:
            log.warning("result_for_task_not_held", worker=worker.name, task_id=task_id)
            return
        self._release(worker, held)
        worker.served += 1
        task = self.tasks.get(task_id)
        if task is None or task.state is not TaskState.RUNNING or task.worker != worker.wid:
            return  # timed out meanwhile: its slot is free again, the result is late
        run_s = float(run_s) if isinstance(run_s, (int, float)) and 0 <= run_s < math.inf else 0.0
        average = self._run_s.get(task.name)
        self._run_s[task.name] = run_s if average is None else 0.8 * average + 0.2 * run_s
        self.counts["running"] -= 1
        info = self._info(task, run_s)
        if ok:
            self._finish(task, TaskState.SUCCEEDED, value, frames, now, info)
            self._event("task.succeeded", task_id=task_id, name=task.name, worker=worker.name, run_s=run_s)
        else:
            error = value if isinstance(value, dict) else {"type": "TaskError", "message": str(value)}
            self._finish(task, TaskState.FAILED, error, [], now, info)
            self._failed_event(task, worker.name, error)
        self._recent.append((now, task.queued_s, run_s))

    def _on_return(self, worker: Worker, msg: Message, now: float) -> None:
        """Tasks handed back unstarted; with draining, the worker takes nothing new."""
        if msg.header.get("draining") and worker.state is WorkerState.READY:
            worker.move(WorkerState.DRAINING)
            self._ready.pop(worker.wid, None)
        for task_id in msg.header.get("ids") or ():
            if not isinstance(task_id, str):
                continue
            if task_id in worker.ahead:
                self._unsend(worker, task_id, now)
                continue
            held = worker.running.pop(task_id, None)
            if held is None:
                continue
            self._release(worker, held)
            task = self.tasks.get(task_id)
            if task is not None and task.state is TaskState.RUNNING and task.worker == worker.wid:
                self._requeue(task, f"handed back by {worker.name}", now, lost=False)

    # ================================================================ time

    def on_tick(self, now: float, wall: float | None = None) -> None:
        """Heartbeats, expiries, timeouts, stats. Call often (every ~100 ms)."""
        if wall is not None:
            self.wall = wall
        for worker in list(self.workers.values()):
            if now >= worker.expires_at:
                log.warning("worker_expired", worker=worker.name, requeued=list(worker.running))
                self._remove_worker(worker, WorkerState.LOST, now)
            elif now - worker.last_sent >= self.heartbeat_s:
                self._out.workers.append((worker.wid, Message(Command.HEARTBEAT, {})))
                log.debug("heartbeat_sent", worker=worker.name)
                worker.last_sent = now
        while self._deadlines and self._deadlines[0][0] <= now:
            _, task_id, attempt = heapq.heappop(self._deadlines)
            task = self.tasks.get(task_id)
            if task is not None and task.state is TaskState.RUNNING and task.attempts == attempt:
                self._fail_running(task, "TaskTimeout", f"task {task_id} ran past its timeout of {task.timeout_s} s", now)
        while self._fetch_expiry and self._fetch_expiry[0][0] <= now:
            _, _, sid, rid = heapq.heappop(self._fetch_expiry)
            sess = self.sessions.get(sid)
            if sess is not None and sess.fetch is not None and sess.fetch[1] is rid:  # its own FETCH (a NaN rid != itself)
                route, _, _, _ = sess.fetch
                sess.fetch = None
                self._reply(route, Command.RESULTS, {"rid": rid, "results": [], **self._incarnation})
        if self._held:
            self._expire_holds(now)
        self._check_unservable(now)
        for expiry in (self._expiry, self._acked_expiry):
            while expiry and next(iter(expiry.values())) <= now:
                task_id, _ = expiry.popitem(last=False)
                task = self.tasks.get(task_id)
                if task is not None and task.state in TERMINAL:
                    self._forget(task)
        if self._last_stats_at is None or now - self._last_stats_at >= 1.0:
            self._last_stats_at = now
            self.sched.prune()
            self._compact_timers()
            self._stats(now)
            self._forget_idle_sessions()

    def _forget_idle_sessions(self) -> None:
        """Drop sessions with nothing to deliver and no parked FETCH; ``_deliver`` makes them again."""
        idle = [sid for sid, sess in self.sessions.items() if not sess.outbox and sess.fetch is None]
        for sid in idle:
            del self.sessions[sid]

    def _expire_holds(self, now: float) -> None:
        for task_id, (name, until) in list(self._held.items()):
            if now < until:
                continue
            del self._held[task_id]
            task = self.tasks[task_id]
            task.move(TaskState.RUNNING)  # as it was before the restart, so the loss counts
            self.counts["queued"] -= 1
            self.counts["running"] += 1
            task.worker_name = name
            self._requeue(task, f"worker {name} did not come back after the broker restarted", now, lost=True)

    def restore_task(self, rec: dict, now: float) -> None:
        """Take one journaled task back (broker restart). Running ones wait for their worker."""
        task = Task(rec["task_id"], rec["session"], rec["name"], rec["args"], rec["frames"], rec["override"],
                    rec["priority"], rec["retries"], rec["timeout_s"], rec["key"], now,
                    attempts=rec["attempts"], worker_name=rec["worker_name"], lost_on=rec["lost_on"],
                    watchers=rec["watchers"], wall_submitted=rec["submitted_wall"])
        self.tasks[task.task_id] = task
        if task.key is not None:
            self.keys[task.key] = task.task_id
        state = rec["state"]
        if state in TERMINAL:
            task.state = state
            task.result = rec["result"]
            task.args, task.frames = b"", []
            task.finished_at = now
            self.counts["done" if state is TaskState.SUCCEEDED else "failed" if state is TaskState.FAILED else "cancelled"] += 1
            if not rec["acked"]:
                for sid in (task.session, *task.watchers):
                    self._deliver(task, sid)
            self._expiry[task.task_id] = now + max(0.0, rec["ttl_left_s"] or 0.0)
            return
        self.counts["queued"] += 1
        if state in (TaskState.RUNNING, TaskState.DISPATCHED) and task.worker_name:
            self._held[task.task_id] = (task.worker_name, now + 2 * self.heartbeat_s * self.liveness)
        else:
            self._enqueue(task, now)

    def next_tick_in(self) -> float:
        return min(0.1, self.heartbeat_s / 4)

    def _check_unservable(self, now: float) -> None:
        for cls in list(self.sched.pending()):
            if cls.eligible:
                cls.unservable_since = None
                continue
            if cls.unservable_since is None:
                cls.unservable_since = now
                continue
            if now - cls.unservable_since < self.no_worker_timeout_s:
                continue
            reason = self._why_unservable(cls)
            for _, _, task_id in cls.entries():
                task = self.tasks.get(task_id)
                if task is not None and task.state is TaskState.QUEUED:
                    self.sched.discard(cls)
                    self.counts["queued"] -= 1
                    error = {"type": "NoWorkerAvailable", "message": reason, "traceback": ""}
                    self._finish(task, TaskState.FAILED, error, [], now, self._info(task, 0.0))
                    self._failed_event(task, None, error)
            cls.clear()
            cls.unservable_since = None

    def _why_unservable(self, cls) -> str:
        serving = [w for w in self.workers.values() if cls.name in w.serves]
        if not serving:
            return f"no connected worker serves task {cls.name!r} (waited {self.no_worker_timeout_s:g} s)"
        needs = cls.needs(self.sched.declared)
        gaps = {}
        for w in serving:
            for res, qty in missing(needs, w.resources).items():
                gaps[res] = max(gaps.get(res, 0), w.resources.get(res, 0))
        wanted = ", ".join(f"{r}={needs[r]:g}" for r in sorted(gaps))
        offered = ", ".join(f"{r}={gaps[r]:g}" for r in sorted(gaps))
        return (f"no connected worker serving {cls.name!r} offers {wanted} "
                f"(the most offered: {offered}; waited {self.no_worker_timeout_s:g} s)")

    # ================================================================ flush

    def flush(self, now: float) -> Outgoing:
        """Dispatch what fits, deliver finished results, hand over all output."""
        if self._dirty_dispatch:
            self._dispatch(now)
        for sess in self._new_results:
            if sess.fetch is not None and sess.outbox:
                route, rid, limit, _ = sess.fetch
                sess.fetch = None
                self._send_results(sess, route, rid, limit)
        self._new_results.clear()
        out, self._out = self._out, Outgoing()
        return out

    def _dispatch(self, now: float) -> None:
        self._dirty_dispatch = False
        ready = [w for w in self._ready.values() if w.has_free_slot()]
        self._ready = {w.wid: w for w in ready}
        batches: dict[bytes, list] = {}
        for worker, task_id, needs in self.sched.dispatch(ready, self._is_queued):
            task = self.tasks[task_id]
            self._start(task, worker, needs, now)
            batches.setdefault(worker.wid, []).append((task, False))
            if not worker.has_free_slot():
                self._ready.pop(worker.wid, None)
        if self.counts["queued"] > self._ahead_count:
            busy = [w for w in self.workers.values() if w.wants_refill()]
            for worker, task_id, needs in self.sched.send_ahead(busy, self._is_queued, self._short):
                task = self.tasks[task_id]
                self._send_ahead(task, worker, needs)
                batches.setdefault(worker.wid, []).append((task, True))
        for wid, tasks in batches.items():
            records, frames = [], []
            for t, ahead in tasks:
                records.append([t.task_id, t.name, t.args, len(t.frames), t.attempts, t.needs, ahead])
                frames.extend(t.frames)
            self._out.workers.append((wid, Message(Command.TASKS, {"tasks": records}, frames)))
            self.workers[wid].last_sent = now

    def _short(self, cls, worker: Worker) -> bool:
        """May one more task of ``cls`` wait ahead on ``worker``? Only a short one, only behind
        short ones (a task never waits ahead behind a long or unknown one), and only as many as
        amount to AHEAD_MAX_WAIT_S of work per slot."""
        run_s = self._run_s.get(cls.name)
        if run_s is None or run_s >= AHEAD_MAX_RUN_S or (len(worker.ahead) + 1) * run_s > AHEAD_MAX_WAIT_S * worker.slots:
            return False
        for task_id in worker.running:
            task = self.tasks.get(task_id)
            ahead_of = self._run_s.get(task.name) if task is not None else None
            if ahead_of is None or ahead_of >= AHEAD_MAX_RUN_S:
                return False
        return True

    def _is_queued(self, task_id: str) -> bool:
        task = self.tasks.get(task_id)
        return task is not None and task.state is TaskState.QUEUED

    # ================================================================ moves

    def _start(self, task: Task, worker: Worker, needs: dict, now: float, announce: bool = True) -> None:
        """The task starts on ``worker`` now (it has a free slot and resources)."""
        if announce:
            task.attempts += 1
        self._bind(task, worker, needs)
        self._begin(task, worker, now, announce)

    def _send_ahead(self, task: Task, worker: Worker, needs: dict) -> None:
        """The task waits on busy ``worker`` to start when a slot frees; it holds nothing yet."""
        task.attempts += 1
        self._bind(task, worker, needs)
        task.move(TaskState.DISPATCHED)
        worker.ahead[task.task_id] = needs
        self._ahead_count += 1
        if self.journal is not None:
            self.journal.state(task)

    def _bind(self, task: Task, worker: Worker, needs: dict) -> None:
        task.cls = None
        task.worker = worker.wid
        task.worker_name = worker.name
        task.needs = needs

    def _begin(self, task: Task, worker: Worker, now: float, announce: bool) -> None:
        needs = task.needs
        task.move(TaskState.RUNNING)
        self.counts["queued"] -= 1
        task.started_at = now
        task.queued_s = now - task.submitted_at
        worker.running[task.task_id] = needs
        hold(worker.free, needs, -1)
        self.counts["running"] += 1
        if task.timeout_s is not None:
            heapq.heappush(self._deadlines, (now + task.timeout_s, task.task_id, task.attempts))
        if self.journal is not None:
            self.journal.state(task)
        if announce:
            self._event("task.started", task_id=task.task_id, name=task.name, worker=worker.name, attempt=task.attempts,
                        resources=needs)

    def _release(self, worker: Worker, held: dict) -> None:
        if worker.running:
            hold(worker.free, held, +1)
        else:  # idle: exactly what it offers, whatever float rounding the holds left behind
            worker.free.clear()
            worker.free.update(worker.resources)
        if worker.state is WorkerState.READY:
            self._ready[worker.wid] = worker
            self._dirty_dispatch = True

    def _enqueue(self, task: Task, now: float) -> None:
        task.cls = cls = self.sched.push(class_key(task.name, task.override), task.name, task.override,
                                         task.priority, task.task_id, self.workers.values())
        if not cls.eligible and cls.unservable_since is None:
            cls.unservable_since = now  # --no-worker-timeout counts from here
        self._dirty_dispatch = True

    def _needs_of(self, task: Task) -> dict:
        return task.override if task.override is not None else self.sched.declared.get(task.name, DEFAULT_NEEDS)

    def _requeue(self, task: Task, reason: str, now: float, lost: bool) -> None:
        """A RUNNING task whose worker is gone or handed it back: queue again, or fail as lost."""
        self.counts["running"] -= 1
        if lost:
            task.lost_on.append(task.worker_name)
        if lost and len(task.lost_on) > task.retries:
            error = {"type": "TaskLost", "traceback": "",
                     "message": f"task {task.task_id} lost its worker {len(task.lost_on)} times "
                                f"(retries={task.retries}); workers: {', '.join(task.lost_on)}"}
            self._finish(task, TaskState.FAILED, error, [], now, self._info(task, 0.0))
            self._failed_event(task, task.worker_name, error)
            return
        task.move(TaskState.QUEUED)
        task.worker = None
        task.submitted_at = now  # queued_s counts from the latest queueing
        self.counts["queued"] += 1
        self._enqueue(task, now)
        if self.journal is not None:
            self.journal.state(task)
        self._event("task.retried", task_id=task.task_id, name=task.name, reason=reason)

    def _unsend(self, worker: Worker, task_id: str, now: float) -> bool:
        """A task sent ahead comes back unstarted: queue it again as if never sent."""
        worker.ahead.pop(task_id, None)
        self._ahead_count -= 1
        task = self.tasks.get(task_id)
        if task is None or task.state is not TaskState.DISPATCHED or task.worker != worker.wid:
            return False
        task.move(TaskState.QUEUED)
        task.attempts -= 1
        task.worker = None
        self._enqueue(task, now)
        if self.journal is not None:
            self.journal.state(task)
        return True

    def _fail_running(self, task: Task, kind: str, message: str, now: float) -> None:
        self.counts["running"] -= 1
        error = {"type": kind, "message": message, "traceback": ""}
        self._finish(task, TaskState.FAILED, error, [], now, self._info(task, now - (task.started_at or now)))
        self._failed_event(task, task.worker_name, error)

    def _finish(self, task: Task, state: TaskState, value, frames: list, now: float, info: dict | None = None) -> None:
        task.move(state)
        task.cls = None
        task.args = b""
        task.frames = []  # the argument arrays are no longer needed
        task.finished_at = now
        task.result = (state.value, value, frames, info or self._info(task, 0.0))
        self.counts["done" if state is TaskState.SUCCEEDED else "failed" if state is TaskState.FAILED else "cancelled"] += 1
        if self.journal is not None:
            self.journal.finished(task)
        self._deliver(task, task.session)
        for sid in task.watchers:
            self._deliver(task, sid)
        self._expiry[task.task_id] = now + self.result_ttl_s

    def _info(self, task: Task, run_s: float) -> dict:
        return {"worker": task.worker_name, "attempts": task.attempts, "queued_s": round(task.queued_s, 6),
                "run_s": round(run_s, 6)}

    def _deliver(self, task: Task, sid: str) -> None:
        sess = self._session(sid)
        sess.outbox[task.task_id] = None
        self._new_results.add(sess)

    def _send_results(self, sess: Session, route: bytes, rid, limit: int) -> None:
        records, frames = [], []
        for task_id in sess.outbox:
            task = self.tasks.get(task_id)
            if task is None or task.result is None:
                continue
            status, value, vframes, info = task.result
            records.append([task_id, status, value, len(vframes), info])
            frames.extend(vframes)
            if len(records) >= limit:
                break
        self._reply(route, Command.RESULTS, {"rid": rid, "results": records, **self._incarnation}, frames)

    def _acked(self, task_id: str, sid: str, now: float) -> None:
        """A session confirmed it holds the result: drop the payload unless a key may ask again,
        and forget the task soon (a resend of its SUBMIT can only come within the client's retries)."""
        task = self.tasks.get(task_id)
        if task is None or task.result is None or task.key is not None:
            return
        if task.session == sid and not task.watchers:
            status, _value, _frames, info = task.result
            task.result = (status, None, [], info)
            if self.journal is not None:
                self.journal.fetched(task)
            if self._expiry.pop(task_id, None) is not None:
                self._acked_expiry[task_id] = now + min(ACKED_GRACE_S, self.result_ttl_s)

    def _compact_timers(self) -> None:
        """Drop heap entries of tasks and fetches that ended before their deadline, once they
        outnumber the live ones: a long-running broker must not keep one per task ever run."""
        if len(self._deadlines) > 2 * self.counts["running"] + 1024:
            self._deadlines = [d for d in self._deadlines if (t := self.tasks.get(d[1])) is not None
                               and t.state is TaskState.RUNNING and t.attempts == d[2]]
            heapq.heapify(self._deadlines)
        if len(self._fetch_expiry) > 2 * len(self.sessions) + 1024:
            self._fetch_expiry = [f for f in self._fetch_expiry if (sess := self.sessions.get(f[2])) is not None
                                  and sess.fetch is not None and sess.fetch[1] is f[3]]
            heapq.heapify(self._fetch_expiry)

    def _forget(self, task: Task) -> None:
        self._expiry.pop(task.task_id, None)
        self._acked_expiry.pop(task.task_id, None)
        del self.tasks[task.task_id]
        if task.key is not None and self.keys.get(task.key) == task.task_id:
            del self.keys[task.key]
        for sid in (task.session, *task.watchers):
            sess = self.sessions.get(sid)
            if sess is not None:
                sess.outbox.pop(task.task_id, None)
        if self.journal is not None:
            self.journal.forgotten(task)

    def _remove_worker(self, worker: Worker, state: WorkerState, now: float) -> None:
        worker.move(state)
        self.workers.pop(worker.wid, None)
        self._ready.pop(worker.wid, None)
        self.sched.worker_gone(worker)
        requeued = []
        lost = state is WorkerState.LOST
        for task_id in list(worker.ahead):  # never started there: back in the queue, no loss counted
            if self._unsend(worker, task_id, now):
                requeued.append(task_id)
        for task_id in list(worker.running):
            task = self.tasks.get(task_id)
            if task is None or task.state is not TaskState.RUNNING or task.worker != worker.wid:
                continue
            self._requeue(task, f"worker {worker.name} {'lost' if lost else 'left'}", now, lost=lost)
            if task.state is TaskState.QUEUED:  # not the ones that just failed for good as lost
                requeued.append(task_id)
        worker.running.clear()
        if lost:
            self._event("worker.lost", worker=worker.name, requeued=requeued)
        else:
            self._event("worker.left", worker=worker.name)
        self._dirty_dispatch = True

    def _session(self, sid: str) -> Session:
        sess = self.sessions.get(sid)
        if sess is None:
            sess = self.sessions[sid] = Session(sid)
        return sess

    # ================================================================ events

    def _event(self, topic: str, **fields) -> None:
        self.seq += 1
        if self.publish:
            fields["seq"] = self.seq
            fields["ts"] = self.wall
            self._out.events.append((topic, fields))

    def _failed_event(self, task: Task, worker: str | None, error: dict) -> None:
        # error_type and resources let a subscriber keep per-resource queues and slots exact
        self._event("task.failed", task_id=task.task_id, name=task.name, worker=worker, error=_error_text(error),
                    error_type=error.get("type", "Error"), resources=self._needs_of(task))

    def _stats(self, now: float) -> None:
        window = [r for r in self._recent if now - r[0] <= 10.0]
        span = (now - window[0][0]) if len(window) > 1 else 0.0
        rate = (len(window) - 1) / span if span > 0 else 0.0
        queue_waits = sorted(r[1] for r in window)
        run_times = sorted(r[2] for r in window)
        self._event("broker.stats", queued=self.counts["queued"], running=self.counts["running"],
                    workers=len(self.workers), done=self.counts["done"], failed=self.counts["failed"],
                    rate=round(rate, 1), queued_p50_s=_pct(queue_waits, 50), queued_p99_s=_pct(queue_waits, 99),
                    run_p50_s=_pct(run_times, 50), run_p99_s=_pct(run_times, 99),
                    # per worker: what no event reports (heartbeats, draining, a timed-out task's late result)
                    per_worker={w.name: {"running": len(w.running), "tasks": w.served, "state": w.state.value,
                                         "heartbeat_age_s": round(max(now - w.last_heard, 0.0), 3)}
                                for w in self.workers.values()} if self.publish else {},
                    queues=self._queues() if self.publish else {})

    # ================================================================ shutdown

    def shutdown(self) -> None:
        """Tell every worker the broker is going away."""
        for worker in self.workers.values():
            self._out.workers.append((worker.wid, Message(Command.DISCONNECT, {"reason": "broker stopping"})))


_CLIENT_HANDLERS = {
    Command.SUBMIT: Core._on_submit,
    Command.FETCH: Core._on_fetch,
    Command.CANCEL: Core._on_cancel,
    Command.STATUS: Core._on_status,
}


# ==================================================================== validation


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN:
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_NAME_LEN} characters")
    return value


def _int(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _error_text(error: dict) -> str:
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"


def _pct(sorted_values: list, pct: int) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))
    return round(sorted_values[idx], 6)
