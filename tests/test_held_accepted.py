"""A lone task's ACCEPTED held by the broker and sent inside its RESULTS (``defer_ms`` in the SUBMIT):
the broker core with a fake clock, the client engine alone, and a real broker on loopback."""

from __future__ import annotations

import time

import pytest
import zmq

from broker.protocol import (ACCEPTED_IN_RESULTS, CLIENT_TAG, DEFER_ACCEPTED, FETCH_IN_SUBMIT, MAX_DEFER_ACCEPTED_MS,
                             Command, Message, decode, encode, pack_value)
from client.engine import Engine
from tests.harness import Harness
from tests.test_engine import Handle, reply, sent
from tests.test_hostile import raw_socket


def record(task_id: str, name: str = "noop", *args) -> list:
    blob, _ = pack_value([list(args), {}])
    return [task_id, name, blob, 0, None, 0, None, None, None]


def lone_submit(h: Harness, task_id: str, defer_ms, name: str = "noop", rid: int = 1) -> None:
    """What the broker's loop does with a SUBMIT that carries a FETCH: the SUBMIT, a flush, the FETCH."""
    header = {"rid": rid, "session": "s1", "tasks": [record(task_id, name)], DEFER_ACCEPTED: defer_ms}
    h.core.on_client(b"c1", Message(Command.SUBMIT, header), h.now)
    h.flush()
    h.core.on_client(b"c1", Message(Command.FETCH, {"rid": rid + 1, "session": "s1", "ack": [], "wait_ms": 1000}),
                     h.now)
    h.flush()


def replies(h: Harness) -> list:
    got = [(m.command, m.header) for _, m in h.to_clients]
    h.to_clients.clear()
    return got


def test_the_broker_sends_a_lone_tasks_accepted_inside_its_results():
    h = Harness()
    h.join(b"w1")
    lone_submit(h, "t1", 20)
    assert h.dispatched(b"w1") == ["t1"] and replies(h) == []  # the task runs; its ACCEPTED waits
    h.now += 0.005
    h.done(b"w1", "t1", 7)
    [(command, header)] = replies(h)
    assert command is Command.RESULTS and header["rid"] == 2 and [r[0] for r in header["results"]] == ["t1"]
    assert header[ACCEPTED_IN_RESULTS]["rid"] == 1 and header[ACCEPTED_IN_RESULTS]["rejected"] == []
    assert h.core.results.holding == 0 and h.core.results.next_held_due() is None  # the loop need not wake for it
    h.tick(1.0)
    assert replies(h) == []  # nothing left held


def test_a_held_accepted_goes_alone_once_its_time_is_up():
    h = Harness()
    h.join(b"w1")
    lone_submit(h, "t1", 20)
    h.now += 0.019
    h.flush()
    assert replies(h) == []
    assert h.core.results.next_held_due() == pytest.approx(h.now + 0.001)
    h.now += 0.002
    h.flush()  # the loop flushes on waking at the due time
    assert [(c, hd["rid"]) for c, hd in replies(h)] == [(Command.ACCEPTED, 1)]
    h.done(b"w1", "t1")
    [(command, header)] = replies(h)
    assert command is Command.RESULTS and ACCEPTED_IN_RESULTS not in header


def test_the_broker_caps_the_hold_and_answers_at_once_without_one_or_with_a_refusal():
    h = Harness()
    h.join(b"w1")
    lone_submit(h, "t1", 10_000)
    assert h.core.results.next_held_due() == pytest.approx(h.now + MAX_DEFER_ACCEPTED_MS / 1000)
    h.now += 1.0
    h.flush()
    assert [c for c, _ in replies(h)] == [Command.ACCEPTED]
    for defer_ms in (0, None, "20", 2.5, True):
        lone_submit(h, f"t-{defer_ms}", defer_ms, rid=10)
        assert [c for c, _ in replies(h) if c is not Command.RESULTS] == [Command.ACCEPTED]  # (RESULTS: a FETCH replaced)
    lone_submit(h, "t9", 20, name="nonesuch" * 40)  # a bad task name: refused, and said at once
    [(command, header)] = [r for r in replies(h) if r[0] is not Command.RESULTS]
    assert command is Command.ACCEPTED and header["rejected"][0][0] == "t9"


