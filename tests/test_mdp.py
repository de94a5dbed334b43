"""Majordomo interop (RFC 7/MDP 0.1, RFC 8/MMI): the bridge on a fake clock, then raw pyzmq peers.

The raw clients and workers below are written from the RFC text, frame by frame,
and share no code with the broker: they are what a Majordomo peer in any other
language would send.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from broker.core import Core
from broker.mdp import MdpBridge
from broker.protocol import DISPATCH_FIELDS, DONE_FIELDS, Command, Message, pack_value, unpack_value
from tests.conftest import TEST_HEARTBEAT_S, wait_until
from tests.harness import published

# RFC 7 constants, spelled out here on purpose: the tests check the broker against the RFC, not against itself
MDPC01 = b"MDPC01"
MDPW01 = b"MDPW01"
READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT = b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"


# ============================================================== the bridge on a fake clock

WID_A = b"\x00\x80\x00\x00\x01"
WID_B = b"\x00\x80\x00\x00\x02"
CLIENT = b"\x00\x80\x00\x00\x09"


class Loop:
    """The core and the bridge as the server drives them, with a clock the test moves."""

    def __init__(self, **core_options) -> None:
        self.core = Core(**{"heartbeat_s": 1.0, "liveness": 3, **core_options})
        self.bridge = MdpBridge(self.core)
        self.now = 0.0
        self.events: list = []

    def client(self, *frames: bytes, route: bytes = CLIENT):
        self.bridge.on_client(route, list(frames), self.now)
        return self.pump()

    def worker(self, wid: bytes, *frames: bytes):
        self.bridge.on_worker(wid, list(frames), self.now)
        return self.pump()

    def tick(self, seconds: float):
        self.now += seconds
        self.core.on_tick(self.now)
        return self.pump()

    def pump(self):
        """(frontend frames, backend frames) the server would send now; gridq output kept aside."""
        out, wire = self.bridge.route(self.core.flush(self.now), self.now)
        self.events.extend(published(out.events))
        self.gridq = out
        return ([[bytes(f) for f in m] for m in wire.frontend], [[bytes(f) for f in m] for m in wire.backend])

    def topics(self, topic: str) -> list[dict]:
        return [f for t, f in self.events if t == topic]


def test_a_request_is_a_task_whose_reply_echoes_the_service_frame_and_body():
    loop = Loop()
    assert loop.worker(WID_A, MDPW01, READY, b"echo") == ([], [])
    front, back = loop.client(MDPC01, b"echo", b"hello", b"", b"world")
    assert front == []
    [request] = back
    assert request[:4] == [WID_A, b"", MDPW01, REQUEST]
    address = request[4]
    assert request[5:] == [b"", b"hello", b"", b"world"]
    [task] = loop.core.tasks.values()
    assert (task.name, task.priority, task.task_id.encode()) == ("echo", 0, address)

    front, back = loop.worker(WID_A, MDPW01, REPLY, address, b"", b"HELLO", b"WORLD")
    assert front == [[CLIENT, b"", MDPC01, b"echo", b"HELLO", b"WORLD"]]
    assert [t for t, _ in loop.events if t.startswith("task.")] == ["task.submitted", "task.started", "task.succeeded"]
    assert loop.topics("task.started")[0]["worker"] == loop.topics("worker.joined")[0]["worker"]
    assert loop.core.counts["done"] == 1 and loop.bridge.requests == {}


def test_an_mdp_worker_gets_one_request_at_a_time_however_many_are_queued():
    loop = Loop()
    loop.worker(WID_A, MDPW01, READY, b"fast")
    _, back = loop.client(MDPC01, b"fast", b"0")
    for i in range(1, 4):  # once a run time is known, the core may hand a busy worker more, ahead
        _, more = loop.client(MDPC01, b"fast", str(i).encode())
        back += more
    answered = []
    for i in range(4):
        [request] = back
        assert request[6:] == [str(i).encode()]
        front, back = loop.worker(WID_A, MDPW01, REPLY, request[4], b"", b"ok " + request[6])
        answered += front
    assert back == [] and [r[4] for r in answered] == [b"ok 0", b"ok 1", b"ok 2", b"ok 3"]
    assert len(loop.topics("task.started")) == len(loop.topics("task.succeeded")) == 4


def test_the_broker_heartbeats_mdp_workers_and_expires_silent_ones():
    loop = Loop(heartbeat_s=1.0, liveness=3)
    loop.worker(WID_A, MDPW01, READY, b"echo")
    _, back = loop.tick(1.0)
    assert back == [[WID_A, b"", MDPW01, HEARTBEAT]]
    loop.worker(WID_A, MDPW01, HEARTBEAT)
    loop.tick(2.5)
    assert loop.core.workers  # heard 2.5 s ago: alive
    loop.tick(1.0)
    assert not loop.core.workers and loop.topics("worker.lost")
    # the worker the broker declared dead speaks again: 7/MDP says DISCONNECT
    _, back = loop.worker(WID_A, MDPW01, HEARTBEAT)
    assert back == [[WID_A, b"", MDPW01, DISCONNECT]]


@pytest.mark.parametrize("first, then", [
    ([READY, b"echo"], [READY, b"echo"]),  # a second READY
    (None, [REPLY, b"some-client", b"", b"body"]),  # REPLY before READY
    (None, [HEARTBEAT]),  # HEARTBEAT before READY
    ([READY, b"echo"], [REQUEST, b"some-client", b"", b"body"]),  # a command only brokers send
])
def test_a_valid_but_unexpected_worker_command_gets_disconnect(first, then):
    loop = Loop()
    if first:
        loop.worker(WID_A, MDPW01, *first)
    _, back = loop.worker(WID_A, MDPW01, *then)
    assert back == [[WID_A, b"", MDPW01, DISCONNECT]]
    assert loop.core.workers == {}


def test_a_worker_registering_an_mmi_service_is_disconnected_and_never_registered():
    loop = Loop()
    _, back = loop.worker(WID_A, MDPW01, READY, b"mmi.service")
    assert back == [[WID_A, b"", MDPW01, DISCONNECT]]
    assert loop.core.workers == {}


def test_an_invalid_worker_message_is_dropped_and_its_sender_forgotten():
    loop = Loop()
    loop.worker(WID_A, MDPW01, READY, b"echo")
    assert loop.worker(WID_A, MDPW01, b"\x09") == ([], [])  # no such command
    assert loop.core.workers == {}
    assert loop.worker(WID_B, MDPW01, READY) == ([], [])  # READY without its service frame
    assert loop.core.workers == {}


def test_mmi_service_answers_200_for_mdp_and_native_workers_404_otherwise_and_other_mmi_501():
    loop = Loop()
    loop.worker(WID_A, MDPW01, READY, b"echo")
    loop.core.on_worker(WID_B, Message(Command.READY, {"name": "native", "slots": 2, "tasks": {"square": {"cpu": 1}}}), 0.0)
    answers = {}
    for service, body in [(b"mmi.service", [b"echo"]), (b"mmi.service", [b"square"]), (b"mmi.service", [b"nobody"]),
                          (b"mmi.service", []), (b"mmi.workers", [b"echo"])]:
        [reply], _ = loop.client(MDPC01, service, *body)
        assert reply[:4] == [CLIENT, b"", MDPC01, service]
        answers[(service, tuple(body))] = reply[4:]
    assert answers == {(b"mmi.service", (b"echo",)): [b"200"], (b"mmi.service", (b"square",)): [b"200"],
                       (b"mmi.service", (b"nobody",)): [b"404"], (b"mmi.service", ()): [b"404"],
                       (b"mmi.workers", (b"echo",)): [b"501"]}
    assert loop.core.tasks == {}  # the broker answered them itself


def test_a_request_held_by_a_dead_worker_goes_to_another_and_is_answered_once():
    loop = Loop(heartbeat_s=1.0, liveness=3)
    loop.worker(WID_A, MDPW01, READY, b"echo")
    _, [request] = loop.client(MDPC01, b"echo", b"x")
    address = request[4]
    loop.worker(WID_B, MDPW01, READY, b"echo")
    for _ in range(3):  # A falls silent, B keeps heartbeating
        loop.worker(WID_B, MDPW01, HEARTBEAT)
        _, back = loop.tick(1.0)
    assert [WID_B, b"", MDPW01, REQUEST, address, b"", b"x"] in back
    assert loop.topics("worker.lost")[0]["requeued"] == [address.decode()]
    front, _ = loop.worker(WID_B, MDPW01, REPLY, address, b"", b"X")
    assert front == [[CLIENT, b"", MDPC01, b"echo", b"X"]]
    # A was only slow: its late reply is refused, and the client hears nothing more
    front, back = loop.worker(WID_A, MDPW01, REPLY, address, b"", b"late")
    assert front == [] and back == [[WID_A, b"", MDPW01, DISCONNECT]]
    assert len(loop.topics("task.succeeded")) == 1


def test_a_native_worker_gets_body_frames_as_uint8_arrays_and_its_list_result_becomes_the_reply():
    loop = Loop()
    loop.core.on_worker(WID_B, Message(Command.READY, {"name": "native", "slots": 1, "tasks": {"upper": {"cpu": 1}}}), 0.0)
    loop.client(MDPC01, b"upper", b"abc", b"")
    [(wid, tasks)] = loop.gridq.workers
    [record] = [dict(zip(DISPATCH_FIELDS, r)) for r in tasks.header["tasks"]]
    task_id = record["task_id"]
    args, kwargs = unpack_value(record["args"], tasks.frames)
    assert kwargs == {} and [a.dtype for a in args] == [np.uint8, np.uint8]
    assert [bytes(a) for a in args] == [b"abc", b""]
    value, frames = pack_value([b"ABC", "text", np.array([1, 2], np.uint8)])
    done = dict(task_id=task_id, ok=True, value=value, nframes=len(frames), run_s=0.1)
    loop.core.on_worker(wid, Message(Command.DONE, {"results": [[done[f] for f in DONE_FIELDS]]}, frames), 0.0)
    front, _ = loop.pump()
    assert front == [[CLIENT, b"", MDPC01, b"upper", b"ABC", b"text", b"\x01\x02"]]


def test_a_request_for_a_service_nobody_serves_fails_after_no_worker_timeout_without_a_reply():
    loop = Loop(no_worker_timeout_s=2.0)
    loop.client(MDPC01, b"nobody", b"x")
    front = []
    for _ in range(4):
        f, _ = loop.tick(1.0)
        front += f
    assert front == []
    [failed] = loop.topics("task.failed")
    assert failed["name"] == "nobody" and "NoWorkerAvailable" in failed["error"]
    assert loop.bridge.requests == {}


def test_a_gridq_task_with_keyword_arguments_sent_to_an_mdp_worker_fails_instead_of_being_sent():
    loop = Loop()
    loop.worker(WID_A, MDPW01, READY, b"echo")
    blob, frames = pack_value([[b"x"], {"k": 1}])
    record = ["t1", "echo", blob, len(frames), None, 0, None, None, None]
    loop.core.on_client(b"\x00\x80\x00\x00\x07", Message(Command.SUBMIT, {"rid": 1, "session": "s", "tasks": [record]}), 0.0)
    _, back = loop.pump()
    assert back == []
    [failed] = loop.topics("task.failed")
    assert "positional frames only" in failed["error"]
    assert loop.core.workers[WID_A].running == {}  # its one slot is free again


# ============================================================== raw Majordomo peers over TCP


def _socket(kind: int, address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.linger = 0
    sock.connect(address)
    return sock


def recv(sock: zmq.Socket, timeout: float = 10.0, what: str = "a message") -> list[bytes]:
    if not sock.poll(timeout * 1000):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return sock.recv_multipart()


class RawClient:
    """An MDP client from RFC 7: REQ (the socket adds the empty frame) or DEALER (we add it)."""

    def __init__(self, address: str, kind: int = zmq.REQ) -> None:
        self.kind = kind
        self.sock = _socket(kind, address)

    def send(self, service: bytes, *body: bytes) -> None:
        envelope = [b""] if self.kind == zmq.DEALER else []
        self.sock.send_multipart([*envelope, MDPC01, service, *body])

    def recv(self, timeout: float = 10.0) -> list[bytes]:
        frames = recv(self.sock, timeout, "an MDP reply")
        if self.kind == zmq.DEALER:
            assert frames[0] == b"", "a reply to a DEALER client starts with the empty frame"
            frames = frames[1:]
        assert frames[0] == MDPC01
        return frames[1:]  # [service, *body]

    def call(self, service: bytes, *body: bytes, timeout: float = 10.0) -> list[bytes]:
        self.send(service, *body)
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close(linger=0)


class RawWorker:
    """An MDP worker from RFC 7 on a DEALER socket, driven step by step by the test.

    While it waits for a command it heartbeats, as a live worker must.
    """

    def __init__(self, address: str) -> None:
        self.sock = _socket(zmq.DEALER, address)
        self.heartbeats = 0

    def send(self, command: bytes, *frames: bytes) -> None:
        self.sock.send_multipart([b"", MDPW01, command, *frames])

    def recv(self, timeout: float = 10.0, skip_heartbeats: bool = True) -> list[bytes]:
        """The next command as [command, *frames], after checking the RFC's header frames."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for a broker command")
            if self.sock.poll(min(left, TEST_HEARTBEAT_S) * 1000):
                frames = self.sock.recv_multipart()
                assert frames[:2] == [b"", MDPW01], frames
                if frames[2] == HEARTBEAT and skip_heartbeats:
                    assert len(frames) == 3
                    self.heartbeats += 1
                    continue
                return frames[2:]
            self.send(HEARTBEAT)

    def close(self) -> None:
        self.sock.close(linger=0)


