"""AsyncClient end to end: real broker and worker processes, the client on an asyncio loop."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import numpy as np
import zmq.utils.garbage
import pytest

from client import AsyncClient, BrokerUnavailable, EncodeError, TaskError, TaskLost
from tests.conftest import silent_endpoints
from tests.test_end_to_end import running  # noqa: F401 -- the same two-worker cluster fixture


def run(coro, timeout: float = 60.0):
    """Run ``coro`` on a fresh event loop, failing the test (not hanging) after ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def aclient(cluster, **kwargs) -> AsyncClient:
    kwargs.setdefault("timeout", 2.0)
    return AsyncClient(cluster.frontend, **kwargs)


def test_a_task_is_accepted_then_returns_its_result_with_info(running):
    async def main():
        async with aclient(running) as c:
            f = c.submit("square", 7)
            assert isinstance(f, asyncio.Future) and f.task_id
            assert await f.accepted is None
            assert await f == 49
            assert f.info["attempts"] == 1 and f.info["run_s"] >= 0 and f.info["queued_s"] >= 0
            assert f.info["worker"] in {w["name"] for w in (await c.status())["workers"]}
            a = np.arange(12.0).reshape(3, 4)
            np.testing.assert_array_equal(await c.submit("echo", a), a)

    run(main())


def test_map_gather_and_as_completed_return_every_result(running):
    async def main():
        async with aclient(running) as c:
            assert await c.map("square", range(3000)) == [i * i for i in range(3000)]
            assert await c.map("square", range(50), max_in_flight=7) == [i * i for i in range(50)]
            fs = [c.submit("square", i) for i in range(20)]
            assert await c.gather(fs) == [i * i for i in range(20)]
            fs = [c.submit("sleep", s) for s in (0.6, 0.0)]
            order = [f async for f in c.as_completed(fs)]
            assert order == [fs[1], fs[0]]

    run(main())


def test_a_remote_error_raises_task_error_and_return_exceptions_puts_it_in_place(running):
    async def main():
        async with aclient(running) as c:
            with pytest.raises(TaskError) as info:
                await c.submit("sleep", "not a number")
            assert info.value.type == "ValueError" and "Traceback" in info.value.traceback
            out = await c.map("sleep", [0, "x", 0], return_exceptions=True)
            assert out[0] == 0 and out[2] == 0 and isinstance(out[1], TaskError)
            with pytest.raises(TaskError):
                await c.map("sleep", [0, "x", 0])
            fs = [c.submit("square", 2), c.submit("sleep", "y")]
            out = await c.gather(fs, return_exceptions=True)
            assert out[0] == 4 and isinstance(out[1], TaskError)

    run(main())


def test_bad_input_raises_at_once_and_a_refused_record_fails_its_acceptance(running):
    async def main():
        async with aclient(running) as c:
            with pytest.raises(EncodeError):
                c.submit("echo", object())
            with pytest.raises(ValueError):
                c.submit("square", 2, priority="7")
            with pytest.raises(ValueError):
                c.submit("square", 2, resources={"cpu": -1})
            f = c.submit("x" * 300, 1)  # the broker refuses names this long
            with pytest.raises(TaskError, match="InvalidRequest"):
                await f.accepted
            with pytest.raises(TaskError, match="InvalidRequest"):
                await f
            assert await c.submit("square", 3) == 9  # the client goes on

    run(main())


def test_cancel_by_future_and_by_task_id_of_queued_tasks_and_not_of_a_running_one(running, events):
    log = events("task.")

    async def main():
        async with aclient(running) as c:
            blockers = [c.submit("sleep", 1.0) for _ in range(4)]  # fill all four slots
            while len(log.of("task.started")) < 4:
                await asyncio.sleep(0.02)
            a, b = c.submit("square", 3), c.submit("square", 4)
            await a.accepted
            await b.accepted
            assert await c.cancel(a) is True
            assert await c.cancel(b.task_id, terminate=True) is True
            assert a.cancelled() and b.cancelled()
            assert await c.cancel(blockers[0]) is False  # running: not interrupted
            assert await c.gather(blockers) == [1.0] * 4
            return a, b

    a, b = run(main())
    for f in (a, b):
        log.wait_for("task.cancelled", lambda e: e["task_id"] == f.task_id)
    assert not [e for e in log.of("task.started") if e["task_id"] in (a.task_id, b.task_id)]


