"""Property test of the pure broker core: random traffic, worker deaths, late results, restarts from
the journal, with the invariants of issue 3 checked after every step. Plus the regressions it found.

The state machine plays every peer. Workers are modelled like worker/worker.py: they
receive TASKS in order (a batch may still be on its way when they announce again),
start what fits their own resources first come first served, report starts of tasks
sent ahead, heartbeat unless silent, announce again when the broker does not know
them, and resend results a crashed broker may have lost. Clients submit with their
own ids, resend, cancel and fetch with acks. A restart closes the journal as
``kill -9`` would, builds a fresh Core on the same SQLite file and replays it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter, deque
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.core import Core
from broker.journal import Journal
from broker.protocol import Command, Message, pack_value, unpack_value
from broker.states import TERMINAL, TaskState
from tests.harness import ALL_TASKS, Harness, published

HEARTBEAT_S = 1.0
LIVENESS = 3
#: what the model's workers serve: noop/square/sleep need a cpu, "gpu" a gpu; nobody serves "mystery"
SERVES = {**ALL_TASKS, "gpu": {"gpu": 1}}
NAMES = ["noop", "square", "gpu", "mystery"]
OVERRIDES = [None, None, {"cpu": 1}, {"cpu": 0.5}, {"gpu": 1}, {"cpu": 2}]
SESSIONS = ["s1", "s2"]
#: seconds a tick may move the clock: always less than heartbeat x liveness, so a worker
#: that heartbeats before every tick can never be declared dead
TICKS = [0.1, 0.5, 1.0, 2.5]
EPS = 1e-6


class _NoSession:
    outbox: dict = {}


_NO_SESSION = _NoSession()


class ModelWorker:
    """One worker process as the broker sees it through its messages."""

    def __init__(self, name: str, wid: bytes, slots: int, gpus: int) -> None:
        self.name = name
        self.wid = wid
        self.slots = slots
        self.resources = {"cpu": slots, **({"gpu": gpus} if gpus else {})}
        self.free = dict(self.resources)
        self.inflight: deque = deque()  #: TASKS records sent to ``wid``, not yet read by the worker
        self.pending: deque = deque()  #: (task_id, needs, ahead) read, waiting for resources
        self.running: dict = {}  #: task_id -> needs
        self.log: list = []  #: the next DONE, in order: results, and ids of tasks sent ahead that started
        self.unconfirmed: list = []  #: results a crashed broker lost: resent after the next READY
        self.finished: set = set()  #: every task it ran to the end
        self.alive = True
        self.silent = False  #: frozen or cut off: no heartbeats, no messages
        self.steady = True  #: alive and heartbeating since the last broker restart
        self.draining = False
        self.must_announce = False

    def held(self) -> list:
        return [t for t, _, _ in self.pending] + list(self.running)

    def read_inbox(self) -> None:
        while self.inflight:
            task_id, name, _args, _n, _attempt, needs, ahead = self.inflight.popleft()
            self.pending.append((task_id, needs if needs is not None else SERVES.get(name, {"cpu": 1}), ahead))
        self.start_what_fits()

    def start_what_fits(self) -> None:
        while self.pending and all(self.free.get(r, 0) >= q - EPS for r, q in self.pending[0][1].items()):
            task_id, needs, ahead = self.pending.popleft()
            for r, q in needs.items():
                self.free[r] = self.free.get(r, 0) - q
            self.running[task_id] = needs
            if ahead:
                self.log.append(task_id)

    def finish(self, task_id: str, result: list) -> None:
        for r, q in self.running.pop(task_id).items():
            self.free[r] = self.free.get(r, 0) + q
        self.log.append(result)
        self.finished.add(task_id)
        self.start_what_fits()


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gridq-props-"))
        self.journal = Journal(str(self.dir / "j.db"))
        self.h = Harness(heartbeat_s=HEARTBEAT_S, liveness=LIVENESS, max_retries=2, journal=self.journal)
        self.workers: list[ModelWorker] = []
        self.n_workers = 0
        self.n_sockets = 0
        self.n_tasks = 0
        self.submitted: dict = {}  #: task_id -> (session, SUBMIT record)
        self.accepted: set = set()  #: ids the broker accepted as tasks of their own
        self.aliases: dict = {}  #: id -> the first task with the same key
        self.conflicts: set = set()  #: ids refused: their key belongs to a task of another name
        self.cancelled: set = set()  #: ids the broker confirmed cancelled
        self.received: dict = {s: {} for s in SESSIONS}  #: session -> task_id -> status delivered
        self.to_ack: dict = {s: set() for s in SESSIONS}
        self.acked: set = set()  #: ids whose result the client acknowledged: the broker may forget them
        self.completions: Counter = Counter()  #: task.succeeded/failed/cancelled per id, across restarts
        self.submitted_events: Counter = Counter()
        self.may_be_lost: set = set()  #: worker names whose registration may be declared lost this step
        self.restarts = 0
        self.fetching = None

    def teardown(self) -> None:
        self.journal.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ plumbing

    @property
    def core(self) -> Core:
        return self.h.core

    def worker_with(self, wid: bytes) -> ModelWorker | None:
        return next((w for w in self.workers if w.wid == wid and w.alive), None)

    def deliver(self) -> None:
        """One loop turn: dispatch, commit, then hand every output to its peer (as broker/server.py)."""
        while True:
            out = self.core.flush(self.h.now)
            self.journal.commit()
            for wid, msg in out.workers:
                w = self.worker_with(wid)
                if w is None:
                    continue
                if msg.command is Command.TASKS:
                    w.inflight.extend(msg.header["tasks"])
                elif msg.command is Command.DISCONNECT:
                    assert msg.header["reason"] == "unknown worker, announce again"
                    w.must_announce = True
            for _route, msg in out.clients:
                self.client_reply(msg)
            for topic, fields in published(out.events):
                self.event(topic, fields)
            # a worker told it is unknown announces again at once, as worker/worker.py does
            again = [w for w in self.workers if w.alive and not w.silent and w.must_announce]
            if not again:
                return
            for w in again:
                w.must_announce = False
                w.read_inbox()  # it drains its socket before it answers: what came first is held
                self.announce(w)
                self.send_log(w)

    def client_reply(self, msg: Message) -> None:
        assert msg.command is not Command.ERROR, f"a well-formed request was refused: {msg.header}"
        if msg.command is Command.ACCEPTED:
            rejected = {t for t, _ in msg.header["rejected"]}
            assert not rejected, f"valid tasks rejected: {msg.header['rejected']}"
            for task_id, first in msg.header["aliases"]:
                self.aliases[task_id] = first
            for task_id, _reason in msg.header["conflicts"]:
                record = self.submitted[task_id][1]
                first = self.core.tasks[self.core.keys[record[8]]]
                assert first.name != record[1], f"{task_id} refused though its key's task has the same name and args"
                self.conflicts.add(task_id)
        elif msg.command is Command.CANCELLED:
            self.cancelled.update(msg.header["cancelled"])
        elif msg.command is Command.RESULTS:
            for task_id, status, value, nframes, info in msg.header["results"]:
                session = self.fetching
                seen = self.received[session].get(task_id)
                assert seen in (None, status), f"{task_id}: delivered as {seen}, then as {status}"
                self.received[session][task_id] = status
                self.to_ack[session].add(task_id)
                if status == "succeeded" and value is not None:
                    assert unpack_value(value) == task_id, "a result went to the wrong task"

    def event(self, topic: str, fields: dict) -> None:
        if topic in ("task.succeeded", "task.failed", "task.cancelled"):
            self.completions[fields["task_id"]] += 1
        elif topic == "task.submitted":
            self.submitted_events[fields["task_id"]] += 1
        elif topic == "worker.lost":
            assert fields["worker"] in self.may_be_lost, (
                f"worker {fields['worker']} was declared lost while alive and heartbeating")
        elif topic == "task.retried" and "did not come back" in fields["reason"]:
            # fair where the worker died, went silent, or never got the task (its TASKS died with
            # the old socket): not where it runs it or ran it and resent the result
            name, task_id = fields["reason"].split()[1], fields["task_id"]
            w = next(w for w in self.workers if w.name == name)
            assert not (w.steady and (task_id in w.held() or task_id in w.finished)), (
                f"{name} kept heartbeating across the restart, yet {task_id} was taken from it")

    def announce(self, w: ModelWorker) -> None:
        header = {"name": w.name, "slots": w.slots, "resources": dict(w.resources), "tasks": SERVES,
                  "running": w.held()}
        self.core.on_worker(w.wid, Message(Command.READY, header), self.h.now)
        if w.unconfirmed:
            self.core.on_worker(w.wid, Message(Command.DONE, {"log": w.unconfirmed}), self.h.now)
            w.unconfirmed = []
        self.deliver()

    def send_log(self, w: ModelWorker) -> None:
        if w.log:
            log, w.log = w.log, []
            self.core.on_worker(w.wid, Message(Command.DONE, {"log": log}), self.h.now)
            if w.wid not in self.core.workers:  # "announce again": kept to resend after the READY
                w.unconfirmed.extend(e for e in log if not isinstance(e, str))

    def steps_allowing_loss(self, *names: str) -> set:
        return {w.name for w in self.workers if not w.alive or w.silent} | set(names)

    # ------------------------------------------------------------ workers

    @initialize()
    def first_worker(self) -> None:
        self.join(slots=2, gpus=0)

    @rule(slots=st.integers(1, 3), gpus=st.integers(0, 1))
    @precondition(lambda self: sum(w.alive for w in self.workers) < 4)
    def join(self, slots: int, gpus: int) -> None:
        self.n_workers += 1
        self.n_sockets += 1
        w = ModelWorker(f"w{self.n_workers}", f"sock{self.n_sockets}".encode(), slots, gpus)
        self.workers.append(w)
        self.may_be_lost = self.steps_allowing_loss()
        self.announce(w)

    def live(self) -> list:
        return [w for w in self.workers if w.alive and not w.silent]

    @rule(data=st.data())
    @precondition(lambda self: any(w.alive and not w.silent and w.inflight for w in self.workers))
    def worker_reads_its_tasks(self, data) -> None:
        w = data.draw(st.sampled_from([w for w in self.live() if w.inflight]))
        self.may_be_lost = self.steps_allowing_loss()
        w.read_inbox()
        if w.draining:  # a stopping worker hands back whatever still arrives
            self.hand_back(w, [t for t, _, _ in w.pending], draining=True)
            w.pending.clear()
        self.send_log(w)
        self.deliver()

    @rule(data=st.data(), ok=st.booleans(), run_s=st.sampled_from([0.001, 0.5]))
    @precondition(lambda self: any(w.alive and not w.silent and w.running for w in self.workers))
    def worker_finishes_a_task(self, data, ok: bool, run_s: float) -> None:
        """Also a late result: the broker may have declared this worker dead meanwhile."""
        w = data.draw(st.sampled_from([w for w in self.live() if w.running]))
        task_id = data.draw(st.sampled_from(sorted(w.running)))
        self.may_be_lost = self.steps_allowing_loss()
        w.finish(task_id, self.result(task_id, ok, run_s))
        self.send_log(w)
        self.maybe_leave(w)
        self.deliver()

    @staticmethod
    def result(task_id: str, ok: bool, run_s: float) -> list:
        if ok:
            return [task_id, True, pack_value(task_id)[0], 0, run_s]
        return [task_id, False, {"type": "ValueError", "message": "boom", "traceback": ""}, 0, run_s]

    @rule(data=st.data(), known=st.booleans())
    @precondition(lambda self: bool(self.live()))
    def worker_sends_a_result_it_was_never_given(self, data, known: bool) -> None:
        w = data.draw(st.sampled_from(self.live()))
        others = sorted(t for t in self.accepted if t not in w.held())
        task_id = data.draw(st.sampled_from(others)) if known and others else "never-given"
        self.may_be_lost = self.steps_allowing_loss()
        self.core.on_worker(w.wid, Message(Command.DONE, {"log": [self.result(task_id, True, 0.01)]}), self.h.now)
        self.deliver()

    @rule(data=st.data())
    @precondition(lambda self: bool(self.live()))
    def worker_announces_again_on_the_same_socket(self, data) -> None:
        """As after several 'announce again' replies: TASKS may be on their way to it."""
        w = data.draw(st.sampled_from(self.live()))
        self.may_be_lost = self.steps_allowing_loss()
        self.announce(w)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.live()))
    def worker_reconnects_on_a_fresh_socket(self, data) -> None:
        w = data.draw(st.sampled_from(self.live()))
        self.n_sockets += 1
        w.wid = f"sock{self.n_sockets}".encode()
        w.inflight.clear()  # what was on its way to the old socket is gone with it
        self.may_be_lost = self.steps_allowing_loss(w.name)  # its old registration, not the worker
        self.announce(w)

    @rule(data=st.data())
    @precondition(lambda self: any(w.alive for w in self.workers))
    def worker_process_dies(self, data) -> None:
        w = data.draw(st.sampled_from([w for w in self.workers if w.alive]))
        w.alive = w.steady = False

    @rule(data=st.data())
    @precondition(lambda self: bool(self.live()))
    def worker_goes_silent(self, data) -> None:
        w = data.draw(st.sampled_from(self.live()))
        w.silent = True
        w.steady = False

    @rule(data=st.data())
    @precondition(lambda self: any(w.alive and w.silent for w in self.workers))
    def silent_worker_speaks_again(self, data) -> None:
        w = data.draw(st.sampled_from([w for w in self.workers if w.alive and w.silent]))
        w.silent = False

    @rule(data=st.data(), hand_back_all=st.booleans())
    @precondition(lambda self: any(not w.draining for w in self.live()))
    def worker_stops_gracefully(self, data, hand_back_all: bool) -> None:
        w = data.draw(st.sampled_from([w for w in self.live() if not w.draining]))
        w.read_inbox()
        self.may_be_lost = self.steps_allowing_loss()
        w.draining = True
        if hand_back_all:  # past its drain timeout: everything goes back, then goodbye
            self.hand_back(w, w.held(), draining=True)
            w.pending.clear()
            w.running.clear()
            w.log = [e for e in w.log if not isinstance(e, str)]
        else:
            self.hand_back(w, [t for t, _, _ in w.pending], draining=True)
            w.pending.clear()
        self.maybe_leave(w)
        self.deliver()

    def hand_back(self, w: ModelWorker, ids: list, draining: bool) -> None:
        self.core.on_worker(w.wid, Message(Command.RETURN, {"draining": draining, "ids": ids}), self.h.now)

    def maybe_leave(self, w: ModelWorker) -> None:
        if w.draining and not w.running and not w.pending and w.alive:
            self.send_log(w)
            self.core.on_worker(w.wid, Message(Command.DISCONNECT, {}), self.h.now)
            w.alive = w.steady = False

    @rule(dt=st.sampled_from(TICKS))
    def time_passes(self, dt: float) -> None:
        self.may_be_lost = self.steps_allowing_loss()
        for w in self.live():
            self.core.on_worker(w.wid, Message(Command.HEARTBEAT, {}), self.h.now)
        self.deliver()
        self.h.now += dt
        self.core.on_tick(self.h.now)
        self.deliver()

    @rule()
    def much_time_passes(self) -> None:
        """Long enough for expiries, timeouts, the no-worker timeout and the claim-back grace."""
        for _ in range(4):
            self.time_passes(2.0)

    # ------------------------------------------------------------ clients

    @rule(session=st.sampled_from(SESSIONS), name=st.sampled_from(NAMES), override=st.sampled_from(OVERRIDES),
          priority=st.integers(-2, 2), key=st.sampled_from([None, None, None, "k1", "k2"]),
          retries=st.sampled_from([None, 0, 1]), timeout_s=st.sampled_from([None, None, 2.0]))
    def client_submits(self, session, name, override, priority, key, retries, timeout_s) -> None:
        self.n_tasks += 1
        task_id = f"{session}-t{self.n_tasks}"
        blob, _ = pack_value([[], {}])
        record = [task_id, name, blob, 0, override, priority, retries, timeout_s, key]
        self.submitted[task_id] = (session, record)
        self.send_submit(session, record)
        if task_id not in self.aliases and task_id not in self.conflicts:
            self.accepted.add(task_id)

    def send_submit(self, session: str, record: list) -> None:
        self.may_be_lost = self.steps_allowing_loss()
        self.core.on_client(b"c", Message(Command.SUBMIT, {"rid": 1, "session": session, "tasks": [record]}), self.h.now)
        self.deliver()

    @rule(data=st.data())
    @precondition(lambda self: bool(set(self.submitted) - self.acked))
    def client_resends_a_submission(self, data) -> None:
        """Lazy Pirate: the ACCEPTED was lost (or the broker restarted), the same ids go again
        (never after the client acknowledged the result: its retries are long over by then)."""
        task_id = data.draw(st.sampled_from(sorted(set(self.submitted) - self.acked)))
        session, record = self.submitted[task_id]
        before = set(self.core.tasks)
        self.send_submit(session, record)
        # a keyed result read back from the journal (its key's first task, also when the resend is
        # refused as a key conflict) is that old task, not a new one
        read_back = {t for t, (_, rec) in self.submitted.items() if rec[8] is not None and t != task_id}
        assert set(self.core.tasks) - before <= set(self.aliases.values()) | read_back, "a resend created a task"

    @rule(data=st.data())
    @precondition(lambda self: bool(self.accepted))
    def client_cancels(self, data) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.accepted)))
        session = self.submitted[task_id][0]
        self.may_be_lost = self.steps_allowing_loss()
        self.core.on_client(b"c", Message(Command.CANCEL, {"rid": 2, "session": session, "ids": [task_id]}), self.h.now)
        self.deliver()

    @rule(session=st.sampled_from(SESSIONS), ack=st.booleans())
    def client_fetches(self, session: str, ack: bool) -> None:
        acks = sorted(self.to_ack[session]) if ack else []
        if ack:
            self.to_ack[session].clear()
            self.acked.update(acks)
        self.fetching = session
        self.may_be_lost = self.steps_allowing_loss()
        self.core.on_client(b"c", Message(Command.FETCH, {"rid": 3, "session": session, "ack": acks, "wait_ms": 0}),
                            self.h.now)
        self.deliver()

    # ------------------------------------------------------------ the broker

    @rule(lose_a_result=st.booleans(), data=st.data())
    def broker_is_killed_and_restarts_on_its_journal(self, lose_a_result: bool, data) -> None:
        """kill -9 between loop turns: only what was committed survives. With ``lose_a_result``
        a worker's DONE was on its way in and died with the broker."""
        if lose_a_result and any(w.running for w in self.live()):
            w = data.draw(st.sampled_from([w for w in self.live() if w.running]))
            task_id = data.draw(st.sampled_from(sorted(w.running)))
            w.finish(task_id, self.result(task_id, True, 0.01))
            # the DONE died with the broker: the worker resends its results after its next READY
            w.unconfirmed.extend(e for e in w.log if not isinstance(e, str))
            w.log = []
        self.journal.db.close()  # no final commit: a crash
        self.restarts += 1
        self.journal = Journal(str(self.dir / "j.db"))
        self.h.core = Core(heartbeat_s=HEARTBEAT_S, liveness=LIVENESS, max_retries=2, journal=self.journal)
        self.journal.restore(self.core, self.h.now)
        for w in self.workers:
            w.steady = w.alive and not w.silent
            if w.alive:  # TASKS the old broker sent are in its socket: read before anything new
                w.read_inbox()

    # ------------------------------------------------------------ invariants

    @invariant()
    def no_accepted_task_is_lost(self) -> None:
        core = self.core
        for task_id in self.accepted:
            task = core.tasks.get(task_id)
            if task is None:
                assert task_id in self.acked, f"accepted task {task_id} vanished before its result was fetched"
                continue
            if task.state is TaskState.QUEUED:
                queued = task.cls is not None and any(e[2] == task_id for e in task.cls.entries())
                assert queued or task_id in core._held, f"{task_id} is queued in no queue"
            elif task.state is TaskState.DISPATCHED:
                holders = [w for w in core.workers.values() if task_id in w.ahead]
                assert [w.wid for w in holders] == [task.worker], f"{task_id} sent ahead to {holders}"
            elif task.state is TaskState.RUNNING:
                holders = [w for w in core.workers.values() if task_id in w.running]
                assert [w.wid for w in holders] == [task.worker], f"{task_id} running on {holders}"
            else:
                assert task.state in TERMINAL and task.result is not None
                session = task.session
                deliverable = task_id in core.sessions.get(session, _NO_SESSION).outbox
                delivered = task_id in self.received[session] or task_id in self.cancelled
                assert deliverable or delivered, f"{task_id} finished but its result can never reach its client"

    @invariant()
    def a_key_submitted_again_gets_the_first_tasks_result(self) -> None:
        for alias, first in self.aliases.items():
            session = self.submitted[alias][0]
            task = self.core.tasks.get(first)
            if task is None or task.result is None:
                continue  # still pending, or forgotten after its owner acknowledged it (unkeyed only)
            deliverable = first in self.core.sessions.get(session, _NO_SESSION).outbox
            assert deliverable or first in self.received[session], (
                f"{alias} of {session} is an alias of {first}, whose result can never reach {session}")

    @invariant()
    def no_task_is_held_by_two_live_workers(self) -> None:
        seen: dict = {}
        for w in self.core.workers.values():
            for task_id in (*w.running, *w.ahead):
                task = self.core.tasks.get(task_id)
                if task is None or task.state in TERMINAL:
                    continue  # a timed-out task's slot stays held until its worker answers
                assert task_id not in seen, f"{task_id} held by {seen[task_id]} and {w.name}"
                seen[task_id] = w.name

    @invariant()
    def no_task_completes_twice(self) -> None:
        assert not {t: n for t, n in self.completions.items() if n > 1}
        assert not {t: n for t, n in self.submitted_events.items() if n > 1}

    @invariant()
    def slots_and_resources_are_never_over_allocated(self) -> None:
        for w in self.core.workers.values():
            assert len(w.running) <= w.slots, f"{w.name} runs {len(w.running)} tasks on {w.slots} slots"
            for res, total in w.resources.items():
                held = sum(needs.get(res, 0) for needs in w.running.values())
                assert w.free.get(res, 0) >= -EPS, f"{w.name}: {res} over-allocated"
                assert abs(w.free.get(res, 0) + held - total) < EPS, f"{w.name}: {res} free + held != total"

    @invariant()
    def counts_match_the_tasks(self) -> None:
        states = Counter(t.state for t in self.core.tasks.values())
        assert self.core.counts["queued"] == states[TaskState.QUEUED] + states[TaskState.DISPATCHED]
        assert self.core.counts["running"] == states[TaskState.RUNNING]


CoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_core_state_machine = CoreMachine.TestCase


# ==================================================================== regressions


def restarted(h: Harness, path: Path) -> Harness:
    """The loop committed after its last turn, then the broker was killed and started again."""
    h.core.journal.commit()
    h.core.journal.db.close()
    journal = Journal(str(path))
    fresh = Harness(journal=journal)
    fresh.now = h.now
    journal.restore(fresh.core, fresh.now)
    return fresh


def test_a_second_ready_on_the_same_socket_keeps_the_tasks_on_their_way_to_it():
    h = Harness()
    h.join(b"w1", slots=2, name="w")
    t = h.submit()
    h.join(b"w1", slots=2, name="w")  # told twice to announce again: this READY crossed the TASKS
    assert h.topics("worker.lost") == [] and h.topics("task.retried") == []
    assert h.state(t) is TaskState.RUNNING and h.core.tasks[t].worker == b"w1"
    assert h.dispatched(b"w1") == [t]  # sent once, never again
    h.done(b"w1", t, 1)
    assert h.state(t) is TaskState.SUCCEEDED


def test_a_result_lost_with_a_killed_broker_counts_when_its_worker_resends_it(tmp_path):
    h = Harness(journal=Journal(str(tmp_path / "j.db")))
    h.join(b"w1", name="w")
    t = h.submit("square", 3)
    assert h.dispatched(b"w1") == [t]
    h = restarted(h, tmp_path / "j.db")  # the worker's DONE died with the old broker
    h.join(b"w2", name="w", running=[])  # it finished t: nothing to claim
    h.done(b"w2", t, 9)  # resent after its READY
    assert h.state(t) is TaskState.SUCCEEDED
    assert h.topics("task.retried") == [] and h.core.tasks[t].attempts == 1
    h.tick(2 * HEARTBEAT_S * LIVENESS + 1)  # past the claim-back grace: nothing left to requeue
    assert h.topics("task.retried") == [] and h.topics("task.started") == []