class ServiceWorker(threading.Thread):
    """An MDP worker from RFC 7 that answers every request with ``handler(body)`` until stopped.

    It heartbeats on its own schedule and, on DISCONNECT, reconnects on a fresh
    socket and registers again, as the RFC asks.
    """

    def __init__(self, address: str, service: bytes, handler=lambda body: body) -> None:
        super().__init__(daemon=True)
        self.address, self.service, self.handler = address, service, handler
        self.served: list[list[bytes]] = []
        self.disconnects = 0
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        sock = self._connect()
        next_heartbeat = time.monotonic() + TEST_HEARTBEAT_S
        try:
            while not self._halt.is_set():
                if sock.poll(20):
                    frames = sock.recv_multipart()
                    command = frames[2]
                    if command == REQUEST:
                        address, empty, body = frames[3], frames[4], frames[5:]
                        assert empty == b""
                        self.served.append(body)
                        sock.send_multipart([b"", MDPW01, REPLY, address, b"", *self.handler(body)])
                    elif command == DISCONNECT:
                        self.disconnects += 1
                        sock.close(linger=0)
                        sock = self._connect()
                if time.monotonic() >= next_heartbeat:
                    sock.send_multipart([b"", MDPW01, HEARTBEAT])
                    next_heartbeat = time.monotonic() + TEST_HEARTBEAT_S
        finally:
            sock.close(linger=0)

    def _connect(self) -> zmq.Socket:
        sock = _socket(zmq.DEALER, self.address)
        sock.send_multipart([b"", MDPW01, READY, self.service])
        return sock

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


