"""Fuzzing: random and mutated frames at the decoder and at a live broker's two sockets.

Only ProtocolError may come out of the decoder. A live broker must answer, keep
serving an honest client and worker, never log ``peer_input_crashed`` (a core
bug reached by peer input), and its memory must stop growing once it has seen
the kind of garbage it is being fed.
"""

from __future__ import annotations

import random

import hypothesis.strategies as st
import msgpack
import numpy as np
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings

from broker.protocol import (CLIENT_TAG, WORKER_TAG, Command, Message, ProtocolError, decode, encode, pack_value,
                             split_frames, unpack_value)
from tests.conftest import wait_until

# ------------------------------------------------------------------ strategies

#: header keys any command reads, so random headers reach deep into the handlers
KEYS = ["rid", "session", "tasks", "ids", "ack", "wait_ms", "max", "name", "slots", "resources", "running",
        "results", "draining", "reason", "pid"]
#: task names the honest worker serves are left out: fuzz workers must not take honest work
NAMES = ["noop", "fuzz.task", "", "x" * 300]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(NAMES), st.binary(max_size=12), st.sampled_from(KEYS),
    st.builds(msgpack.Timestamp, st.integers(0, 2**33), st.integers(0, 999_999_999)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=9),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers(-(2**63), 2**63 - 1)),
                                            inner, max_size=6)),
    max_leaves=30,
)
headers = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
command_bytes = st.one_of(st.sampled_from([bytes([c]) for c in Command]), st.binary(max_size=2))
payload = st.lists(st.binary(max_size=64), max_size=4)


@st.composite
def structured(draw, tag: bytes) -> list:
    """Frames shaped like a message, with random header contents."""
    t = draw(st.sampled_from([tag, tag, b"GQX1", b"MDPW01", b""]))
    return [t, draw(command_bytes), msgpack.packb(draw(headers)), *draw(payload)]


def _valid_messages() -> list[list]:
    blob, frames = pack_value([[np.arange(6, dtype=np.int32).reshape(2, 3)], {"k": 1.5}])
    submit = [["fz-1", "noop", blob, len(frames), {"cpu": 1}, 0, None, None, None]]
    done = [["fz-1", True, blob, len(frames), 0.1]]
    msgs = [
        (CLIENT_TAG, Message(Command.SUBMIT, {"rid": 1, "session": "fuzz", "tasks": submit}, frames)),
        (CLIENT_TAG, Message(Command.FETCH, {"rid": 2, "session": "fuzz", "ack": ["fz-1"], "wait_ms": 0})),
        (CLIENT_TAG, Message(Command.CANCEL, {"rid": 3, "session": "fuzz", "ids": ["fz-1"]})),
        (CLIENT_TAG, Message(Command.STATUS, {"rid": 4})),
        (WORKER_TAG, Message(Command.READY, {"name": "fuzz-w", "slots": 2, "resources": {"cpu": 2},
                                             "tasks": {"noop": {"cpu": 1}}, "running": ["fz-1"]})),
        (WORKER_TAG, Message(Command.DONE, {"results": done}, frames)),
        (WORKER_TAG, Message(Command.HEARTBEAT, {})),
        (WORKER_TAG, Message(Command.RETURN, {"ids": ["fz-1"], "draining": True})),
        (WORKER_TAG, Message(Command.DISCONNECT, {})),
    ]
    return [[bytes(memoryview(f)) for f in encode(tag, msg)] for tag, msg in msgs]


VALID = _valid_messages()


@st.composite
def mutated(draw) -> list:
    """A valid message with a few random edits: bytes flipped, cut, inserted; frames dropped or added."""
    frames = list(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[i])
        op = draw(st.sampled_from(["flip", "cut", "insert", "drop", "add", "swap"]))
        if op == "flip" and frame:
            j = draw(st.integers(0, len(frame) - 1))
            frame[j] = draw(st.integers(0, 255))
        elif op == "cut":
            frame = frame[: draw(st.integers(0, len(frame)))]
        elif op == "insert":
            j = draw(st.integers(0, len(frame)))
            frame[j:j] = draw(st.binary(min_size=1, max_size=8))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
            continue
        elif op == "add":
            frames.insert(i, draw(st.binary(max_size=16)))
            continue
        elif op == "swap" and len(frames) > 1:
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
            continue
        frames[i] = bytes(frame)
    return frames


def any_message(tag: bytes):
    return st.one_of(st.lists(st.binary(max_size=40), max_size=6), structured(tag), mutated())


# ------------------------------------------------------------------ decoder


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(any_message(CLIENT_TAG), any_message(WORKER_TAG)), st.sampled_from([CLIENT_TAG, WORKER_TAG]))
def test_decode_raises_only_protocol_error(frames, tag):
    try:
        msg = decode(frames, tag)
    except ProtocolError:
        return
    assert isinstance(msg.command, Command) and isinstance(msg.header, dict)


@st.composite
def array_refs(draw) -> bytes:
    """msgpack ext payloads that look like array references, mostly wrong."""
    index = draw(st.one_of(st.integers(-2, 3), st.none(), st.text(max_size=2)))
    dtype = draw(st.one_of(st.sampled_from(["<i4", "<f8", "|u1", "<c16", "|O", "<U3", "|V4", "M8", "f8,i4", "?"]),
                           st.text(max_size=6)))
    shape = draw(st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), st.integers(-(2**63), 2**63 - 1),
                              st.text(max_size=3)))
    fortran = draw(st.one_of(st.booleans(), st.none()))
    return msgpack.packb(draw(st.sampled_from([(index, dtype, shape, fortran), (index, dtype), [index]])))