def test_the_same_key_is_one_task_and_an_alias_is_accepted_under_the_first_id(running, events):
    log = events("task.")

    async def main():
        async with aclient(running) as c:
            a = c.submit("square", 9, key="k-aio")
            b = c.submit("square", 9, key="k-aio")
            await a.accepted
            await b.accepted
            assert b.task_id == a.task_id
            assert await a == await b == 81
        async with aclient(running) as other:
            again = other.submit("square", 9, key="k-aio")
            await again.accepted
            assert again.task_id == a.task_id and await again == 81
            return a.task_id

    first = run(main())
    log.wait_for("task.succeeded", lambda e: e["task_id"] == first)
    assert len([e for e in log.of("task.submitted") if e["name"] == "square"]) == 1


def test_broker_down_raises_broker_unavailable_in_bounded_time():
    async def main(address: str):
        async with AsyncClient(address, timeout=0.3, retries=2) as c:
            f = c.submit("square", 2)
            with pytest.raises(BrokerUnavailable):
                await f.accepted
            with pytest.raises(BrokerUnavailable):
                await f
            with pytest.raises(BrokerUnavailable):
                await c.status()

    with silent_endpoints() as [address]:
        started = time.monotonic()
        run(main(address), timeout=20)
    assert time.monotonic() - started < 8


def test_tasks_of_a_broker_restarted_without_a_journal_fail_with_task_lost(cluster):
    cluster.start_broker()  # no --journal, no worker: the task waits in the queue

    async def main():
        async with aclient(cluster, timeout=1.0, retries=10) as c:
            f = c.submit("square", 3)
            await f.accepted
            cluster.kill(cluster.broker)
            cluster.start_broker()
            with pytest.raises(TaskLost, match="without a journal"):
                await f
            assert (await c.status())["queued"] == 0

    run(main())


def test_a_task_accepted_by_a_journaled_broker_completes_after_the_broker_restarts(cluster, tmp_path):
    journal = str(tmp_path / "journal.db")
    cluster.start_broker("--journal", journal)

    async def main():
        async with aclient(cluster, timeout=1.0, retries=10) as c:
            f = c.submit("square", 5)
            await f.accepted  # journaled
            cluster.kill(cluster.broker)
            cluster.start_broker("--journal", journal)
            cluster.start_worker()
            assert await f == 25

    run(main())


def test_events_start_with_a_snapshot_and_then_miss_none(running):
    async def main():
        async with aclient(running) as c:
            stream = c.events(events_address=running.events)
            first = await anext(stream)
            assert first["topic"] == "snapshot" and first["seq"] == first["snapshot"]["seq"]
            fs = [c.submit("square", i) for i in range(200)]
            ids = {f.task_id for f in fs}
            seqs, succeeded = [first["seq"]], set()
            async for ev in stream:
                assert ev["topic"] != "snapshot", "no gap, no restart: no second snapshot"
                seqs.append(ev["seq"])
                if ev["topic"] == "task.succeeded":
                    succeeded.add(ev["task_id"])
                if ids <= succeeded:
                    break
            await stream.aclose()
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous from the snapshot on
            tasks = c.events("task.", events_address=running.events)
            assert (await anext(tasks))["topic"] == "snapshot"
            c.submit("square", 2)
            assert [(await anext(tasks))["topic"] for _ in range(3)] == ["task.submitted", "task.started",
                                                                         "task.succeeded"]
            await c.close()
            async for _ in tasks:  # a closed client's stream ends (run() fails the test if it did not)
                pass

    run(main())


