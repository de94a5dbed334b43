"""broker/events.py without a broker: events put in runs of one topic as they are emitted."""

from __future__ import annotations

import gc

import hypothesis.strategies as st
from hypothesis import given, settings

from broker.events import MAX_RUN, Events
from tests.harness import published

RUN_TOPICS = ("task.submitted", "task.started", "task.succeeded", "task.failed")


def test_a_flush_with_a_scarce_start_and_an_event_of_another_topic_keeps_its_order():
    """A start that takes a GPU keeps each worker's events in step; an event of a topic that
    does not move (here broker.stats and task.cancelled) cuts the flush into stretches instead
    of failing the whole flush (it raised KeyError, in the broker's loop)."""
    events = Events()
    events.started("t1", "gpu", "w1", 1, {"gpu": 1})
    events.emit("broker.stats", queued=0)
    events.submitted("t2", "n", {"cpu": 1}, 0)
    events.emit("task.cancelled", task_id="t2", name="n", resources={"cpu": 1})
    events.succeeded("t1", "gpu", "w1", 0.1)
    events.started("t3", "gpu", "w1", 1, {"gpu": 1})
    ordered = published(events.take())
    assert [topic for topic, _ in ordered] == ["task.started", "broker.stats", "task.submitted", "task.cancelled",
                                                "task.succeeded", "task.started"]
    assert [fields["seq"] for _, fields in ordered] == list(range(1, 7))


def test_cpu_starts_move_ahead_of_results_and_seqs_follow_the_new_order():
    events = Events()
    events.succeeded("t1", "n", "w1", 0.1)
    events.started("t2", "n", "w1", 1, {"cpu": 1})
    events.succeeded("t2", "n", "w1", 0.1)
    events.started("t3", "n", "w1", 1, {"cpu": 1})
    runs = events.take()
    assert [(topic, len(run)) for topic, run in runs] == [("task.started", 2), ("task.succeeded", 2)]
    ordered = published(runs)
    assert [(topic, fields["task_id"]) for topic, fields in ordered] == [
        ("task.started", "t2"), ("task.started", "t3"), ("task.succeeded", "t1"), ("task.succeeded", "t2")]
    assert [fields["seq"] for _, fields in ordered] == [1, 2, 3, 4]


def test_task_events_read_as_the_maps_spec_fixes_and_are_never_tracked_by_the_garbage_collector():
    """Subscribers read exactly the maps the broker published as dicts before (the same keys in
    the same order); the broker's events are objects the cyclic collector never walks."""
    events = Events()
    events.wall = 1700000000.25
    task = type("T", (), {"task_id": "t1", "name": "n"})()
    events.submitted("t1", "n", {"cpu": 1}, 3)
    events.emit("broker.stats", queued=1)
    events.started("t1", "n", "w1", 1, {"cpu": 1})
    events.emit("broker.stats", queued=0)
    events.succeeded("t1", "n", "w1", 0.5)
    events.emit("broker.stats", queued=0)
    events.failed(task, None, {"type": "ValueError", "message": "bad"}, {"cpu": 1})
    runs = events.take()
    task_events = [event for topic, run in runs if topic in RUN_TOPICS for event in run]
    assert len(task_events) == 4 and not any(gc.is_tracked(event) for event in task_events)
    maps = {topic: fields for topic, fields in published(runs) if topic in RUN_TOPICS}
    assert maps["task.submitted"] == {"task_id": "t1", "name": "n", "resources": {"cpu": 1}, "priority": 3, "seq": 1,
                                      "ts": 1700000000.25}
    assert list(maps["task.started"]) == ["task_id", "name", "worker", "attempt", "resources", "seq", "ts"]
    assert maps["task.succeeded"] == {"task_id": "t1", "name": "n", "worker": "w1", "run_s": 0.5, "seq": 5,
                                      "ts": 1700000000.25}
    assert maps["task.failed"] == {"task_id": "t1", "name": "n", "worker": None, "error": "ValueError: bad",
                                   "error_type": "ValueError", "resources": {"cpu": 1}, "seq": 7, "ts": 1700000000.25}


def test_a_stretch_with_a_gap_in_its_seqs_keeps_its_seqs_and_its_order():
    """Events built while nobody subscribed are counted, not built: the seqs of a stretch then skip
    them, and the stretch is numbered with the seqs it holds (the reader sees the gap, and resyncs)."""
    events = Events()
    events.succeeded("t1", "n", "w1", 0.1)
    events.publish = False
    events.submitted("t9", "n", {"cpu": 1}, 0)  # seq 2: nobody hears it
    events.publish = True
    events.started("t2", "n", "w1", 1, {"cpu": 1})
    events.submitted("t3", "n", {"cpu": 1}, 0)
    ordered = published(events.take())
    assert [(topic, fields["task_id"], fields["seq"]) for topic, fields in ordered] == [
        ("task.submitted", "t3", 1), ("task.started", "t2", 3), ("task.succeeded", "t1", 4)]