@pytest.fixture
def peers():
    """Collects raw sockets and service workers of a test; closes and stops all of them at the end."""
    made: list = []

    def keep(peer):
        made.append(peer)
        return peer

    yield keep
    for peer in made:
        peer.stop() if isinstance(peer, ServiceWorker) else peer.close()


def serving(cluster, service: str, n: int = 1) -> dict:
    """Wait until ``n`` live workers serve ``service``; returns the status snapshot."""
    with cluster.client() as c:
        return wait_until(lambda: (s := c.status()) and sum(service in w["serves"] for w in s["workers"]) >= n and s,
                          15, interval=0.05, what=f"{n} workers serving {service}")


def test_a_req_client_gets_the_mdp_workers_multi_frame_reply_with_the_exact_service_name(cluster, peers):
    cluster.start_broker()
    peers(ServiceWorker(cluster.backend, b"echo.upper", lambda body: [f.upper() for f in body]))
    serving(cluster, "echo.upper")
    client = peers(RawClient(cluster.frontend, zmq.REQ))
    assert client.call(b"echo.upper", b"hello", b"", b"\x00\xffbin") == [b"echo.upper", b"HELLO", b"", b"\x00\xffBIN"]
    assert client.call(b"echo.upper", b"again") == [b"echo.upper", b"AGAIN"]