def test_cancel_of_a_task_restored_as_running_is_refused_not_an_error(tmp_path):
    h = Harness(journal=Journal(str(tmp_path / "j.db")))
    h.join(b"w1", name="w")
    t = h.submit()
    h.dispatched(b"w1")
    h = restarted(h, tmp_path / "j.db")
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 7, "session": "s1", "ids": [t]}), h.now)
    h.flush()
    assert [(m.command, m.header.get("refused")) for _, m in h.to_clients] == [(Command.CANCELLED, [t])]
    h.join(b"w2", name="w", running=[t])  # it was still running there
    h.done(b"w2", t, 1)
    assert h.state(t) is TaskState.SUCCEEDED


def test_a_worker_claiming_more_than_its_slots_after_a_restart_gets_the_rest_as_sent_ahead(tmp_path):
    h = Harness(journal=Journal(str(tmp_path / "j.db")))
    h.join(b"w1", name="w", slots=1)
    short = h.submit()
    h.dispatched(b"w1")
    done = [short, True, pack_value(None)[0], 0, 0.001]  # a short task: the next ones may be sent ahead
    h.core.on_worker(b"w1", Message(Command.DONE, {"log": [done]}), h.now)
    h.flush()
    running, waiting = h.submit(), h.submit()
    assert h.dispatched(b"w1") == [running, waiting]
    assert h.state(waiting) is TaskState.DISPATCHED
    h = restarted(h, tmp_path / "j.db")
    h.join(b"w2", name="w", slots=1, running=[waiting, running])  # as Runner.held() lists them
    w = h.core.workers[b"w2"]
    assert list(w.running) == [running] and w.free["cpu"] == 0
    assert list(w.ahead) == [waiting] and h.state(waiting) is TaskState.DISPATCHED
    for task_id in (running, waiting):
        h.done(b"w2", task_id, 1)
    assert h.state(running) is h.state(waiting) is TaskState.SUCCEEDED
    assert w.free == {"cpu": 1} and not w.running and not w.ahead