def test_a_run_is_joined_by_the_next_events_of_its_topic_up_to_max_run():
    events = Events()
    for i in range(MAX_RUN - 2):
        events.emit("worker.joined", worker=f"w{i}")
    events.cut()  # a snapshot between two events of one topic: one message may still hold both
    for i in range(MAX_RUN - 2, MAX_RUN + 5):
        events.emit("worker.joined", worker=f"w{i}")
    for i in range(2 * MAX_RUN + 1):
        events.submitted(f"t{i}", "n", {"cpu": 1}, 0)
    runs = events.take()
    assert [(topic, len(run)) for topic, run in runs] == [
        ("worker.joined", MAX_RUN), ("worker.joined", 5),
        ("task.submitted", MAX_RUN), ("task.submitted", MAX_RUN), ("task.submitted", 1)]
    assert [fields["seq"] for _, fields in published(runs)] == list(range(1, MAX_RUN + 5 + 2 * MAX_RUN + 2))
    assert events.take() == [] and events.held == 0


# ------------------------------------------------------------- any mix of events, as a subscriber checks it

@st.composite
def streams(draw):
    """Emissions as a broker makes them: tasks submitted, started on a worker whose slot or GPU is
    free, finished there; events of other topics, snapshots and flushes in between."""
    steps = []
    gpu = draw(st.booleans())
    workers = {f"w{i}": None for i in range(draw(st.integers(1, 3)))}  #: worker -> task it runs
    queued, n = [], 0
    actions = ["submit", "submit", "start", "start", "finish", "finish", "other", "cut", "take"]
    for action in draw(st.lists(st.sampled_from(actions), min_size=10, max_size=150)):
        if action == "submit":
            n += 1
            queued.append(f"t{n}")
            steps.append(("submitted", f"t{n}"))
        elif action == "start" and queued:
            free = [w for w, t in workers.items() if t is None]
            if free:
                worker = draw(st.sampled_from(free))
                workers[worker] = queued.pop(0)
                steps.append(("started", workers[worker], worker, {"gpu": 1} if gpu else {"cpu": 1}))
        elif action == "finish":
            busy = [w for w, t in workers.items() if t is not None]
            if busy:
                worker = draw(st.sampled_from(busy))
                steps.append((draw(st.sampled_from(["succeeded", "failed"])), workers[worker], worker))
                workers[worker] = None
        elif action in ("other", "cut", "take"):
            steps.append((action,))
    return gpu, steps


@settings(max_examples=150, deadline=None)
@given(streams())
def test_any_stream_reads_in_seq_order_each_task_in_lifecycle_order_nothing_moved_across_a_fixed_point(stream):
    gpu, steps = stream
    events = Events()
    takes: list = []  #: each flush's runs
    emitted: list = []  #: (topic, task_id) of every event, in the order emitted
    fixed: list = []  #: (events emitted before a snapshot or another topic's event, whether an event)
    topics = {"submitted": "task.submitted", "started": "task.started", "succeeded": "task.succeeded",
              "failed": "task.failed"}
    for step in steps:
        kind = step[0]
        if kind == "submitted":
            events.submitted(step[1], "n", {"cpu": 1}, 0)
        elif kind == "started":
            events.started(step[1], "n", step[2], 1, step[3])
        elif kind == "succeeded":
            events.succeeded(step[1], "n", step[2], 0.1)
        elif kind == "failed":
            events.failed(type("T", (), {"task_id": step[1], "name": "n"})(), step[2], {"type": "E"}, {"cpu": 1})
        elif kind == "other":
            fixed.append((len(emitted), True))
            events.emit("broker.stats", queued=0)
            emitted.append(("broker.stats", None))
        elif kind == "cut":
            fixed.append((len(emitted), False))
            events.cut()
        else:
            takes.append(events.take())
        if kind in topics:
            emitted.append((topics[kind], step[1]))
    takes.append(events.take())
    for runs in takes:  # one message each: one topic, at most MAX_RUN, none of a flush needlessly split
        for i, (topic, run) in enumerate(runs):
            assert 1 <= len(run) <= MAX_RUN
            assert i == 0 or runs[i - 1][0] != topic or len(runs[i - 1][1]) == MAX_RUN
    runs = [run for runs in takes for run in runs]
    read = published(runs)
    assert [fields["seq"] for _, fields in read] == list(range(1, len(emitted) + 1))
    order = {"task.submitted": 0, "task.started": 1, "task.succeeded": 2, "task.failed": 2}
    seen: dict = {}
    for topic, fields in read:
        if topic in order:
            assert order[topic] > seen.get(fields["task_id"], -1), f"{fields['task_id']} out of lifecycle order"
            seen[fields["task_id"]] = order[topic]
    for count, own in fixed:  # nothing moves across a fixed point; another topic's event keeps its seq
        assert sorted(emitted[:count], key=repr) == sorted(((t, f.get("task_id")) for t, f in read[:count]), key=repr)
        if own:
            assert read[count][0] == "broker.stats"
    if gpu:  # nobody counting GPUs from the stream sees one taken twice
        running = {}
        for topic, fields in read:
            if topic == "task.started":
                assert running.get(fields["worker"]) is None, "a GPU taken twice"
                running[fields["worker"]] = fields["task_id"]
            elif topic in ("task.succeeded", "task.failed"):
                running[fields["worker"]] = None