def test_events_after_a_broker_restart_start_over_with_a_fresh_snapshot(cluster):
    cluster.start_broker()

    async def main():
        async with aclient(cluster, timeout=0.5, retries=2) as c:
            stream = c.events(events_address=cluster.events)
            first = await anext(stream)
            assert first["topic"] == "snapshot"
            assert (await anext(stream))["topic"] == "broker.stats"  # live
            cluster.kill(cluster.broker)
            cluster.start_broker()
            async for ev in stream:
                if ev["topic"] == "snapshot":
                    break
            assert ev["seq"] < first["seq"] + 10  # the new broker's own count
            after = await anext(stream)
            assert after["seq"] == ev["seq"] + 1  # and on from there, none missed
            await stream.aclose()

    run(main())


def _client_threads(before: set) -> list:
    """Threads started since ``before`` other than the in-process cluster's own (its broker and
    worker slot threads start as they are needed): what the client would have started."""
    return [t.name for t in threading.enumerate()
            if t not in before and not t.name.startswith(("local-", "slot-"))]


def test_a_20000_task_map_never_holds_the_loop_for_50_ms_and_starts_no_thread(running):
    # pyzmq keeps one thread per process that frees zero-copy frames; the in-process broker's big
    # result batches start it (CI saw it as 'Thread-3'). Started now, it is not counted as ours.
    if not zmq.utils.garbage.gc.is_alive():
        zmq.utils.garbage.gc.start()
    threads = set(threading.enumerate())

    async def main():
        held = []  # CPU seconds the loop thread spent between two ticks: time it was not free
        done = asyncio.Event()

        async def ticker():
            last = time.thread_time()  # CPU time, so a machine busy with other work does not count
            while not done.is_set():
                await asyncio.sleep(0.002)
                now = time.thread_time()
                held.append(now - last)
                last = now

        async with aclient(running) as c:
            tick = asyncio.create_task(ticker())
            out = await c.map("noop", range(20_000))
            done.set()
            await tick
            assert _client_threads(threads) == []
        return out, held

    # Every full garbage collection walks the whole heap: pytest's and numpy's objects, ~50,000,
    # cost ~20 ms of a loaded 2-core machine whatever the client does. Frozen, they are out of the
    # measure; the client's own objects (one per task in flight) are collected and counted.
    gc.collect()
    gc.freeze()
    try:
        out, held = run(main(), timeout=120)
    finally:
        gc.unfreeze()
    assert out == [None] * 20_000
    assert len(held) > 50 and max(held) < 0.050, f"loop held for {max(held) * 1000:.1f} ms"
    assert _client_threads(threads) == []


def test_closing_cancels_queued_tasks_without_a_key_and_keeps_the_keyed_ones(cluster, events):
    cluster.start_broker()  # no worker: every task stays queued
    log = events("task.")

    async def main(cancel_on_close: bool):
        async with aclient(cluster, cancel_on_close=cancel_on_close) as c:
            plain, keyed = c.submit("square", 1), c.submit("square", 2, key=f"stays-{cancel_on_close}")
            await plain.accepted
            await keyed.accepted
        assert plain.done() and keyed.done()  # nothing is left waiting on a closed client
        return plain.task_id

    kept = run(main(cancel_on_close=False))
    gone = run(main(cancel_on_close=True))
    log.wait_for("task.cancelled", lambda e: e["task_id"] == gone)
    assert [e["task_id"] for e in log.of("task.cancelled")] == [gone]
    with cluster.client() as c:
        assert c.status()["queued"] == 3  # both keyed ones, and the plain one of cancel_on_close=False
    assert kept not in {e["task_id"] for e in log.of("task.cancelled")}


def test_cancel_all_cancels_every_queued_task_keyed_or_not(cluster):
    cluster.start_broker()

    async def main():
        async with aclient(cluster) as c:
            fs = [c.submit("square", i) for i in range(5)] + [c.submit("square", 9, key="k-all")]
            assert await c.cancel_all() == 6
            assert all(f.cancelled() for f in fs)
            assert (await c.status())["queued"] == 0

    run(main())
