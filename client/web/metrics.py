"""/metrics: Prometheus counters and gauges fed from the event stream (one registry per gateway)."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from itertools import chain
from operator import methodcaller

import numpy as np

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from client.web.records import getter

#: task events counted in gridq_tasks_total{event=...}
TASK_EVENTS = ("submitted", "started", "succeeded", "failed", "retried", "cancelled")
#: gridq_task_run_seconds buckets: no-ops take microseconds, real work minutes
RUN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

CONTENT_TYPE = CONTENT_TYPE_LATEST

_maybe_run_s = methodcaller("get", "run_s")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tasks = Counter("gridq_tasks", "Task events seen on the broker's event stream", ["event"],
                             registry=self.registry)
        self._by_topic = {f"task.{e}": self.tasks.labels(event=e) for e in TASK_EVENTS}
        self.queued = Gauge("gridq_tasks_queued", "Tasks waiting for a worker", registry=self.registry)
        self.running = Gauge("gridq_tasks_running", "Tasks running on workers", registry=self.registry)
        self.workers = Gauge("gridq_workers", "Live workers", registry=self.registry)
        self.run_seconds = RunHistogram("gridq_task_run_seconds", "Run time of succeeded tasks, seconds", RUN_BUCKETS)
        self.registry.register(self.run_seconds)
        self.sse_streams = Gauge("gridq_web_event_streams", "Open /api/events streams", registry=self.registry)
        self.sse_dropped = Counter("gridq_web_event_streams_dropped", "Streams disconnected for falling behind",
                                   registry=self.registry)
        self.throughput = Throughput()
        self.resyncs = Counter("gridq_web_snapshots", "Snapshots the gateway took of the broker's state",
                               registry=self.registry)

    def events(self, counts: dict, succeeded: list) -> None:
        """A batch of events: ``counts`` per topic, and runs of the task.succeeded ones (their run times)."""
        self.throughput.add(counts)
        for topic, n in counts.items():
            child = self._by_topic.get(topic)
            if child is not None:
                child.inc(n)
        self.run_seconds.observe_runs(succeeded)

    def state(self, fields: dict) -> None:
        """A snapshot or a broker.stats event: the gauges."""
        if isinstance(fields.get("queued"), int):
            self.queued.set(fields["queued"])
        if isinstance(fields.get("running"), int):
            self.running.set(fields["running"])
        workers = fields.get("workers")
        if isinstance(workers, list):
            self.workers.set(len(workers))
        elif isinstance(workers, int):
            self.workers.set(workers)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RunHistogram:
    """A Prometheus histogram that takes a batch of observations in one call: a bisect and an add per
    value (prometheus_client's Histogram.observe takes a lock and walks the buckets for each one)."""

    def __init__(self, name: str, documentation: str, buckets: tuple) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)
        self._bounds = np.array(buckets, dtype=float)
        self.counts = [0] * (len(buckets) + 1)  #: per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0

    def observe_all(self, values: list) -> None:
        counts, bounds = self.counts, self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # the first bound >= value: Prometheus' le
        self.sum += sum(values)

    def observe_runs(self, runs: list) -> None:
        """The ``run_s`` of runs of task.succeeded events, in C (numpy) where every one is a number."""
        total = sum(map(len, runs))
        if not total:
            return
        try:
            values = np.fromiter(chain.from_iterable([map(getter(run, "run_s"), run) for run in runs if run]),
                                 dtype=float, count=total)
        except (KeyError, AttributeError, TypeError, ValueError):  # one without a run time, or not a number: one at a time
            values = None
        if values is None or not np.isfinite(values).all():
            self.observe_all([v for v in map(_maybe_run_s, chain.from_iterable(runs)) if _number(v)])
            return
        found = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self.counts))
        self.counts = [a + int(b) for a, b in zip(self.counts, found)]
        self.sum += float(values.sum())

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(repr, map(float, self.bounds)), "+Inf"], self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class Throughput:
    """Tasks submitted, succeeded and failed per second over the last ``seconds``: the page's chart
    starts full instead of empty. Fixed size whatever the rate."""

    TOPICS = ("task.submitted", "task.succeeded", "task.failed")

    def __init__(self, seconds: int = 300) -> None:
        self.seconds = seconds
        self._rows: deque = deque()  #: [unix second, submitted, succeeded, failed], oldest first

    def add(self, counts: dict, now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        if not self._rows or self._rows[-1][0] != second:
            self._rows.append([second, 0, 0, 0])
            while self._rows[0][0] <= second - self.seconds:
                self._rows.popleft()
        row = self._rows[-1]
        for i, topic in enumerate(self.TOPICS, 1):
            row[i] += counts.get(topic, 0)

    def rows(self) -> list:
        return [list(r) for r in self._rows]


__all__ = ["Metrics", "RunHistogram", "Throughput", "CONTENT_TYPE", "TASK_EVENTS"]
