"""The client's protocol engine alone: no socket, a fake clock, replies built by hand."""

from __future__ import annotations

import pytest

from broker.protocol import CLIENT_TAG, FETCH_IN_SUBMIT, Command, EncodeError, Message, encode, pack_value
from client.engine import ACK_DELAY_S, SUBMIT_BATCH, SUBMIT_PIPELINE, Engine
from client.outcomes import CANCELLED, FAILED, OK
from client.errors import BrokerUnavailable, GridqError, TaskError, TaskLost


class Handle:
    """Stands for a shell's future: the engine reads and writes only task_id and info."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.info = None


def make(timeout_s: float = 1.0, retries: int = 2) -> Engine:
    return Engine(timeout_s=timeout_s, retries=retries, address="tcp://test", session="s1")


def submit(engine: Engine, name: str = "square", *args, key=None) -> Handle:
    record, frames = engine.make_task(name, args or (1,), {}, key=key)
    handle = Handle(record[0])
    engine.submit(handle, record, frames)
    return handle


def reply(engine: Engine, command: Command, header: dict, now: float = 0.0, frames=()) -> None:
    engine.on_frames([b"", *encode(CLIENT_TAG, Message(command, header, list(frames)))], now)


def sent(out, command: Command) -> list:
    """The messages of ``command`` in ``out``, a FETCH that travels inside a SUBMIT as one of its own."""
    return [m for m in unbundled(out.messages) if m.command is command]


def unbundled(messages: list) -> list:
    out = []
    for m in messages:
        header = dict(m.header)
        fetch = header.pop(FETCH_IN_SUBMIT, None) if m.command is Command.SUBMIT else None
        out.append(Message(m.command, header, m.frames))
        if fetch is not None:
            out.append(Message(Command.FETCH, fetch))
    return out


def test_tasks_submitted_together_go_out_as_one_submit_followed_by_one_long_polling_fetch():
    e = make()
    handles = [submit(e, "square", i) for i in range(3)]
    e.pump(0.0)
    out = e.take()
    [sub] = sent(out, Command.SUBMIT)
    assert [r[0] for r in sub.header["tasks"]] == [h.task_id for h in handles]
    assert sub.header["session"] == "s1"
    [fetch] = sent(out, Command.FETCH)
    assert fetch.header["wait_ms"] == 500 and fetch.header["ack"] == []


def test_a_fetch_that_goes_out_with_a_submit_travels_inside_it_and_is_resent_on_its_own():
    e = make(timeout_s=1.0)
    h = submit(e)
    e.pump(0.0)
    [msg] = e.take().messages  # one message for a lone round trip
    assert msg.command is Command.SUBMIT and [r[0] for r in msg.header["tasks"]] == [h.task_id]
    fetch = msg.header[FETCH_IN_SUBMIT]
    assert fetch["session"] == "s1" and fetch["wait_ms"] == 500 and fetch["rid"] != msg.header["rid"]
    e.on_tick(1.6)  # both unanswered: Lazy Pirate resends each as itself, on a fresh socket
    out = e.take()
    assert out.reconnect and [m.command for m in out.messages] == [Command.SUBMIT, Command.FETCH]
    assert FETCH_IN_SUBMIT not in out.messages[0].header and out.messages[1].header["rid"] == fetch["rid"]


def test_a_fetch_goes_alone_when_no_submit_goes_with_it():
    e = make()
    submit(e)
    [fetch] = accept_all(e, "b")
    e.take()
    reply(e, Command.RESULTS, {"rid": fetch.header["rid"], "results": [], "boot": "b"})  # the long poll ended empty
    e.pump(0.5)
    [msg] = e.take().messages
    assert msg.command is Command.FETCH and msg.header["wait_ms"] == 500


def test_a_big_submission_is_cut_in_batches_with_a_bounded_number_in_flight():
    e = make()
    for i in range(SUBMIT_BATCH * (SUBMIT_PIPELINE + 1) + 1):
        submit(e, "noop", i)
    e.pump(0.0)
    subs = sent(e.take(), Command.SUBMIT)
    assert [len(m.header["tasks"]) for m in subs] == [SUBMIT_BATCH] * SUBMIT_PIPELINE
    reply(e, Command.ACCEPTED, {"rid": subs[0].header["rid"], "rejected": [], "aliases": []})
    e.pump(0.0)
    assert [len(m.header["tasks"]) for m in sent(e.take(), Command.SUBMIT)] == [SUBMIT_BATCH]


def test_a_request_past_its_deadline_is_resent_with_its_rid_on_a_fresh_socket():
    e = make(timeout_s=1.0)
    submit(e)
    e.pump(0.0)
    first = {m.header["rid"] for m in unbundled(e.take().messages)}
    e.on_tick(0.9)
    assert not e.take()
    e.on_tick(1.01)
    out = e.take()
    assert out.reconnect and {m.header["rid"] for m in out.messages} == first


def test_past_its_retries_a_call_and_every_unfinished_task_fail_with_broker_unavailable():
    e = make(timeout_s=1.0, retries=2)
    h = submit(e)
    e.call(Command.STATUS, {}, "waiter", 0.0)
    e.pump(0.0)
    e.take()
    now = 0.0
    for _ in range(3):  # two resends, then the third miss gives up
        now += 1.6
        e.on_tick(now)
    out = e.take()
    assert [(w, type(r)) for w, r in out.replies] == [("waiter", BrokerUnavailable)]
    assert [(x, kind, type(v)) for x, kind, v in out.settled] == [(h, FAILED, BrokerUnavailable)]
    assert [(x, type(v)) for x, v in out.accepted] == [(h, BrokerUnavailable)]
    assert "tcp://test" in str(out.replies[0][1]) and not e.busy


def accept_all(e: Engine, boot: str, durable: bool = False) -> list:
    e.pump(0.0)
    out = e.take()
    for m in sent(out, Command.SUBMIT):
        reply(e, Command.ACCEPTED, {"rid": m.header["rid"], "rejected": [], "aliases": [], "boot": boot,
                                    "durable": durable})
    return sent(out, Command.FETCH)


@pytest.mark.parametrize("durable", [False, True])
def test_tasks_accepted_by_a_broker_that_restarted_without_a_journal_fail_with_task_lost(durable):
    e = make()
    h = submit(e)
    [fetch] = accept_all(e, "boot-1", durable)
    assert e.take().accepted == [(h, None)]
    reply(e, Command.RESULTS, {"rid": fetch.header["rid"], "results": [], "boot": "boot-2", "durable": durable})
    settled = e.take().settled
    if durable:
        assert settled == []  # its journal kept the task: it will complete
    else:
        [(x, kind, error)] = settled
        assert x is h and kind == FAILED and isinstance(error, TaskLost) and "without a journal" in str(error)


def test_results_settle_their_handles_are_acknowledged_by_the_next_fetch_and_a_duplicate_is_ignored():
    e = make()
    ok, bad = submit(e), submit(e)
    [fetch] = accept_all(e, "b")
    blob, frames = pack_value(49)
    results = [[ok.task_id, "succeeded", blob, len(frames), {"worker": "w1", "attempts": 1}],
               [bad.task_id, "failed", {"type": "ValueError", "message": "no", "traceback": "tb"}, 0, {}]]
    reply(e, Command.RESULTS, {"rid": fetch.header["rid"], "results": results, "boot": "b"})
    e.pump(0.0)
    out = e.take()
    assert out.settled[0] == (ok, OK, 49) and ok.info["worker"] == "w1"
    assert out.settled[1][1] == "error" and isinstance(out.settled[1][2], TaskError)
    assert str(out.settled[1][2]) == "ValueError: no" and out.settled[1][2].traceback == "tb"
    assert not sent(out, Command.FETCH) and e.next_deadline() == ACK_DELAY_S  # a new task's FETCH may take them
    e.pump(ACK_DELAY_S)
    [ack] = sent(e.take(), Command.FETCH)
    assert ack.header["ack"] == [ok.task_id, bad.task_id] and ack.header["wait_ms"] == 0  # nothing left to wait for
    reply(e, Command.RESULTS, {"rid": ack.header["rid"], "results": results, "boot": "b"})
    assert e.take().settled == []


def finished_one(e: Engine) -> Handle:
    """A task submitted, accepted and finished: its result is received, not yet acknowledged."""
    h = submit(e)
    [fetch] = accept_all(e, "b")
    blob, frames = pack_value(1)
    reply(e, Command.RESULTS, {"rid": fetch.header["rid"], "boot": "b",
                               "results": [[h.task_id, "succeeded", blob, len(frames), {}]]})
    e.take()
    return h


def test_acknowledgements_ride_on_the_fetch_of_a_task_submitted_soon_after():
    e = make()
    first = finished_one(e)
    submit(e)
    e.pump(0.01)
    [fetch] = sent(e.take(), Command.FETCH)
    assert fetch.header["ack"] == [first.task_id] and fetch.header["wait_ms"] > 0


def test_an_alias_moves_the_handle_to_the_first_task_id_and_counts_as_accepted():
    e = make()
    h = submit(e, key="k")
    e.pump(0.0)
    [sub] = sent(e.take(), Command.SUBMIT)
    reply(e, Command.ACCEPTED, {"rid": sub.header["rid"], "rejected": [], "aliases": [[h.task_id, "first-id"]]})
    assert h.task_id == "first-id" and e.take().accepted == [(h, None)]
    assert list(e.pending) == ["first-id"]


def test_a_refused_record_fails_its_task_and_its_acceptance_with_invalid_request():
    e = make()
    h, fine = submit(e), submit(e)
    e.pump(0.0)
    [sub] = sent(e.take(), Command.SUBMIT)
    reply(e, Command.ACCEPTED, {"rid": sub.header["rid"], "rejected": [[h.task_id, "name too long"]], "aliases": []})
    out = e.take()
    assert out.accepted[0][0] is h and isinstance(out.accepted[0][1], TaskError)
    assert out.accepted[1] == (fine, None)
    assert out.settled[0][0] is h and out.settled[0][2].type == "InvalidRequest"


def test_an_error_reply_fails_the_request_and_a_late_duplicate_reply_is_ignored():
    e = make()
    e.call(Command.STATUS, {}, "w", 0.0)
    [status] = e.take().messages
    reply(e, Command.ERROR, {"rid": status.header["rid"], "error": "bad"})
    [(w, error)] = e.take().replies
    assert w == "w" and isinstance(error, GridqError) and "bad" in str(error)
    reply(e, Command.SNAPSHOT, {"rid": status.header["rid"], "snapshot": {}})
    assert not e.take()


def test_cancelling_pending_tasks_sends_what_waits_first_skips_keyed_ones_and_settles_the_cancelled():
    e = make()
    plain, keyed = submit(e), submit(e, key="keep-me")
    e.cancel_pending("w", 0.0, keyed=False)  # nothing sent yet: the SUBMIT goes first
    out = e.take()
    assert [m.command for m in unbundled(out.messages)] == [Command.SUBMIT, Command.FETCH, Command.CANCEL]
    cancel = out.messages[-1]
    assert cancel.header["ids"] == [plain.task_id]
    reply(e, Command.CANCELLED, {"rid": cancel.header["rid"], "cancelled": [plain.task_id], "refused": []})
    out = e.take()
    assert out.settled == [(plain, CANCELLED, None)] and out.replies[0][0] == "w"
    assert set(e.pending) == {plain.task_id, keyed.task_id}  # until its "cancelled" result is fetched and acknowledged
    e.pending.pop(plain.task_id)
    e.cancel_pending("w2", 0.0, keyed=False)
    assert e.take().replies == [("w2", {"cancelled": [], "refused": []})]  # nothing to cancel: no request


def test_closing_acknowledges_what_it_received_and_replies_once_the_broker_has_it():
    e = make()
    h = finished_one(e)
    e.flush_acks("w", 0.0)
    [ack] = e.take().messages
    assert ack.command is Command.FETCH and ack.header["ack"] == [h.task_id] and ack.header["wait_ms"] == 0
    reply(e, Command.RESULTS, {"rid": ack.header["rid"], "results": [], "boot": "b"})
    assert [w for w, _ in e.take().replies] == ["w"]
    e.flush_acks("w2", 0.0)
    out = e.take()
    assert not out.messages and [w for w, _ in out.replies] == ["w2"]


def test_bad_task_options_and_values_are_refused_before_anything_is_queued():
    e = make()
    for kwargs in ({"priority": "7"}, {"priority": True}, {"retries": -1}, {"timeout": 0}, {"key": ""},
                   {"resources": {"cpu": "x"}}):
        with pytest.raises(ValueError):
            e.make_task("square", (1,), {}, **kwargs)
    with pytest.raises(ValueError):
        e.make_task("", (1,), {})
    with pytest.raises(EncodeError):
        e.make_task("echo", (object(),), {})
    assert not e.busy


def test_a_task_is_lone_while_nothing_else_waits_and_no_submit_is_in_flight():
    e = make()
    submit(e)
    assert e.lone_submit  # the shell may send it at once
    e.pump(0.0)
    e.take()
    submit(e)
    assert not e.lone_submit  # the first SUBMIT is unanswered: this one waits to go with others


def test_a_maps_records_are_the_records_submit_would_make_with_options_checked_once():
    from client.submission import record_maker, split_options, task_record

    options, kwargs = split_options({"priority": 3, "retries": 2, "scale": 2})
    assert options == {"priority": 3, "retries": 2} and kwargs == {"scale": 2}
    records = record_maker("f", options, kwargs)
    for i, item in enumerate([1, "a", [2.5, None]]):
        assert records(f"t{i}", item) == task_record(f"t{i}", "f", (item,), {"scale": 2}, priority=3, retries=2)
    with pytest.raises(ValueError):  # the first item raises, as submit would
        record_maker("f", {"priority": "high"}, {})("t0", 1)


def test_a_replys_outcomes_reach_their_map_as_one_batch_and_the_first_failure_in_input_order_is_raised():
    from concurrent.futures import CancelledError

    from client.outcomes import ERROR, MapResults, settle_all

    class Sink(list):
        put = list.append

    sink, other = Sink(), Sink()
    results, elsewhere = MapResults(False, sink, CancelledError), MapResults(True, other, CancelledError)
    items = [results.start(f"t{i}") for i in range(4)]
    settle_all([(items[2], ERROR, TaskError("ValueError", "late")), (items[0], OK, 0),
                (elsewhere.start("u0"), CANCELLED, None), (items[1], ERROR, TaskError("ValueError", "first"))])
    assert [len(b) for b in sink] == [2, 1] and len(other) == 1  # consecutive items of one map: one batch
    for batch in sink:
        results.finish_batch(batch)
    elsewhere.finish_batch(other[0])
    assert results.stopping and results.settled()  # item 3 runs on, but every item before the failure ended
    with pytest.raises(TaskError) as info:
        results.outcome()
    assert info.value.index == 1 and results.unfinished() == ["t3"]
    assert isinstance(elsewhere.outcome()[0], CancelledError)


@pytest.fixture
def pair():
    """Two connected inproc PAIR sockets (sender, receiver), closed with linger 0."""
    import zmq

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://shared-pair")
        b.connect("inproc://shared-pair")
        yield a, b
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_recv_frames_reads_one_whole_message_and_readable_says_whether_another_waits(pair):
    import zmq

    from broker.shared import readable, recv_frames

    a, b = pair
    assert not readable(b)
    a.send_multipart([b"one", b"", b"three"])
    a.send(b"next")
    assert b.poll(5000) and readable(b)
    assert [bytes(f) for f in recv_frames(b)] == [b"one", b"", b"three"]
    assert readable(b) and [bytes(f) for f in recv_frames(b)] == [b"next"]
    assert not readable(b)
    with pytest.raises(zmq.Again):
        recv_frames(b)


def test_drain_yields_every_waiting_message_whole_at_most_limit_and_ends_without_raising(pair):
    from broker.shared import drain

    a, b = pair
    assert list(drain(b)) == []  # nothing waits: nothing, no zmq.Again
    for i in range(5):
        a.send_multipart([b"m", str(i).encode()])
    assert b.poll(5000)
    assert [[bytes(f) for f in m] for m in drain(b, 2)] == [[b"m", b"0"], [b"m", b"1"]]
    assert [bytes(m[1]) for m in drain(b)] == [b"2", b"3", b"4"]
    assert list(drain(b)) == []
