"""broker/events.py without a broker: a flush's events put in runs of one topic."""

from __future__ import annotations

from broker.events import Events, Outgoing


def test_a_flush_with_a_scarce_start_and_an_event_of_another_topic_keeps_its_order():
    """A start that takes a GPU keeps each worker's events in step; an event of a topic that
    does not move (here broker.stats and task.cancelled) cuts the flush into stretches instead
    of failing the whole flush (it raised KeyError, in the broker's loop)."""
    out = Outgoing()
    events = Events(out)
    events.started("t1", "gpu", "w1", 1, {"gpu": 1})
    events.emit("broker.stats", queued=0)
    events.submitted("t2", "n", {"cpu": 1}, 0)
    events.emit("task.cancelled", task_id="t2", name="n", resources={"cpu": 1})
    events.succeeded("t1", "gpu", "w1", 0.1)
    events.started("t3", "gpu", "w1", 1, {"gpu": 1})
    ordered = events.in_runs(out.events)
    assert [topic for topic, _ in ordered] == ["task.started", "broker.stats", "task.submitted", "task.cancelled",
                                                "task.succeeded", "task.started"]
    assert [fields["seq"] for _, fields in ordered] == list(range(1, 7))


def test_cpu_starts_move_ahead_of_results_and_seqs_follow_the_new_order():
    out = Outgoing()
    events = Events(out)
    events.succeeded("t1", "n", "w1", 0.1)
    events.started("t2", "n", "w1", 1, {"cpu": 1})
    events.succeeded("t2", "n", "w1", 0.1)
    events.started("t3", "n", "w1", 1, {"cpu": 1})
    ordered = events.in_runs(out.events)
    assert [(topic, fields["task_id"]) for topic, fields in ordered] == [
        ("task.started", "t2"), ("task.started", "t3"), ("task.succeeded", "t1"), ("task.succeeded", "t2")]
    assert [fields["seq"] for _, fields in ordered] == [1, 2, 3, 4]
