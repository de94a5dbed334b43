"""What the core hands the loop to send, the event stream, and the statistics it publishes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import ClassVar

import msgspec

from broker.protocol import Topic
from broker.states import TaskState

#: how many recent completions the stats window keeps
STATS_WINDOW = 2048
#: seconds between two broker.stats events
STATS_INTERVAL_S = 1.0
#: seconds of completions the rate and percentiles of broker.stats cover
STATS_SPAN_S = 10.0
#: most events in one message: a message stays a few tens of KiB, so the events socket's high-water
#: mark, which counts messages, bounds what a slow subscriber can pile up in bytes too
MAX_RUN = 256
#: longest an event waits for others to share its message while input keeps the loop busy (an idle
#: loop publishes at once)
EVENTS_HOLD_S = 0.02
#: messages the events socket holds for one subscriber that reads too slowly (then it drops, the
#: subscriber sees a seq gap and takes a fresh snapshot): 5,000 x 256 events, as many as a
#: million one-event messages held before runs
EVENTS_SNDHWM = 5_000
#: topics whose events may move within a flush to make runs of one topic (one message each). Between
#: two events of other topics (or a snapshot) a task has at most one event of each, in this order
#: (its lifecycle), so putting a stretch's events in this order keeps every task's own order: all its
#: submissions, then all starts, then all results. A worker's CPU slots may look taken twice between
#: two messages of one flush (the next task's start before the last one's result; the messages leave
#: together, and every other topic, ``broker.stats`` among them, is a fixed point). A start that takes
#: anything else (a GPU, a named resource) never comes before the result that freed it: a stretch
#: with one keeps each worker's events in step (``_sorted_per_worker``), so nobody counting a scarce
#: resource from the stream ever sees it over-allocated.
RUN_RANK = {Topic.TASK_SUBMITTED: 0, Topic.TASK_STARTED: 1, Topic.TASK_SUCCEEDED: 2, Topic.TASK_FAILED: 3}
_SEQ = attrgetter("seq")


# The events of every task, one msgspec Struct per topic: built, numbered and packed at a fraction of
# a dict's cost, never tracked by the cyclic garbage collector (gc=False: they hold strings, numbers
# and the shared resources dict, never themselves). msgspec encodes each as the map SPEC fixes, its
# fields in the order given here: the bytes are those of the dicts they replace. A subscriber may
# decode them back into the same Structs (the gateway does, client/web/records.py): one definition
# of each shape for both ends; a message with a field more or fewer does not fit.

class TaskEvent(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A task event, read like the map it encodes as: ``ev["seq"]`` (in C), ``ev.get("worker")``."""

    topic: ClassVar[str]  #: its topic (a class attribute: not encoded)
    rank: ClassVar[int]  #: its topic's place in RUN_RANK

    __getitem__ = object.__getattribute__

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.__struct_fields__ else default


class Submitted(TaskEvent, gc=False):
    topic = Topic.TASK_SUBMITTED
    rank = RUN_RANK[topic]
    task_id: str
    name: str
    resources: dict
    priority: int
    seq: int
    ts: float


class Started(TaskEvent, gc=False):
    topic = Topic.TASK_STARTED
    rank = RUN_RANK[topic]
    task_id: str
    name: str
    worker: str
    attempt: int
    resources: dict  # beyond SPEC's fields: lets a subscriber count each worker's resources
    seq: int
    ts: float


class Succeeded(TaskEvent, gc=False):
    topic = Topic.TASK_SUCCEEDED
    rank = RUN_RANK[topic]
    task_id: str
    name: str
    worker: str
    run_s: float
    seq: int
    ts: float


class Failed(TaskEvent, gc=False):
    topic = Topic.TASK_FAILED
    rank = RUN_RANK[topic]
    task_id: str
    name: str
    worker: str | None
    error: str
    error_type: str  # these two beyond SPEC's fields: keep a subscriber's per-resource counts exact
    resources: dict
    seq: int
    ts: float


@dataclass(slots=True)
class Outgoing:
    """What one flush asks the loop to send."""

    clients: list = field(default_factory=list)  #: (route, Message)
    workers: list = field(default_factory=list)  #: (wid, Message)
    events: list = field(default_factory=list)  #: (topic, [event, ...]): one message each, in seq order

    def take(self) -> Outgoing:
        """Everything gathered so far; this one starts empty again (its parts keep a reference)."""
        taken = Outgoing(self.clients, self.workers)
        self.clients, self.workers = [], []
        return taken