@st.composite
def value_blobs(draw) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=64))
    ext = msgpack.ExtType(draw(st.sampled_from([1, 1, 1, 2, 127])), draw(st.one_of(array_refs(), st.binary(max_size=16))))
    blob = msgpack.packb([draw(values), ext, {"a": ext}])
    if kind == 2 and blob:  # and a flipped byte
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([draw(st.integers(0, 255))]) + blob[i + 1:]
    return blob


@settings(max_examples=300, deadline=None, database=None)
@given(value_blobs(), st.lists(st.binary(max_size=48), max_size=3))
def test_unpack_value_raises_only_protocol_error(blob, frames):
    try:
        unpack_value(blob, frames)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.binary(max_size=4), max_size=6), st.lists(st.integers(0, 8), max_size=6))
def test_split_frames_raises_only_protocol_error(frames, counts):
    # counts are non-negative: every caller checks each record's nframes before splitting
    try:
        parts = split_frames(frames, counts)
    except ProtocolError:
        return
    assert [len(p) for p in parts] == counts


# ------------------------------------------------------------------ a live broker


class Fuzzer:
    """Raw sockets on both broker endpoints; replies are read and thrown away."""

    def __init__(self, cluster) -> None:
        self.ctx = zmq.Context.instance()
        self.front = self._socket(zmq.DEALER, cluster.frontend)
        self.back = self._socket(zmq.DEALER, cluster.backend)
        self.address = cluster.frontend
        self.req = self._socket(zmq.REQ, cluster.frontend)
        self.req_replies = 0
        self.sent = 0

    def _socket(self, kind: int, address: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.connect(address)
        return sock

    def throw(self, front: list, back: list) -> None:
        self.front.send_multipart(front if front[:1] == [b""] else [b"", *front])
        self.front.send_multipart(front or [b""])  # and without the delimiter a REQ would add
        self.back.send_multipart(back or [b""])
        self.sent += 3
        self.drain()

    def ask(self, frames: list) -> None:
        """A REQ peer sending garbage: an answer comes back (unless it parked a valid FETCH)."""
        self.req.send_multipart(frames or [b""])
        if self.req.poll(5000):
            self.req.recv_multipart()
            self.req_replies += 1
        else:  # a well-formed long FETCH: start over on a fresh REQ socket
            self.req.close(linger=0)
            self.req = self._socket(zmq.REQ, self.address)
        self.sent += 1

    def drain(self) -> None:
        for sock in (self.front, self.back):
            while True:
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break

    def close(self) -> None:
        for sock in (self.front, self.back, self.req):
            sock.close(linger=0)


def garbage(rng: random.Random, n: int) -> list[list]:
    """Invalid messages the broker must not keep anything of, each dragging a 16 KiB frame."""
    out = []
    for i in range(n):
        big = rng.randbytes(16 * 1024)
        base = list(rng.choice(VALID))
        kind = i % 4
        if kind == 0:
            out.append([rng.randbytes(rng.randrange(0, 32)) for _ in range(rng.randrange(1, 5))] + [big])
        elif kind == 1:
            out.append([base[0], base[1], b"\xc1" + base[2][1:], big])  # 0xc1: never valid msgpack
        elif kind == 2:
            out.append([b"GQZ9", *base[1:], big])
        else:
            out.append([base[0], b"\xee", *base[2:], big])
    return out


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.timeout(120)
def test_live_broker_survives_random_frames_and_keeps_serving(cluster):
    broker = cluster.start_broker("--no-worker-timeout", "1")
    cluster.start_worker("--name", "honest", "--slots", "2")
    cluster.wait_workers(1)
    fuzzer = Fuzzer(cluster)
    try:
        @settings(max_examples=100, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.lists(st.tuples(any_message(CLIENT_TAG), any_message(WORKER_TAG)), min_size=1, max_size=8),
               st.lists(st.one_of(st.lists(st.binary(max_size=24), max_size=4), mutated()), max_size=2))
        def throw(pairs, asks):
            for front, back in pairs:
                fuzzer.throw(front, back)
            for frames in asks:
                fuzzer.ask(frames)

        throw()
        assert broker.poll() is None, cluster.logs()[-3000:]

        # memory: a second round of garbage must not grow the broker much beyond the first
        rng = random.Random(8)
        for frames in garbage(rng, 1000):
            fuzzer.throw(frames, frames)
        with cluster.client() as c:
            c.status()  # the broker has read all of it
        before = rss(broker.pid)
        for frames in garbage(rng, 1000):
            fuzzer.throw(frames, frames)
        with cluster.client() as c:
            c.status()
        grown = rss(broker.pid) - before
        assert grown < 24 * 2**20, f"broker RSS grew {grown / 2**20:.1f} MiB on a second round of 1000 junk messages"
    finally:
        fuzzer.close()
    assert fuzzer.sent > 1000 and fuzzer.req_replies > 0
    with cluster.client() as c:
        assert c.map("square", range(200)) == [i * i for i in range(200)]
        wait_until(lambda: [w["name"] for w in c.status()["workers"]] == ["honest"], 15, what="fuzz workers gone")
    assert broker.poll() is None
    assert "peer_input_crashed" not in cluster.logs()