def test_a_key_submitted_again_by_the_same_session_after_its_result_was_fetched_gets_the_result():
    h = Harness()
    h.join(b"w1")
    first = h.submit("square", 3, key="k")
    h.dispatched(b"w1")
    h.done(b"w1", first, 9)
    assert first in h.fetch()
    h.fetch(ack=[first])  # delivered and acknowledged
    h.to_clients.clear()
    again = h.submit("square", 3, key="k")
    accepted = [m for _, m in h.to_clients if m.command is Command.ACCEPTED][0]
    assert accepted.header["aliases"] == [[again, first]]
    assert unpack_value(h.fetch()[first][2]) == 9
    assert h.dispatched(b"w1") == []


def test_a_session_watching_a_key_still_gets_its_result_after_a_restart(tmp_path):
    h = Harness(journal=Journal(str(tmp_path / "j.db")))
    h.join(b"w1", name="w")
    first = h.submit("square", 3, key="k", session="s1")
    h.dispatched(b"w1")
    h.core.journal.commit()
    h.submit("square", 3, key="k", session="s2")  # an alias: s2 now waits on the first task
    h = restarted(h, tmp_path / "j.db")
    h.join(b"w2", name="w", running=[first])
    h.done(b"w2", first, 9)
    assert unpack_value(h.fetch(session="s2")[first][2]) == 9