class Events:
    """Numbers events in order and puts them in runs of one topic; builds them only while somebody
    subscribes.

    A task event goes straight into its topic's list of the open *stretch*; an event of any other
    topic, or a snapshot, closes the stretch (its events keep their seqs on either side of it).
    Closing renumbers the stretch's events in topic order (``RUN_RANK``), so a flush's runs are
    those lists as they stand: no event is visited again to sort or group it."""

    def __init__(self) -> None:
        self.seq = 0  #: last event sequence number used
        self.publish = True  #: build events (off while nobody subscribes)
        self.wall = 0.0  #: unix time of the latest call, for event timestamps
        self._runs: list = []  #: (topic, [event, ...]) closed and numbered, not yet taken
        # the open stretch: its task events by topic (RUN_RANK order), each in the order emitted
        self._submitted: list = []
        self._started: list = []
        self._succeeded: list = []
        self._failed: list = []
        self._scarce = False  #: a start in the open stretch takes more than CPU slots
        self._plain: dict | None = None  #: the resources of a start in the open stretch, found not scarce

    @property
    def held(self) -> int:
        """Events built and not yet taken."""
        return (len(self._submitted) + len(self._started) + len(self._succeeded) + len(self._failed)
                + sum(len(run) for _, run in self._runs))

    def take(self) -> list:
        """Every event built so far, as ``(topic, [event, ...])`` runs of at most ``MAX_RUN``
        events, seqs consecutive across them: one message each."""
        self._close()
        runs, self._runs = self._runs, []
        return runs

    def cut(self) -> None:
        """A snapshot was taken now: the events before it keep their seqs (it includes them)."""
        self._close()

    def emit(self, topic: str, **fields) -> None:
        """An event of a topic that does not move (the stretch before it closes)."""
        self.seq += 1  # counted even unpublished: a snapshot's seq must match what subscribers see
        if self.publish:
            self._close()
            fields["seq"] = self.seq
            fields["ts"] = self.wall
            self._add(topic, [fields])

    # The four events of a task's lifecycle: with a subscriber they are most of what the broker does
    # per task beside the task, so each is one Struct built and appended, nothing more.

    def submitted(self, task_id: str, name: str, resources: dict, priority: int) -> None:
        self.seq = seq = self.seq + 1
        if self.publish:
            self._submitted.append(Submitted(task_id, name, resources, priority, seq, self.wall))

    def started(self, task_id: str, name: str, worker: str, attempt: int, resources: dict) -> None:
        self.seq = seq = self.seq + 1
        if self.publish:
            if resources is not self._plain and not self._scarce:  # the same dict for every task of one name
                if _scarce(resources):
                    self._scarce = True
                else:
                    self._plain = resources
            self._started.append(Started(task_id, name, worker, attempt, resources, seq, self.wall))

    def succeeded(self, task_id: str, name: str, worker: str, run_s: float) -> None:
        self.seq = seq = self.seq + 1
        if self.publish:
            self._succeeded.append(Succeeded(task_id, name, worker, run_s, seq, self.wall))

    def failed(self, task, worker: str | None, error: dict, resources: dict) -> None:
        # error_type and resources let a subscriber keep per-resource queues and slots exact
        self.seq = seq = self.seq + 1
        if self.publish:
            self._failed.append(Failed(task.task_id, task.name, worker, error_text(error),
                                       error.get("type", "Error"), resources, seq, self.wall))

    def _close(self) -> None:
        """Renumber the open stretch in ``RUN_RANK`` order and add its runs; a new stretch opens."""
        buckets = [b for b in (self._submitted, self._started, self._succeeded, self._failed) if b]
        if not buckets:
            return
        self._submitted, self._started, self._succeeded, self._failed = [], [], [], []
        scarce, self._scarce, self._plain = self._scarce, False, None
        if len(buckets) == 1:  # one topic: nothing moves, the seqs stand
            self._add(buckets[0][0].topic, buckets[0])
            return
        count = sum(map(len, buckets))
        first, last = min(b[0].seq for b in buckets), max(b[-1].seq for b in buckets)
        if scarce or last - first != count - 1:  # (a gap: publishing was off for a while)
            emitted = sorted(chain.from_iterable(buckets), key=_SEQ)  # the order they came in
            seqs = [event.seq for event in emitted]
            if scarce:
                buckets = _sorted_per_worker(emitted)
        else:
            seqs = range(first, last + 1)
        for event, seq in zip(chain.from_iterable(buckets), seqs):
            event.seq = seq
        for bucket in buckets:
            self._add(bucket[0].topic, bucket)

    def _add(self, topic: str, events: list) -> None:
        """``events`` (this object's to keep) of one ``topic`` after the runs so far: joined to the
        last run where it is of that topic and has room, then in runs of at most ``MAX_RUN``."""
        runs = self._runs
        if runs and runs[-1][0] == topic and len(runs[-1][1]) < MAX_RUN:
            last = runs[-1][1]
            room = MAX_RUN - len(last)
            last.extend(events[:room])
            events = events[room:]
        if len(events) <= MAX_RUN:
            if events:
                runs.append((topic, events))
            return
        for i in range(0, len(events), MAX_RUN):
            runs.append((topic, events[i:i + MAX_RUN]))