def test_a_worker_sees_the_rfc_frames_and_a_dealer_client_gets_the_reply(cluster, peers):
    cluster.start_broker("--liveness", "50")  # the test pauses between steps; no expiry here
    worker = peers(RawWorker(cluster.backend))
    worker.send(READY, b"step")
    serving(cluster, "step")
    assert worker.recv(skip_heartbeats=False) == [HEARTBEAT]  # the broker heartbeats at its --heartbeat

    client = peers(RawClient(cluster.frontend, zmq.DEALER))
    client.send(b"step", b"part 1", b"part 2")
    command, address, empty, *body = worker.recv()
    assert (command, empty, body) == (REQUEST, b"", [b"part 1", b"part 2"])
    assert address  # one opaque client address frame
    worker.send(REPLY, address, b"", b"answer", b"more")
    assert client.recv() == [b"step", b"answer", b"more"]

    worker.send(DISCONNECT)  # then the broker sends it nothing more and forgets it
    wait_until(lambda: not serving_now(cluster, "step"), 10, what="the worker to be gone")


def serving_now(cluster, service: str) -> int:
    with cluster.client() as c:
        return sum(service in w["serves"] for w in c.status()["workers"])


def test_a_dealer_client_pipelining_requests_gets_each_reply_exactly_once(cluster, peers):
    cluster.start_broker()
    for _ in range(2):
        peers(ServiceWorker(cluster.backend, b"double", lambda body: [body[0] * 2]))
    serving(cluster, "double", 2)
    client = peers(RawClient(cluster.frontend, zmq.DEALER))
    sent = [str(i).encode() for i in range(200)]
    for body in sent:
        client.send(b"double", body)
    replies = [client.recv() for _ in sent]
    assert sorted(replies) == sorted([b"double", b * 2] for b in sent)


