"""The gateway's event hub without sockets: ring, resume, snapshots after gaps, slow readers, message forms."""

from __future__ import annotations

import asyncio
import zlib

from client.web.events import HOLD_MAX_S, EventHub
from client.web.sse import GZIP_HEADER, Batch, Stream, accepts_gzip, sse
from client.web.metrics import Metrics
from client.web.ring import EventRing
from client.web.tasks import TaskWindow


def ev(seq: int, topic: str = "task.submitted", **fields) -> dict:
    return {"topic": topic, "seq": seq, "ts": 1.0, "task_id": f"t{seq}", "name": "noop", **fields}


def _lines(data: bytes | str) -> list[str]:
    """What a stream sends (bytes) or starts with (text), line by line."""
    return (data.decode() if isinstance(data, bytes) else data).splitlines()


def ids(data: bytes | str) -> list[int]:
    return [int(line[4:]) for line in _lines(data) if line.startswith("id: ")]


def events_of(data: bytes | str) -> list[str]:
    return [line[7:] for line in _lines(data) if line.startswith("event: ")]


def run(coro):
    return asyncio.run(coro)


class Feed:
    """A source the test drives: items put on a queue come out of the hub's subscription."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    async def source(self):
        """As ``client.follow.follow_batches``: a batch of one run ``(topic, [fields])`` per item put."""
        while True:
            item = dict(await self.queue.get())
            yield [(item.pop("topic"), [item])]

    async def status(self) -> dict:
        return {"seq": self.status_seq, "workers": [], "queued": 0, "running": 0, "done": 0, "failed": 0}

    status_seq = 0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def hub_with(feed: Feed, **kw) -> EventHub:
    kw.setdefault("tick_s", 0)  # batches go out at the next loop turn: the tests need not wait a tick
    hub = EventHub(feed.source, feed.status, metrics=Metrics(), **kw)
    hub.start()
    await feed.queue.put({"topic": "snapshot", "seq": 0, "snapshot": await feed.status()})
    await settle()
    return hub


def test_a_resumed_stream_gets_every_event_after_its_id_once():
    async def main():
        feed = Feed()
        hub = await hub_with(feed)
        for seq in range(1, 11):
            await feed.queue.put(ev(seq))
        await settle()
        assert hub.resumable(4) and hub.resumable(0) and not hub.resumable(11)
        stream, text = hub.resume(4)
        assert ids(text) == [5, 6, 7, 8, 9, 10]
        for seq in range(11, 14):
            await feed.queue.put(ev(seq))
        await settle()
        assert ids(stream.take()) == [11, 12, 13]
        await hub.close()

    run(main())


def test_the_ring_forgets_the_oldest_events_and_such_an_id_is_not_resumable():
    async def main():
        feed = Feed()
        hub = await hub_with(feed, ring_events=5)
        for seq in range(1, 21):
            await feed.queue.put(ev(seq))
        await settle()
        assert not hub.resumable(10) and hub.resumable(15) and hub.resumable(20)
        await hub.close()

    run(main())


def test_a_new_stream_skips_events_its_snapshot_already_holds():
    async def main():
        feed = Feed()
        hub = await hub_with(feed)
        feed.status_seq = 3  # the broker is ahead of the events received so far
        stream, text = await hub.fresh(1.0)
        assert events_of(text) == ["snapshot"] and ids(text) == [3]
        for seq in range(1, 7):
            await feed.queue.put(ev(seq))
        await settle()
        assert ids(stream.take()) == [4, 5, 6]
        await hub.close()

    run(main())


def test_after_a_gap_every_stream_gets_a_fresh_snapshot_and_continues_from_it():
    async def main():
        feed = Feed()
        hub = await hub_with(feed)
        await feed.queue.put(ev(1))
        await settle()
        stream, _ = hub.resume(1)
        await feed.queue.put({"topic": "snapshot", "seq": 50, "snapshot": {"seq": 50, "workers": []}})
        await feed.queue.put(ev(51))
        await settle()
        text = stream.take()
        assert events_of(text) == ["snapshot", "task.submitted"] and ids(text) == [50, 51]
        assert not hub.resumable(1) and hub.resumable(50)
        await hub.close()

    run(main())


def test_a_reader_that_falls_behind_is_dropped_and_the_others_go_on():
    async def main():
        feed = Feed()
        hub = await hub_with(feed, stream_buffer_bytes=4000)
        slow, _ = hub.resume(0)
        fast, _ = hub.resume(0)
        got = []
        for seq in range(1, 200):
            await feed.queue.put(ev(seq))
            await settle()
            got += ids(fast.take())  # the fast reader keeps up; the slow one never reads
        assert slow.dropped and slow not in hub.streams and fast in hub.streams
        assert got == list(range(1, 200))
        assert hub.metrics.sse_dropped._value.get() == 1
        await hub.close()

    run(main())


def test_task_events_feed_the_window_and_the_metrics():
    async def main():
        feed = Feed()
        window = TaskWindow(size=3)
        hub = EventHub(feed.source, feed.status, metrics=Metrics(), on_events=window.events, tick_s=0)
        hub.start()
        await feed.queue.put({"topic": "snapshot", "seq": 0, "snapshot": await feed.status()})
        seq = 0
        for n in range(5):
            for topic in ("task.submitted", "task.started", "task.succeeded"):
                seq += 1
                await feed.queue.put(ev(seq, topic, task_id=f"x{n}", worker="w", attempt=1, run_s=0.01))
        await settle()
        assert len(window) == 3 and window.get("x0") is None
        assert window.get("x4").state == "succeeded"
        metrics = hub.metrics.render().decode()
        assert 'gridq_tasks_total{event="succeeded"} 5.0' in metrics
        assert "gridq_task_run_seconds_count 5.0" in metrics
        await hub.close()

    run(main())


def _run(*seqs: int, topic: str = "task.submitted") -> tuple[str, list]:
    return topic, [{k: v for k, v in ev(s, topic).items() if k != "topic"} for s in seqs]


def test_a_stream_filters_a_batch_that_straddles_what_it_has():
    stream = Stream(after=5)
    stream.put(Batch.of([_run(3, 4), _run(5, 6, topic="task.started")]))
    stream.put(Batch.of([_run(7)]))
    text = stream.take()
    assert ids(text) == [6, 7] and events_of(text) == ["task.started", "task.submitted"]


def test_events_wait_while_a_submission_awaits_acceptance_but_never_past_the_hold_s_bound():
    async def main():
        feed = Feed()
        hub = await hub_with(feed)
        async with hub.hold():
            await feed.queue.put(ev(1))
            await settle()
            assert hub.head == 0, "held while the submission waits"
        await settle()
        assert hub.head == 1
        async with hub.hold():  # a submission that waits long: events go on after HOLD_MAX_S
            await feed.queue.put(ev(2))
            await asyncio.sleep(HOLD_MAX_S + 0.5)
            assert hub.head == 2
        await hub.close()

    run(main())


def test_events_after_a_snapshot_in_the_same_read_are_counted():
    """One read may carry a snapshot (the stream broke) and the events that follow it: those are
    counted in the metrics and reach the streams too (the snapshot's flush starts new counts)."""
    async def main():
        feed = Feed()
        batches: asyncio.Queue = asyncio.Queue()

        async def source():
            while True:
                yield await batches.get()

        hub = EventHub(source, feed.status, metrics=Metrics(), tick_s=0)
        hub.start()
        await batches.put([("snapshot", [{"seq": 0, "snapshot": await feed.status()}])])
        await settle()
        stream, _ = hub.resume(0)
        succeeded = [(e.pop("topic"), [e]) for e in (ev(s, "task.succeeded", run_s=0.01) for s in (1, 11, 12))]
        snap = {"seq": 10, "snapshot": {**await feed.status(), "seq": 10, "done": 3}, "missed": {"succeeded": 2}}
        await batches.put(succeeded[:1] + [("snapshot", [snap])] + succeeded[1:])
        await settle()
        metrics = hub.metrics.render().decode()
        assert 'gridq_tasks_total{event="succeeded"} 5.0' in metrics  # 1 + 2 missed + 2 after the snapshot
        assert "gridq_task_run_seconds_count 3.0" in metrics
        assert ids(stream.take()) == [1, 10, 11, 12]
        await hub.close()

    run(main())


def test_a_gzip_stream_sends_the_same_events_in_order_as_a_plain_one_from_the_same_shared_batches():
    plain, gzip = Stream(after=2), Stream(after=2, gzip=True)
    batches = [Batch.of([_run(1, 2, 3), _run(4, 5, topic="task.started")]),  # straddles what they have
               Batch(sse(None, "gateway.link", {"link": "live"}), None, None, kind="note"),
               Batch.of([_run(6, topic="task.succeeded"), _run(7, 8)])]
    sent_plain, sent_gzip = [b"retry: 1000\n"], [GZIP_HEADER + gzip.encode(b"retry: 1000\n")]
    for batch in batches:  # a write per tick, as the pump makes them
        assert plain.put(batch) and gzip.put(batch)
        sent_plain.append(plain.take())
        sent_gzip.append(gzip.take())
    sent_gzip.append(gzip.encode(b": keep-alive\n\n"))
    sent_plain.append(b": keep-alive\n\n")
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a browser's gzip decoder, fed as the chunks come
    got = b"".join(reader.decompress(chunk) for chunk in sent_gzip)
    assert got == b"".join(sent_plain)
    assert ids(got) == [3, 4, 5, 6, 7, 8]
    assert events_of(got) == ["task.submitted", "task.started", "task.started", "gateway.link", "task.succeeded",
                              "task.submitted", "task.submitted"]
    assert batches[2].gzipped() is batches[2].gzipped(), "compressed once, shared by every gzip stream"
    assert sum(map(len, sent_gzip[1:])) < sum(map(len, sent_plain[1:]))


def test_gzip_is_taken_where_accept_encoding_allows_it():
    assert accepts_gzip("gzip, deflate, br, zstd") and accepts_gzip("br;q=1.0, gzip;q=0.5") and accepts_gzip("*")
    assert not accepts_gzip(None) and not accepts_gzip("identity") and not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("deflate, br") and not accepts_gzip("gzip;q=bad")


def test_a_run_of_events_is_the_same_sse_text_as_its_events_one_by_one_even_with_percent_signs():
    from client.web.sse import sse_run

    events = [{"seq": 7, "task_id": "a%d", "name": "50%"}, {"seq": 8, "error": "100%s done %%"},
              {"seq": 9, "args": ["%(x)s", "\n%"]}]
    for topic in ("task.failed", "odd%topic"):
        assert sse_run(topic, events) == b"".join(sse(e["seq"], topic, e) for e in events)
    assert sse_run("task.started", []) == b""


def test_run_times_of_a_tick_are_counted_as_one_observation_each():
    from client.web.metrics import RunHistogram, RUN_BUCKETS

    runs = [[{"run_s": v} for v in (0.0, 0.0005, 0.0007, 1.0, 4000.0)], [{"run_s": 2}]]
    fast, slow = RunHistogram("a", "b", RUN_BUCKETS), RunHistogram("a", "b", RUN_BUCKETS)
    fast.observe_runs(runs)
    slow.observe_all([e["run_s"] for run in runs for e in run])
    assert fast.counts == slow.counts and sum(fast.counts) == 6 and abs(fast.sum - slow.sum) < 1e-9
    fast.observe_runs([[{"run_s": None}, {}, {"run_s": "x"}, {"run_s": float("nan")}, {"run_s": 0.1}]])
    assert sum(fast.counts) == 7, "what is not a run time is left out, the rest counted"


def test_the_window_takes_the_streams_tasks_from_the_ring_only_when_read():
    async def main():
        feed = Feed()
        window = TaskWindow(size=100)
        hub = await hub_with(feed, on_events=window.notice, on_clear=window.ring_cleared, ring_events=12)
        window.follow(hub.ring)
        seq = 0

        async def task(n: int, *topics: str) -> None:
            nonlocal seq
            for topic in topics:
                seq += 1
                await feed.queue.put(ev(seq, topic, task_id=f"x{n}", worker="w", attempt=1, run_s=0.01))
            await settle()

        await task(0, "task.submitted", "task.started")
        await task(1, "task.submitted", "task.started", "task.succeeded")
        assert not window._submitted, "nothing done per event"
        assert window.get("x0").state == "running" and window.get("x1").state == "succeeded" and len(window) == 2
        waiting = asyncio.ensure_future(window.wait("x0", 30))
        await task(0, "task.succeeded")
        assert (await asyncio.wait_for(waiting, 5)).state == "succeeded"
        # more than the ring holds goes by unread: the window starts again from the ring, no state left stale
        await task(2, "task.submitted", "task.started")
        for n in range(3, 8):
            await task(n, "task.submitted", "task.started", "task.succeeded")
        assert window.get("x0") is None and window.get("x2") is None  # their submissions left the ring
        assert [t["task_id"] for t in window.list()[0]] == ["x7", "x6", "x5", "x4"]
        assert all(t["state"] == "succeeded" for t in window.list()[0])
        await hub.close()

    run(main())


def test_the_ring_keeps_whole_runs_of_at_least_its_size_in_events_and_cuts_the_first_one_it_hands_back():
    ring = EventRing(10)
    assert not ring and ring.first is None and ring.after(0) == []
    seq = 0
    for n in (4, 4, 4, 4):  # four runs of four events
        ring.add("task.started", [{"seq": s} for s in range(seq + 1, seq + n + 1)])
        seq += n
    assert len(ring) == 12 and (ring.first, ring.last) == (5, 16), "the oldest run left whole; ten or more stay"
    assert [[e["seq"] for e in events] for _, events in ring.after(6)] == [[7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert ring.after(16) == [] and sum(len(e) for _, e in ring.after(0)) == 12
    ring.add("task.succeeded", [{"seq": s} for s in range(17, 17 + 300)])  # a run longer than the size stays whole
    assert len(ring) == 300 and ring.first == 17
    ring.clear()
    assert not ring and ring.last is None
