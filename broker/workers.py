"""Workers and their leases: join, rejoin, expiry, and tasks a restarted broker lets them claim back."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.lifecycle import Lifecycle
from broker.logs import get_logger
from broker.protocol import (MAX_BACKOFF_S, NAME_IN_USE, Command, Message, ProtocolError, Topic, check_int,
                             check_name, check_resources, check_seconds, hold, retry_names)
from broker.scheduler import DEFAULT_NEEDS, fits, missing
from broker.states import TaskState, WorkerState, check_worker_move

log = get_logger(__name__)


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
    pool: str | None = None  #: "process" or "thread" as announced (None: a peer that takes no KILL)
    killable: frozenset = frozenset()  #: names of tasks that run on its process slots (KILL stops them)
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

    def move(self, new: WorkerState) -> None:
        check_worker_move(self.name, self.state, new)
        self.state = new


class Workers:
    """The live workers by routing id. Owns: a worker's ``running`` and ``free`` always add up
    to what it offers; a worker silent past heartbeat x liveness is removed and what it held is
    requeued (or fails as lost); a task restored as running waits for its worker to claim it back."""

    def __init__(self, moves: Lifecycle, heartbeat_s: float, liveness: int) -> None:
        self.moves = moves
        self.all: dict[bytes, Worker] = moves.workers
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        #: task_id -> (worker name, until): tasks a restarted broker found running; their
        #: worker may claim them back when it rejoins, else they count as lost
        self.held: dict[str, tuple[str, float]] = {}
        self._tiebreak = 0

    def get(self, wid: bytes) -> Worker | None:
        return self.all.get(wid)

    def heard(self, worker: Worker, now: float) -> None:
        worker.expires_at = now + self.heartbeat_s * self.liveness
        worker.last_heard = now

    # ------------------------------------------------------------ join

    def join(self, wid: bytes, header: dict, now: float) -> None:
        """A READY: a new worker, the same connection announcing again, or a known name on a fresh socket."""
        worker_name = check_name(header.get("name"), "worker name")
        slots = check_int(header.get("slots"), "slots", 1, 1_000_000)
        resources = check_resources(header.get("resources") or {})
        resources.setdefault("cpu", slots)
        serves = header.get("tasks")
        if not isinstance(serves, dict) or not serves:
            raise ProtocolError("READY needs a map 'tasks' of task name -> resources")
        serves = {check_name(n, "task name"): check_resources(r if r is not None else DEFAULT_NEEDS)
                  for n, r in serves.items()}
        policies = header.get("retry") or {}
        if not isinstance(policies, dict):
            raise ProtocolError("READY 'retry' must map task name -> [retry_on, backoff_s]")
        policies = {n: (tuple(retry_names(p[0])), check_seconds(p[1], "backoff", MAX_BACKOFF_S, zero=True))
                    for n, p in policies.items() if n in serves and isinstance(p, list) and len(p) == 2}
        running = header.get("running") or ()
        if not isinstance(running, (list, tuple)):
            raise ProtocolError("READY 'running' must be a list of task ids")
        listed = [t for t in running if isinstance(t, str)]
        claims = set(listed)
        self._tiebreak += 1
        pid = header.get("pid") if isinstance(header.get("pid"), int) else None
        pool = header.get("pool") if header.get("pool") in ("process", "thread") else None
        killable = header.get("killable") if isinstance(header.get("killable"), list) else []
        worker = Worker(wid, worker_name, resources, dict(resources), slots, serves,
                        now + self.heartbeat_s * self.liveness, tiebreak=self._tiebreak, last_heard=now,
                        last_sent=now, pid=pid, pool=pool, killable=frozenset(n for n in killable if isinstance(n, str)))
        sched = self.moves.sched
        for old in list(self.all.values()):
            if old.wid == wid:
                # the same connection announcing again (told to, maybe more than once): tasks sent to
                # it since are still on their way to it, in order, so none of them is lost
                self._hand_over(old, worker, claims | set(old.running) | set(old.ahead))
                worker.served = old.served
                self.all.pop(wid)
                sched.worker_gone(old)
            elif old.name == worker_name:  # the same worker on a fresh socket: what it does not claim is lost
                if old.pid is not None and pid != old.pid and now - old.last_heard < self.heartbeat_s:
                    # another live process under the same name: two workers must not evict each other
                    reason = f"{NAME_IN_USE}: {worker_name!r} belongs to a live worker (pid {old.pid})"
                    log.warning("worker_refused", worker=worker_name, pid=pid, reason=reason)
                    self.moves.out.workers.append((wid, Message(Command.DISCONNECT, {"reason": reason})))
                    return
                self._hand_over(old, worker, claims)
                if pid == old.pid:  # the same process on a fresh socket: its count goes on
                    worker.served = old.served
                self.remove(old, WorkerState.LOST, now)
        self.all[wid] = worker
        self.moves.declare_retries(serves, policies)
        sched.declare(serves, self.all.values())
        sched.worker_joined(worker)
        # tasks it still holds that a restarted broker restored; the worker lists those waiting
        # in its queue first, so the last ones get its slots and the others wait as sent ahead
        for task_id in reversed(listed):
            self.reclaim(task_id, worker, now, may_wait=True)
        self.moves.ready[wid] = worker
        self.moves.dirty = True
        self.moves.events.emit(Topic.WORKER_JOINED, worker=worker_name, resources=resources, slots=slots,
                               tasks=sorted(serves))
        log.info("worker_joined", worker=worker_name, resources=resources, slots=slots)

    def _hand_over(self, old: Worker, new: Worker, claims: set) -> None:
        """Move the tasks that a rejoining worker says it still runs to its new registration."""
        table = self.moves.table
        for task_id in [t for t in old.running if t in claims]:
            held = old.running.pop(task_id)
            self.moves.release(old, held)
            new.running[task_id] = held  # held even if it timed out here: the worker still runs it
            hold(new.free, held, -1)
            task = table.get(task_id)
            if task is not None and task.state is TaskState.RUNNING and task.worker == old.wid:
                task.worker = new.wid
        for task_id in [t for t in old.ahead if t in claims]:
            task = table.get(task_id)
            new.ahead[task_id] = old.ahead.pop(task_id)
            if task is not None:
                task.worker = new.wid

    # ------------------------------------------------------------ claim-back after a broker restart

    def hold_for(self, task_id: str, worker_name: str, now: float) -> None:
        """A restored task that was running on ``worker_name``: keep it for that worker a while."""
        self.held[task_id] = (worker_name, now + 2 * self.heartbeat_s * self.liveness)

    def reclaim(self, task_id: str, worker: Worker, now: float, may_wait: bool = False) -> bool:
        """A task this broker restored as running on ``worker``'s name is that worker's again:
        running, or with ``may_wait`` and no room left on it, waiting there as if sent ahead."""
        held = self.held.get(task_id)
        if held is None or held[0] != worker.name:
            return False
        del self.held[task_id]
        task = self.moves.table.tasks[task_id]
        needs = self.moves.needs_of(task)
        if may_wait and not (len(worker.running) < worker.slots and fits(needs, worker.free)):
            self.moves.wait_ahead(task, worker, needs)
        else:
            self.moves.start(task, worker, needs, now, announce=False)
        return True

    def expire_holds(self, now: float) -> None:
        for task_id, (worker_name, until) in list(self.held.items()):
            if now < until:
                continue
            del self.held[task_id]
            task = self.moves.table.tasks[task_id]
            self.moves.table.move(task, TaskState.RUNNING)  # as it was before the restart, so the loss counts
            task.worker_name = worker_name
            self.moves.requeue(task, f"worker {worker_name} did not come back after the broker restarted", now,
                               lost=True)

    # ------------------------------------------------------------ leave

    def remove(self, worker: Worker, state: WorkerState, now: float) -> None:
        worker.move(state)
        self.all.pop(worker.wid, None)
        self.moves.ready.pop(worker.wid, None)
        self.moves.sched.worker_gone(worker)
        requeued = []
        lost = state is WorkerState.LOST
        for task_id in list(worker.ahead):  # never started there: back in the queue, no loss counted
            if self.moves.unsend(worker, task_id, now):
                requeued.append(task_id)
        for task_id in list(worker.running):
            task = self.moves.table.get(task_id)
            if task is None or task.state is not TaskState.RUNNING or task.worker != worker.wid:
                continue
            self.moves.requeue(task, f"worker {worker.name} {'lost' if lost else 'left'}", now, lost=lost)
            if task.state is TaskState.QUEUED:  # not the ones that just failed for good as lost
                requeued.append(task_id)
        worker.running.clear()
        if lost:
            self.moves.events.emit(Topic.WORKER_LOST, worker=worker.name, requeued=requeued)
        else:
            self.moves.events.emit(Topic.WORKER_LEFT, worker=worker.name)
        self.moves.dirty = True

    def drain(self, worker: Worker) -> None:
        """It takes nothing new from now on."""
        if worker.state is WorkerState.READY:
            worker.move(WorkerState.DRAINING)
            self.moves.ready.pop(worker.wid, None)

    def tick(self, now: float) -> None:
        """Expire silent workers; heartbeat those we have not sent anything to for a while."""
        for worker in list(self.all.values()):
            if now >= worker.expires_at:
                log.warning("worker_expired", worker=worker.name, requeued=list(worker.running))
                self.remove(worker, WorkerState.LOST, now)
            elif now - worker.last_sent >= self.heartbeat_s:
                self.moves.out.workers.append((worker.wid, Message(Command.HEARTBEAT, {})))
                log.debug("heartbeat_sent", worker=worker.name)
                worker.last_sent = now
        if self.held:
            self.expire_holds(now)