def test_mmi_service_and_unimplemented_mmi_over_the_wire(cluster, peers):
    cluster.start_broker()
    cluster.start_worker()  # a native worker: serves the built-ins, e.g. square
    peers(ServiceWorker(cluster.backend, b"echo"))
    serving(cluster, "echo")
    serving(cluster, "square")
    client = peers(RawClient(cluster.frontend, zmq.REQ))
    assert client.call(b"mmi.service", b"echo") == [b"mmi.service", b"200"]
    assert client.call(b"mmi.service", b"square") == [b"mmi.service", b"200"]
    assert client.call(b"mmi.service", b"nobody") == [b"mmi.service", b"404"]
    assert client.call(b"mmi.version") == [b"mmi.version", b"501"]


@pytest.mark.parametrize("steps", [
    [[READY, b"svc"], [READY, b"svc"]],
    [[REPLY, b"client", b"", b"body"]],
    [[READY, b"mmi.mine"]],
], ids=["second READY", "REPLY before READY", "READY for an mmi. service"])
def test_a_worker_breaking_the_dialog_gets_disconnect(cluster, peers, steps):
    cluster.start_broker()
    worker = peers(RawWorker(cluster.backend))
    for step in steps:
        worker.send(*step)
    assert worker.recv() == [DISCONNECT]


