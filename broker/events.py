"""What the core hands the loop to send, the event stream, and the statistics it publishes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
_SUBMITTED, _STARTED, _SUCCEEDED = Topic.TASK_SUBMITTED, Topic.TASK_STARTED, Topic.TASK_SUCCEEDED
_RANK_OF = RUN_RANK.get


@dataclass(slots=True)
class Outgoing:
    """What one flush asks the loop to send."""

    clients: list = field(default_factory=list)  #: (route, Message)
    workers: list = field(default_factory=list)  #: (wid, Message)
    events: list = field(default_factory=list)  #: (topic, dict)

    def take(self, events: bool = True) -> Outgoing:
        """Everything gathered so far; this one starts empty again (its parts keep a reference).
        With ``events`` False the events stay, to go out with a later flush's."""
        taken = Outgoing(self.clients, self.workers, self.events if events else [])
        self.clients, self.workers = [], []
        if events:
            self.events = []
        return taken


class Events:
    """Numbers events in order; builds them only while somebody subscribes."""

    def __init__(self, out: Outgoing) -> None:
        self.out = out
        self.seq = 0  #: last event sequence number used
        self.publish = True  #: build event maps (off while nobody subscribes)
        self.wall = 0.0  #: unix time of the latest call, for event timestamps
        self._cuts: list = []  #: positions in out.events no event may move across (a snapshot's seq)

    def emit(self, topic: str, **fields) -> None:
        self.seq += 1  # counted even unpublished: a snapshot's seq must match what subscribers see
        if self.publish:
            fields["seq"] = self.seq
            fields["ts"] = self.wall
            self.out.events.append((topic, fields))

    # The three events of every task, built as one map literal each (no keyword dict to fill in
    # afterwards): with a subscriber they are most of what the broker does per task beside the task.

    def submitted(self, task_id: str, name: str, resources: dict, priority: int) -> None:
        self.seq = seq = self.seq + 1
        if self.publish:
            self.out.events.append((_SUBMITTED, {"task_id": task_id, "name": name, "resources": resources,
                                                 "priority": priority, "seq": seq, "ts": self.wall}))

    def started(self, task_id: str, name: str, worker: str, attempt: int, resources: dict) -> None:
        self.seq = seq = self.seq + 1
        if self.publish:
            self.out.events.append((_STARTED, {"task_id": task_id, "name": name, "worker": worker, "attempt": attempt,
                                               "resources": resources, "seq": seq, "ts": self.wall}))

    def succeeded(self, task_id: str, name: str, worker: str, run_s: float) -> None:
        self.seq = seq = self.seq + 1
        if self.publish:
            self.out.events.append((_SUCCEEDED, {"task_id": task_id, "name": name, "worker": worker, "run_s": run_s,
                                                 "seq": seq, "ts": self.wall}))

    def cut(self) -> None:
        """A snapshot was taken now: the events before it keep their seqs (it includes them)."""
        self._cuts.append(len(self.out.events))

    def in_runs(self, events: list) -> list:
        """``events`` (one flush's) reordered into longer runs of one topic where ``RUN_RANK``
        allows, seqs renumbered in the new order (each stretch keeps its own seqs)."""
        cuts, self._cuts = self._cuts, []
        if len(events) < 2:
            return events
        ordered: list = []
        if not cuts and _sorted_into(ordered, events):
            return ordered  # the usual flush: task events only, no snapshot among them
        cuts = set(cuts)
        ordered, stretch = [], []
        for i, event in enumerate(events):
            if i in cuts or event[0] not in RUN_RANK:
                _sorted_into(ordered, stretch)
                stretch = []
            (stretch if event[0] in RUN_RANK else ordered).append(event)
        _sorted_into(ordered, stretch)
        return ordered

    def failed(self, task, worker: str | None, error: dict, resources: dict) -> None:
        # error_type and resources let a subscriber keep per-resource queues and slots exact
        self.emit(Topic.TASK_FAILED, task_id=task.task_id, name=task.name, worker=worker, error=error_text(error),
                  error_type=error.get("type", "Error"), resources=resources)


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


def _sorted_into(ordered: list, stretch: list) -> bool:
    """Append ``stretch`` to ``ordered`` in ``RUN_RANK`` order (one bucket per topic, each event
    keeping its place within its topic), its seqs renumbered in the new order: a flush's events go
    out as one message per topic instead of one per alternation (a worker's DONE with 16 results and
    the 16 starts behind them: 2 messages, not 32). One pass; False, ``ordered`` untouched, where
    ``stretch`` holds a topic ``RUN_RANK`` does not know."""
    buckets: tuple = ([], [], [], [])
    last, moved, plain, scarce = 0, False, None, False  # plain: the last start's resources found not scarce
    for event in stretch:
        rank = _RANK_OF(event[0])
        if rank is None:
            return False
        if rank < last:
            moved = True
        else:
            last = rank
        if rank == 1 and not scarce:
            resources = event[1]["resources"]
            if resources is not plain:  # the same dict for every task of one name
                if _scarce(resources):
                    scarce = True  # the per-worker order, once every topic is known to be one of RUN_RANK's
                else:
                    plain = resources
        buckets[rank].append(event)
    if scarce:
        _sorted_per_worker(ordered, stretch)
        return True
    if not moved:
        ordered.extend(stretch)
        return True
    seqs = _seqs(stretch)
    start = len(ordered)
    for bucket in buckets:
        ordered.extend(bucket)
    _renumber(ordered, start, seqs)
    return True


def _scarce(resources: dict) -> bool:
    """Whether a start takes more than CPU slots."""
    return len(resources) > 1 or (len(resources) == 1 and "cpu" not in resources)


def _sorted_per_worker(ordered: list, stretch: list) -> None:
    """``stretch`` in ``RUN_RANK`` order where each worker's events keep their order: submissions
    first, then by depth on their worker (its first event, its second, ...) and within one depth by
    rank. Runs are only as long as the workers in the stretch: for stretches with scarce starts."""
    seqs = _seqs(stretch)
    start = len(ordered)
    levels: list = []  #: per depth, one list per rank 1..3
    depth: dict = {}  #: worker -> its events seen so far in this stretch
    for event in stretch:
        rank = RUN_RANK[event[0]]
        if rank == 0:
            ordered.append(event)
            continue
        worker = event[1].get("worker")
        k = 0 if worker is None else depth.get(worker, -1) + 1
        if worker is not None:
            depth[worker] = k
        if k == len(levels):
            levels.append(([], [], []))
        levels[k][rank - 1].append(event)
    for level in levels:
        for bucket in level:
            ordered.extend(bucket)
    _renumber(ordered, start, seqs)


def _seqs(stretch: list):
    """The seqs ``stretch`` holds, in order: a range where they are consecutive (as usual)."""
    first, last = stretch[0][1]["seq"], stretch[-1][1]["seq"]
    if last - first == len(stretch) - 1:
        return range(first, last + 1)
    return [fields["seq"] for _, fields in stretch]


def _renumber(ordered: list, start: int, seqs) -> None:
    for (_, fields), seq in zip(ordered[start:], seqs):
        fields["seq"] = seq


def runs(events: list) -> list:
    """``(topic, [fields, ...])`` per run of consecutive events of one topic, at most ``MAX_RUN``
    events each: one message each."""
    out: list = []
    last, run = None, None
    for topic, fields in events:
        if topic == last and len(run) < MAX_RUN:
            run.append(fields)
        else:
            run = [fields]
            out.append((topic, run))
            last = topic
    return out


def error_text(error: dict) -> str:
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"


def _pct(sorted_values: list, pct: int) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))
    return round(sorted_values[idx], 6)