def test_a_task_that_does_not_start_at_once_has_its_accepted_sent_at_once():
    h = Harness()
    lone_submit(h, "t1", 20)  # no worker: it waits in the queue, its result is not about to come
    assert [c for c, _ in replies(h)] == [Command.ACCEPTED]
    h.join(b"w1")
    lone_submit(h, "t2", 20, rid=3)  # the only slot is taken: t2 waits (or goes ahead to wait there)
    assert [c for c, _ in replies(h) if c is not Command.RESULTS] == [Command.ACCEPTED]


def test_a_broker_stopping_sends_the_accepted_it_holds():
    h = Harness()
    h.join(b"w1")
    lone_submit(h, "t1", 20)
    h.core.shutdown()
    h.flush()
    assert [c for c, _ in replies(h)] == [Command.ACCEPTED]


def engine(defer_ms: int = 20) -> Engine:
    return Engine(timeout_s=1.0, retries=2, address="tcp://test", session="s1", defer_accepted_ms=defer_ms)


def submit(e: Engine, name: str = "noop") -> Handle:
    rec, frames = e.make_task(name, (), {})
    h = Handle(rec[0])
    e.submit(h, rec, frames)
    return h


def test_the_engine_asks_for_the_hold_only_for_a_lone_task_that_carries_its_fetch():
    e = engine()
    submit(e)
    e.pump(0.0)
    [msg] = e.take().messages
    assert msg.header[DEFER_ACCEPTED] == 20 and FETCH_IN_SUBMIT in msg.header
    submit(e)
    submit(e)
    e.pump(0.0)  # a second SUBMIT while the first is out, of two tasks, with no FETCH: no hold
    assert [DEFER_ACCEPTED in m.header for m in e.take().messages] == [False]
    off = engine(0)
    submit(off)
    off.pump(0.0)
    assert DEFER_ACCEPTED not in off.take().messages[0].header
    e.on_tick(1.6)  # a resend goes as itself, without the FETCH or the hold
    assert not any(DEFER_ACCEPTED in m.header for m in e.take().messages)


def test_a_results_reply_that_carries_the_accepted_answers_the_submit_too():
    e = engine()
    h = submit(e)
    e.pump(0.0)
    [msg] = e.take().messages
    held = {"rid": msg.header["rid"], "rejected": [], "aliases": [], "conflicts": [], "boot": "b", "durable": False}
    value, _ = pack_value(49)
    reply(e, Command.RESULTS, {"rid": msg.header[FETCH_IN_SUBMIT]["rid"], "results": [[h.task_id, "succeeded", value, 0, {}]],
                               "boot": "b", "durable": False, ACCEPTED_IN_RESULTS: held})
    out = e.take()
    assert out.accepted == [(h, None)] and [(s[0], s[2]) for s in out.settled] == [(h, 49)]
    assert e.requests == {} and not e.busy  # neither request is waited for any more: no resend later
    e.on_tick(5.0)
    assert sent(e.take(), Command.SUBMIT) == []


def test_a_lone_round_trip_through_a_real_broker_is_one_reply_and_a_long_task_gets_its_accepted_first(local):
    local.start_worker()
    local.wait_workers(1)
    dealer = raw_socket(zmq.DEALER, local.frontend)

    def lone(rid: int, task: list, ack: list = ()) -> list:
        fetch = {"rid": rid + 1, "session": "s", "ack": list(ack), "wait_ms": 5000}
        dealer.send_multipart([b"", *encode(CLIENT_TAG, Message(Command.SUBMIT, {
            "rid": rid, "session": "s", "tasks": [task], FETCH_IN_SUBMIT: fetch, DEFER_ACCEPTED: 20}))])
        def received() -> tuple:
            msg = decode(dealer.recv_multipart()[1:], CLIENT_TAG)
            return time.monotonic(), msg

        got = [received()]
        if got[0][1].command is Command.ACCEPTED:
            got.append(received())
        return got

    try:
        [(_, res)] = lone(1, record("t1", "square", 7))
        assert res.command is Command.RESULTS and res.header[ACCEPTED_IN_RESULTS]["rid"] == 1
        started = time.monotonic()
        [(acc_at, acc), (res_at, res)] = lone(3, record("t2", "sleep", 0.5), ack=["t1"])
        assert acc.command is Command.ACCEPTED and acc.header["rid"] == 3 and acc_at - started < 0.4
        assert res.command is Command.RESULTS and ACCEPTED_IN_RESULTS not in res.header and res_at - started >= 0.5
    finally:
        dealer.close(linger=0)
