"""The gateway's subscription: the flood's task events as records (the same JSON as maps, nothing
lost when a message does not fit), and reads gathered while a flood lasts."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq

from broker.protocol import ProtocolError, read_events
from client.follow import FLOOD_EVENTS, follow_batches
from client.web.events import EventHub
from client.web.metrics import Metrics
from client.web.records import Record, Submitted, Started, Succeeded, read_records
from client.web.sse import sse_run
from client.web.tasks import TaskWindow
from tests.test_end_to_end import running  # noqa: F401 -- the same two-worker cluster fixture
from tests.test_web_events import ids, settle

_lines = msgspec.json.Encoder().encode_lines
_pack = msgspec.msgpack.encode
_KINDS = {"task.submitted": Submitted, "task.started": Started, "task.succeeded": Succeeded}


def _task_events(n: int, seq: int = 1) -> list[tuple[str, dict]]:
    """``n`` no-op tasks' events as the broker makes them (broker/events.py's fields, in its order)."""
    out = []
    for i in range(n):
        task_id = f"t{i}"
        out += [("task.submitted", {"task_id": task_id, "name": "noop", "resources": {"cpu": 1}, "priority": 0}),
                ("task.started", {"task_id": task_id, "name": "noop", "worker": "w", "attempt": 1,
                                  "resources": {"cpu": 1}}),
                ("task.succeeded", {"task_id": task_id, "name": "noop", "worker": "w", "run_s": 0.001 * i})]
    for topic, fields in out:
        fields.update(seq=seq, ts=1796188944.5 + seq)
        seq += 1
    return out


def test_a_real_brokers_task_events_decode_as_records_with_the_same_json_as_maps(running):
    from client import Client

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.subscribe(b"task.")
    sub.connect(running.events)
    try:
        with Client(running.frontend) as c:
            deadline = time.monotonic() + 30
            while not sub.poll(50):  # the subscription is live once a task's events arrive
                c.map("square", [1])
                assert time.monotonic() < deadline, "no event from the broker"
            assert c.map("square", range(300)) == [i * i for i in range(300)]
        seen: dict[str, int] = {}
        while sub.poll(500):
            topic, body = sub.recv_multipart()
            records, maps = read_records(topic, body), read_events(body)
            kind = _KINDS.get(topic.decode())
            if kind is not None:  # a change of the broker's fields shows here: read as maps, slower
                assert all(type(r) is kind for r in records), (topic, maps[0])
                seen[topic.decode()] = seen.get(topic.decode(), 0) + len(records)
            assert _lines(records) == _lines(maps)
            assert [r["seq"] for r in records] == [m["seq"] for m in maps]
        assert seen.get("task.succeeded", 0) >= 300 and seen.get("task.submitted", 0) >= 300
    finally:
        sub.close(linger=0)


def test_a_message_of_another_shape_is_read_as_maps_and_nothing_is_lost():
    (_, started), = [e for e in _task_events(1) if e[0] == "task.started"]
    fits = read_records(b"task.started", _pack([started, started]))
    assert [type(r) for r in fits] == [Started, Started] and fits[0].get("worker") == "w"
    assert fits[0].get("error") is None and fits[0]["attempt"] == 1
    more = {**started, "host": "n1"}
    fewer = {k: v for k, v in started.items() if k != "attempt"}
    for fields in (more, fewer):
        got = read_records(b"task.started", _pack(fields))
        assert got == [fields] and type(got[0]) is dict
    assert read_records(b"task.failed", _pack({"task_id": "x", "seq": 3})) == [{"task_id": "x", "seq": 3}]
    with pytest.raises(ProtocolError):
        read_records(b"task.started", b"\xc1 not msgpack")


def test_records_go_through_the_hub_the_ring_the_window_and_the_metrics_as_maps_do():
    events = _task_events(40)

    async def through_hub(as_records: bool):
        window = TaskWindow(size=100)
        hub = EventHub(_nothing, _status, metrics=Metrics(), on_events=window.notice, on_clear=window.ring_cleared,
                       tick_s=0)
        window.follow(hub.ring)
        hub._on_items([("snapshot", [{"seq": 0, "snapshot": await _status()}])])
        stream = hub._register(0)
        for i in range(0, len(events), 6):  # runs of one topic, as messages bring them
            for topic, fields in events[i:i + 6]:
                kind = _KINDS[topic]
                hub._on_items([(topic, [msgspec.convert(fields, kind) if as_records else dict(fields)])])
        await settle()
        if as_records:
            assert isinstance(hub.ring.after(0)[0][1][0], Record)
        _, resumed = hub.resume(3)
        metrics = [line for line in hub.metrics.render().splitlines() if b"_created" not in line]  # (a clock time)
        return (stream.take(), resumed, metrics, [t["state"] for t in window.list()[0]],
                window.get("t7").summary())

    assert asyncio.run(through_hub(True)) == asyncio.run(through_hub(False))
    sent = asyncio.run(through_hub(True))[0]
    assert ids(sent) == list(range(1, 121))


def test_a_run_of_records_and_maps_together_is_the_same_text():
    events = [f for t, f in _task_events(4) if t == "task.started"]
    mixed = [msgspec.convert(f, Started) if i % 2 else f for i, f in enumerate(events)]
    assert sse_run("task.started", mixed) == sse_run("task.started", events)


async def _nothing():
    if False:
        yield


async def _status() -> dict:
    return {"seq": 0, "workers": [], "queued": 0, "running": 0, "done": 0, "failed": 0}


class _Client:
    """What follow_batches needs of an AsyncClient: a context, a snapshot request, whether closed."""

    def __init__(self, ctx: zmq.Context) -> None:
        self._ctx, self._security, self._closed = ctx, None, False
        self.seq = 0  #: the last seq published: what a snapshot holds

    async def _call(self, command, body) -> dict:
        return {"snapshot": {**await _status(), "seq": self.seq}}


def test_while_a_flood_lasts_the_subscription_gathers_messages_between_reads_and_a_trickle_comes_at_once():
    async def main():
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.bind("inproc://flood")
        client = _Client(ctx)
        got: list[tuple[float, list[int]]] = []  # per read: when, and the number of events of each run
        seq = 0

        def publish(n: int) -> None:
            nonlocal seq
            body = _pack([{"task_id": f"t{s}", "seq": s} for s in range(seq + 1, seq + n + 1)])
            pub.send_multipart([b"task.submitted", body])
            seq = client.seq = seq + n

        async def follow():
            async for batch in follow_batches(client, "inproc://flood", flood_wait_s=1.0):
                got.append((time.monotonic(), [len(events) for topic, events in batch if topic != "snapshot"]))

        async def until(count: int) -> None:
            deadline = time.monotonic() + 20
            while len(got) < count:
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.005)

        reader = asyncio.ensure_future(follow())
        try:
            deadline = time.monotonic() + 20
            while not any(runs for _, runs in got):  # the subscription is live once an event comes through
                assert time.monotonic() < deadline, got
                publish(1)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            del got[:]
            publish(FLOOD_EVENTS)
            await until(1)
            assert got[-1][1] == [FLOOD_EVENTS]
            flooded_at = got[-1][0]
            for _ in range(3):  # while the follower waits, three messages a few milliseconds apart
                publish(2)
                await asyncio.sleep(0.02)
            await until(2)
            assert got[-1][1] == [2, 2, 2], "one read for all three"
            assert got[-1][0] - flooded_at >= 0.9
            await asyncio.sleep(0.1)
            published_at = time.monotonic()
            publish(1)  # after a small read: a trickle, read at once
            await until(3)
            assert got[-1][1] == [1] and got[-1][0] - published_at < 0.5
        finally:
            client._closed = True
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            pub.close(linger=0)
            ctx.term()

    asyncio.run(asyncio.wait_for(main(), 60))