class Stats:
    """The cluster seen from outside: snapshots for STATUS and the periodic broker.stats event."""

    def __init__(self, events: Events, table, workers, sched) -> None:
        self.events = events
        self.table = table
        self.workers = workers
        self.sched = sched
        self.recent: deque = deque(maxlen=STATS_WINDOW)  #: (finished_at, queued_s, run_s)
        self.last_at: float | None = None  #: when broker.stats last went out

    def finished(self, now: float, queued_s: float, run_s: float) -> None:
        self.recent.append((now, queued_s, run_s))

    def due(self, now: float) -> bool:
        if self.last_at is None or now - self.last_at >= STATS_INTERVAL_S:
            self.last_at = now
            return True
        return False

    def emit(self, now: float) -> None:
        window = [r for r in self.recent if now - r[0] <= STATS_SPAN_S]
        span = (now - window[0][0]) if len(window) > 1 else 0.0
        rate = (len(window) - 1) / span if span > 0 else 0.0
        queue_waits = sorted(r[1] for r in window)
        run_times = sorted(r[2] for r in window)
        counts, publish = self.table.counts, self.events.publish
        self.events.emit(
            Topic.BROKER_STATS, queued=counts["queued"], running=counts["running"], workers=len(self.workers),
            done=counts["done"], failed=counts["failed"], rate=round(rate, 1),
            queued_p50_s=_pct(queue_waits, 50), queued_p99_s=_pct(queue_waits, 99),
            run_p50_s=_pct(run_times, 50), run_p99_s=_pct(run_times, 99),
            # per worker: what no event reports (heartbeats, draining, a timed-out task's late result)
            per_worker={w.name: {"running": len(w.running), "tasks": w.served, "state": w.state.value,
                                 "heartbeat_age_s": round(max(now - w.last_heard, 0.0), 3)}
                        for w in self.workers.values()} if publish else {},
            queues=self.queues() if publish else {})

    def snapshot(self, now: float) -> dict:
        # copies, not the live dicts: the reply is encoded after later messages of this loop turn
        self.events.cut()
        workers, running = [], []
        for w in self.workers.values():
            workers.append({
                "name": w.name, "resources": dict(w.resources), "free": dict(w.free), "slots": w.slots,
                "running": len(w.running), "tasks": w.served, "serves": sorted(w.serves),
                "state": w.state.value, "heartbeat_age_s": round(max(now - w.last_heard, 0.0), 3),
            })
            for task_id, held in w.running.items():
                task = self.table.get(task_id)
                if task is not None and task.state is TaskState.RUNNING and task.worker == w.wid:
                    running.append({"task_id": task_id, "name": task.name, "worker": w.name, "attempt": task.attempts,
                                    "resources": dict(held), "running_s": round(max(now - (task.started_at or now), 0.0), 3)})
        return {"seq": self.events.seq, "workers": workers, "queues": self.queues(), **self.table.counts,
                "running_tasks": running}

    def queues(self) -> dict:
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


def _scarce(resources: dict) -> bool:
    """Whether a start takes more than CPU slots."""
    return len(resources) > 1 or (len(resources) == 1 and "cpu" not in resources)


def _sorted_per_worker(emitted: list) -> list:
    """``emitted`` (a stretch, in the order it came) in ``RUN_RANK`` order where each worker's
    events keep their order: submissions first, then by depth on their worker (its first event, its
    second, ...) and within one depth by rank. Lists of one topic each, in the order they go out: runs
    are only as long as the workers in the stretch (for stretches with scarce starts)."""
    submitted: list = []
    levels: list = []  #: per depth, one list per rank 1..3
    depth: dict = {}  #: worker -> its events seen so far in this stretch
    for event in emitted:
        rank = event.rank
        if rank == 0:
            submitted.append(event)
            continue
        worker = event.worker
        k = 0 if worker is None else depth.get(worker, -1) + 1
        if worker is not None:
            depth[worker] = k
        if k == len(levels):
            levels.append(([], [], []))
        levels[k][rank - 1].append(event)
    return [bucket for bucket in (submitted, *chain.from_iterable(levels)) if bucket]


def error_text(error: dict) -> str:
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"


def _pct(sorted_values: list, pct: int) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))
    return round(sorted_values[idx], 6)
