"""Hostile input: every bad request is refused cleanly, and the broker keeps serving everyone else.

The first half drives the pure core with a fake clock; the second throws bad frames
at a real broker's sockets over loopback.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zmq

from client import GridqError

from broker.protocol import (CLIENT_TAG, FETCH_IN_SUBMIT, MAX_FRAMES, MAX_HEADER_BYTES, WORKER_TAG, Command, Message,
                             ProtocolError, decode, encode, pack_value)
from broker.states import TaskState
from tests.conftest import wait_until
from tests.harness import Harness


@pytest.fixture
def h():
    return Harness()


def errors(h) -> list[str]:
    return [m.header["error"] for _, m in h.to_clients if m.command is Command.ERROR]


def submit_record(task_id="t1", name="noop", resources=None, priority=0, retries=None, timeout_s=None, key=None):
    blob, frames = pack_value([[], {}])
    return [task_id, name, blob, len(frames), resources, priority, retries, timeout_s, key]


def rejected(h, **fields) -> list:
    h.to_clients.clear()
    h.core.on_client(b"c1", Message(Command.SUBMIT, {"rid": 1, "session": "s1", "tasks": [submit_record(**fields)]}),
                     h.now)
    h.flush()
    (reply,) = [m for _, m in h.to_clients]
    assert reply.command is Command.ACCEPTED
    return reply.header["rejected"]


# ------------------------------------------------------------------ decode


def test_oversized_headers_and_too_many_frames_are_protocol_errors():
    with pytest.raises(ProtocolError, match="header"):
        decode([CLIENT_TAG, bytes([Command.STATUS]), b"\x00" * (MAX_HEADER_BYTES + 1)], CLIENT_TAG)
    with pytest.raises(ProtocolError, match="too many"):
        decode([CLIENT_TAG, bytes([Command.STATUS]), msgpack.packb({})] + [b""] * (MAX_FRAMES + 1), CLIENT_TAG)


@pytest.mark.parametrize("frames", [
    [], [CLIENT_TAG], [CLIENT_TAG, b"\x07"], [b"GQC9", b"\x07", b"\x80"], [CLIENT_TAG, b"\xff", b"\x80"],
    [CLIENT_TAG, b"\x07\x07", b"\x80"], [CLIENT_TAG, b"\x07", b"\xc1"], [CLIENT_TAG, b"\x07", b"\x93\x01\x02\x03"],
    [CLIENT_TAG, b"\x07", b"\x81"], [CLIENT_TAG, b"\x07", b"\x80\x80"], [CLIENT_TAG, b"\x07", b"\xdf\xff\xff\xff\xff"],
])
def test_malformed_frames_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        decode(frames, CLIENT_TAG)


# ------------------------------------------------------------------ clients (pure core)


@pytest.mark.parametrize("fields", [
    {"resources": {"cpu": 1e300}}, {"resources": {"gpu": -1}}, {"resources": {"cpu": math.nan}},
    {"resources": {"cpu": "lots"}}, {"resources": {"": 1}}, {"resources": {"x" * 1000: 1}},
    {"resources": {f"r{i}": 1 for i in range(65)}}, {"resources": [1, 2]}, {"resources": {"cpu": True}},
    {"timeout_s": -1}, {"timeout_s": 0}, {"timeout_s": math.nan}, {"timeout_s": math.inf}, {"timeout_s": "1"},
    {"priority": 2**40}, {"priority": 1.5}, {"retries": -1}, {"retries": 10**6}, {"name": ""}, {"name": 7},
    {"task_id": None}, {"task_id": "x" * 10_000}, {"key": b"bytes"},
])
def test_absurd_task_fields_are_rejected_and_nothing_is_queued(h, fields):
    assert len(rejected(h, **fields)) == 1
    assert h.core.tasks == {} and h.core.counts["queued"] == 0


def test_negative_and_nan_waits_refuse_a_fetch_without_stalling_other_sessions(h):
    h.core.on_client(b"c1", Message(Command.FETCH, {"rid": 1, "session": "s1", "wait_ms": 500}), h.now)
    for bad in (math.nan, "soon", [1]):
        h.core.on_client(b"c2", Message(Command.FETCH, {"rid": 2, "session": "s2", "wait_ms": bad}), h.now)
    h.flush()
    assert len(errors(h)) == 3
    h.tick(1.0)
    assert [(r, m.command, m.header["rid"]) for r, m in h.to_clients if m.command is Command.RESULTS] == [
        (b"c1", Command.RESULTS, 1)]


def test_fetches_with_rids_that_do_not_compare_park_and_expire(h):
    for rid in (None, 1, "x", [1], {"a": 1}, math.nan):
        h.core.on_client(b"c1", Message(Command.FETCH, {"rid": rid, "session": "s1", "wait_ms": 200}), h.now)
    h.flush()
    h.tick(1.0)
    assert h.core.sessions == {}
    assert not errors(h)


def test_unknown_and_worker_commands_from_a_client_get_an_error(h):
    for command in (Command.READY, Command.DONE, Command.TASKS, Command.ACCEPTED, Command.ERROR):
        h.core.on_client(b"c1", Message(command, {"rid": 3}), h.now)
    h.flush()
    assert len(errors(h)) == 5
    assert all(m.header["rid"] == 3 for _, m in h.to_clients)
    assert h.core.workers == {} and h.events == []


def test_a_client_cannot_cancel_another_sessions_task(h):
    t = h.submit(session="alice")
    h.to_clients.clear()
    h.core.on_client(b"c2", Message(Command.CANCEL, {"rid": 1, "session": "mallory", "ids": [t, 5, None, [1]]}), h.now)
    h.flush()
    (reply,) = [m for _, m in h.to_clients]
    assert reply.header["cancelled"] == [] and reply.header["refused"] == [t, 5, None, [1]]
    assert h.state(t) is TaskState.QUEUED


def test_a_client_cannot_take_over_another_sessions_task_id(h):
    t = h.submit(session="alice")
    assert rejected(h, task_id=t) == [[t, "task id already in use by another session"]]


def test_sessions_are_forgotten_once_idle_so_forged_session_ids_cost_nothing(h):
    for i in range(500):
        h.core.on_client(b"c", Message(Command.FETCH, {"rid": i, "session": f"forged-{i}"}), h.now)
    h.flush()
    h.tick(1.5)
    assert h.core.sessions == {}


def test_a_forgotten_session_still_gets_its_result(h):
    h.join(b"w1")
    t = h.submit("square", 3)
    h.tick(1.5)
    assert h.core.sessions == {}
    h.done(b"w1", t, 9)
    assert t in h.fetch()


# ------------------------------------------------------------------ workers (pure core)


def test_a_worker_cannot_finish_or_return_a_task_it_was_never_given(h):
    h.join(b"w1")
    h.join(b"w2")
    t = h.submit()
    holder, other = (b"w1", b"w2") if h.dispatched(b"w1") else (b"w2", b"w1")
    h.done(other, t, "forged")
    h.core.on_worker(other, Message(Command.RETURN, {"ids": [t]}), h.now)
    h.flush()
    assert h.state(t) is TaskState.RUNNING and h.core.tasks[t].worker == holder
    h.done(holder, t, "real")
    assert h.state(t) is TaskState.SUCCEEDED


def test_a_rejoining_worker_cannot_claim_a_task_it_does_not_hold(h):
    h.join(b"w1")
    t = h.submit()
    assert h.dispatched(b"w1") == [t]
    h.join(b"w2", running=[t, "no-such-task", 7])
    assert h.core.tasks[t].worker == b"w1"
    assert h.core.workers[b"w2"].running == {}


def test_absurd_worker_announcements_are_dropped(h):
    for header in ({"name": "w", "slots": 10**9, "tasks": {"noop": None}},
                   {"name": "w", "slots": 1, "resources": {"gpu": 1e300}, "tasks": {"noop": None}},
                   {"name": "w", "slots": 1, "tasks": {"noop": {"cpu": -1}}},
                   {"name": "w", "slots": 1, "tasks": {}},
                   {"name": "", "slots": 1, "tasks": {"noop": None}},
                   {"name": "w", "slots": 1, "tasks": {"noop": None}, "running": 5}):
        h.core.on_worker(b"w", Message(Command.READY, header), h.now)
    h.flush()
    assert h.core.workers == {}


def test_a_known_worker_sending_frames_that_are_no_message_is_forgotten_and_its_task_requeued(h):
    h.join(b"w1")
    t = h.submit()
    assert h.dispatched(b"w1") == [t]
    h.core.drop_worker_input(b"w1", "header is not valid msgpack", h.now)
    h.flush()
    assert h.core.workers == {} and h.state(t) is TaskState.QUEUED
    h.core.drop_worker_input(b"stranger", "unknown protocol", h.now)  # unknown peers: just logged


def test_nonsense_run_times_from_a_worker_do_not_reach_results(h):
    h.join(b"w1")
    t = h.submit()
    h.dispatched(b"w1")
    blob, _ = pack_value(1)
    h.core.on_worker(b"w1", Message(Command.DONE, {"results": [[t, True, blob, 0, math.nan]]}), h.now)
    h.flush()
    assert h.fetch()[t][4]["run_s"] == 0.0


# ------------------------------------------------------------------ a live broker


def raw_socket(kind: int, address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    sock.connect(address)
    return sock


GARBAGE = [
    [b""], [b"hello"], [CLIENT_TAG], [CLIENT_TAG, b"\x07"], [b"GQC9", b"\x07", b"\x80"],
    [CLIENT_TAG, b"\xff", b"\x80"], [CLIENT_TAG, b"\x07", b"\xc1"], [CLIENT_TAG, b"\x07", b"\x01"],
    [CLIENT_TAG, bytes([Command.SUBMIT]), msgpack.packb({"rid": 1, "session": "s", "tasks": [[1] * 9]})],
    [CLIENT_TAG, bytes([Command.READY]), msgpack.packb({"rid": 1})],
    [CLIENT_TAG, bytes([Command.FETCH]), msgpack.packb({"rid": 1, "session": "s", "wait_ms": float("nan")})],
    [CLIENT_TAG, bytes([Command.SUBMIT]), msgpack.packb({"rid": 1, "session": "s", "tasks": [["t", "n", b"", 5, None, 0, None, None, None]]})],
]


def test_a_req_client_sending_garbage_gets_an_error_reply_each_time(cluster):
    cluster.start_broker()
    cluster.wait_workers(0)
    req = raw_socket(zmq.REQ, cluster.frontend)
    try:
        for frames in GARBAGE:
            req.send_multipart(frames)
            reply = req.recv_multipart()
            msg = decode(reply, CLIENT_TAG)
            if msg.command is Command.ACCEPTED:  # a well-formed SUBMIT whose one task is refused
                assert len(msg.header["rejected"]) == 1, frames
            else:
                assert msg.command is Command.ERROR and msg.header["error"], frames
    finally:
        req.close(linger=0)
    with cluster.client() as c:
        assert c.status()["queued"] == 0


def test_messages_over_the_size_cap_are_refused_and_the_broker_keeps_serving(cluster):
    cluster.start_broker("--max-message-bytes", "65536")
    cluster.start_worker()
    cluster.wait_workers(1)
    req = raw_socket(zmq.REQ, cluster.frontend)
    try:  # many frames, each under MAXMSGSIZE, adding up to more than the cap
        req.send_multipart([CLIENT_TAG, bytes([Command.STATUS]), msgpack.packb({"rid": 1})] + [b"x" * 30_000] * 4)
        msg = decode(req.recv_multipart(), CLIENT_TAG)
        assert msg.command is Command.ERROR and "exceeds" in msg.header["error"]
        assert msg.header["rid"] == 1  # answered by its request id, so a client knows which one
    finally:
        req.close(linger=0)
    with cluster.client(timeout=5.0) as c:  # the Python client reports the refusal, not BrokerUnavailable
        f = c.submit("echo", [np.ones(3000)] * 4)  # each array under the cap, together over it
        with pytest.raises(GridqError, match="exceeds"):
            f.result(timeout=10)
    big = raw_socket(zmq.DEALER, cluster.frontend)  # one frame over MAXMSGSIZE: libzmq drops the connection
    big.send_multipart([b"", CLIENT_TAG, bytes([Command.STATUS]), b"\x80" + b"\x00" * 100_000])
    big.close(linger=0)
    with cluster.client() as c:
        assert c.map("square", range(10)) == [i * i for i in range(10)]


def test_garbage_on_both_sockets_leaves_the_broker_serving(cluster):
    cluster.start_broker(liveness=100)  # junky must not expire before its junk arrives
    cluster.start_worker("--name", "honest")
    cluster.wait_workers(1)
    front = raw_socket(zmq.DEALER, cluster.frontend)
    back = raw_socket(zmq.DEALER, cluster.backend)
    try:
        for frames in GARBAGE:
            front.send_multipart(frames)
            back.send_multipart(frames)
            back.send_multipart([WORKER_TAG, *frames[1:]])
        # a peer that joins properly and then sends junk is forgotten
        back.send_multipart(encode(WORKER_TAG, Message(Command.READY, {"name": "junky", "slots": 1,
                                                                      "tasks": {"noop": None}})))
        with cluster.client() as c:
            wait_until(lambda: "junky" in {w["name"] for w in c.status()["workers"]}, 10, what="junky joined")
            back.send_multipart([WORKER_TAG, bytes([Command.HEARTBEAT]), b"\xc1"])
            wait_until(lambda: {w["name"] for w in c.status()["workers"]} == {"honest"}, 10, what="junky forgotten")
            assert "worker_message_dropped" in cluster.logs() and "worker_expired" not in cluster.logs()
            assert c.map("square", range(50)) == [i * i for i in range(50)]
    finally:
        front.close(linger=0)
        back.close(linger=0)


def test_a_fetch_inside_a_submit_is_answered_as_its_own_request_and_a_bad_one_is_refused(local):
    local.start_worker()
    local.wait_workers(1)
    dealer = raw_socket(zmq.DEALER, local.frontend)

    def send(header: dict) -> None:
        dealer.send_multipart([b"", *encode(CLIENT_TAG, Message(Command.SUBMIT, header))])

    def replies(n: int) -> dict:
        got = [decode(dealer.recv_multipart()[1:], CLIENT_TAG) for _ in range(n)]
        return {m.header["rid"]: m for m in got}

    try:
        fetch = {"rid": 2, "session": "s", "ack": [], "wait_ms": 5000}
        blob, _ = pack_value([[7], {}])
        square = ["t1", "square", blob, 0, None, 0, None, None, None]
        send({"rid": 1, "session": "s", "tasks": [square], FETCH_IN_SUBMIT: fetch})
        got = replies(2)
        assert got[1].command is Command.ACCEPTED and got[1].header["rejected"] == []
        assert got[2].command is Command.RESULTS and [r[0] for r in got[2].header["results"]] == ["t1"]
        send({"rid": 3, "session": "s", "tasks": [submit_record("t2")], FETCH_IN_SUBMIT: [1, 2]})
        got = replies(2)
        assert got[3].command is Command.ACCEPTED
        assert got[None].command is Command.ERROR and FETCH_IN_SUBMIT in got[None].header["error"]
    finally:
        dealer.close(linger=0)