def test_an_mdp_worker_killed_mid_request_has_the_request_requeued_and_the_client_answered_once(cluster, peers, events):
    cluster.start_broker()
    log = events()
    doomed = peers(RawWorker(cluster.backend))
    doomed.send(READY, b"work")
    serving(cluster, "work")
    client = peers(RawClient(cluster.frontend, zmq.DEALER))
    client.send(b"work", b"first")
    command, address, _, body = doomed.recv()
    assert (command, body) == (REQUEST, b"first")
    survivor = peers(ServiceWorker(cluster.backend, b"work", lambda body: [b"done " + body[0]]))
    serving(cluster, "work", 2)
    doomed.close()  # dies holding the request: silent from now on

    assert client.recv(timeout=20) == [b"work", b"done first"]
    task_id = address.decode()
    lost = log.wait_for("worker.lost", lambda f: task_id in f["requeued"])
    assert lost["worker"] != log.wait_for("task.succeeded", lambda f: f["task_id"] == task_id)["worker"]
    assert survivor.served == [[b"first"]]
    # nothing else is on its way: the next thing this client hears is the answer to its next request
    client.send(b"work", b"second")
    assert client.recv() == [b"work", b"done second"]
    log.wait_for("task.succeeded", lambda f: f["task_id"] != task_id)  # events come in seq order
    assert [f["task_id"] for f in log.of("task.succeeded")].count(task_id) == 1
    assert [f["task_id"] for f in log.of("task.retried")] == [task_id]


def test_mdp_traffic_shows_up_in_events_and_status(cluster, peers, events):
    cluster.start_broker()
    log = events()
    peers(ServiceWorker(cluster.backend, b"echo"))
    joined = log.wait_for("worker.joined", lambda f: f["tasks"] == ["echo"])
    client = peers(RawClient(cluster.frontend, zmq.REQ))
    assert client.call(b"echo", b"ping") == [b"echo", b"ping"]
    succeeded = log.wait_for("task.succeeded", lambda f: f["name"] == "echo")
    task_id = succeeded["task_id"]
    submitted = log.wait_for("task.submitted", lambda f: f["task_id"] == task_id)
    started = log.wait_for("task.started", lambda f: f["task_id"] == task_id)
    assert submitted["priority"] == 0 and submitted["name"] == "echo"
    assert started["worker"] == succeeded["worker"] == joined["worker"] and started["attempt"] == 1
    with cluster.client() as c:
        status = wait_until(lambda: (s := c.status())["done"] >= 1 and s, 10, what="done count")
    [worker] = [w for w in status["workers"] if w["name"] == joined["worker"]]
    assert worker["serves"] == ["echo"] and worker["slots"] == 1 and worker["tasks"] == 1


def test_a_native_worker_serves_an_mdp_service_and_a_native_client_calls_an_mdp_worker(cluster, peers, tmp_path):
    (tmp_path / "mdp_tasks.py").write_text(
        "from worker import task\n\n"
        "@task(name='native.upper')\n"
        "def upper(*frames):\n"
        "    # each body frame arrives as a read-only uint8 array; the returned list is the reply body\n"
        "    return [bytes(f).upper() for f in frames]\n")
    cluster.start_broker()
    cluster.start_worker("--tasks", "mdp_tasks")
    peers(ServiceWorker(cluster.backend, b"mdp.reverse", lambda body: [f[::-1] for f in reversed(body)]))
    serving(cluster, "native.upper")
    serving(cluster, "mdp.reverse")

    client = peers(RawClient(cluster.frontend, zmq.REQ))
    assert client.call(b"native.upper", b"abc", b"", b"xyz") == [b"native.upper", b"ABC", b"", b"XYZ"]
    with cluster.client() as c:
        result = c.submit("mdp.reverse", b"abc", "def").result(timeout=10)
    assert [bytes(f) for f in result] == [b"fed", b"cba"]


def test_a_request_for_a_service_nobody_serves_fails_after_no_worker_timeout(cluster, peers, events):
    cluster.start_broker("--no-worker-timeout", "0.5")
    log = events()
    client = peers(RawClient(cluster.frontend, zmq.DEALER))
    client.send(b"nobody.home", b"x")
    failed = log.wait_for("task.failed", lambda f: f["name"] == "nobody.home")
    assert "NoWorkerAvailable" in failed["error"] and "nobody.home" in failed["error"]
