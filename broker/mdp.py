"""7/MDP and 8/MMI beside gridq's own protocol: Majordomo frames translated to and from core calls.

Majordomo peers never meet the core directly. A client REQUEST becomes a core
SUBMIT of a task named after the service, an MDP worker's READY becomes a core
READY of a one-slot worker, its REPLY a core DONE. So MDP requests get task
ids, events, status, requeue on worker death and ``--no-worker-timeout`` like
any task. The bridge is sans-IO like the core: frames go in, and ``route()``
returns the core's output with every message meant for a Majordomo peer turned
into frames for the server to send.

How a body is stored: a request body is the task's positional arguments, one
read-only 1-D ``uint8`` array per frame (``pack_value`` keeps each as its own
zero-copy payload frame); a reply body is the task's result, a list of such
arrays. Going back out, each item of the list becomes one frame: ``bytes``,
``str`` (UTF-8) or a numeric array (its raw bytes). See docs/PROTOCOL.md.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field


from broker.core import MAX_FETCH_WAIT_S, Core
from broker.events import Outgoing
from broker.logs import get_logger
from broker.mdp_wire import (
    DISCONNECT,
    EMPTY,
    HEARTBEAT,
    MDP_COMMANDS,
    MMI_FOUND,
    MMI_NOT_FOUND,
    MMI_NOT_IMPLEMENTED,
    MMI_PREFIX,
    MMI_SERVICE,
    REQUEST,
    MdpCommand,
    as_arrays,
    frames_of,
    request_body,
    service_name,
    worker_name,
)
from broker.protocol import (
    MDP_CLIENT_TAG,
    MDP_WORKER_TAG,
    Command,
    DoneRecord,
    ErrorType,
    Message,
    ProtocolError,
    SubmitRecord,
    as_bytes,
    pack_value,
    records,
    unpack_value,
)
from broker.states import TaskState, WorkerState

log = get_logger(__name__)


#: what an MDP worker offers and what one request of its service holds there: one request at a time
MDP_WORKER_RESOURCES = {"cpu": 1}
#: the frontend route the bridge uses for its own requests to the core. It cannot be a
#: real peer's: ids that ROUTER generates are 5 bytes, ids that peers set never start with 0
BRIDGE_ROUTE = b"\x00gridq.mdp.bridge"


@dataclass(slots=True)
class Wire:
    """Majordomo messages ready for the sockets, each a frame list starting with the routing id."""

    frontend: list = field(default_factory=list)
    backend: list = field(default_factory=list)


@dataclass(slots=True)
class _MdpWorker:
    """A registered MDP worker: one request on the wire at a time, whatever the core sends."""

    service: bytes  #: the service frame of its READY
    current: str | None = None  #: task id of the REQUEST it is answering
    #: (task_id, body, sent_ahead) the core handed it while busy; REQUESTed one by one after each REPLY
    waiting: deque = field(default_factory=deque)


@dataclass(slots=True)
class _Request:
    route: bytes  #: the client's routing id on the frontend
    service: bytes  #: the service frame exactly as the client sent it, echoed in the reply


class MdpBridge:
    """Speaks 7/MDP and 8/MMI to Majordomo peers and plain core calls to the core.

    All Majordomo requests share one core session, fetched by one parked FETCH,
    so the core keeps no per-client state for them; the bridge remembers which
    route and service frame each task answers to.
    """

    def __init__(self, core: Core) -> None:
        self.core = core
        nonce = os.urandom(8).hex()
        #: the core session of every MDP request: unguessable, so no gridq client can fetch from it
        self.session = f"mdp-{nonce}"
        self.requests: dict[str, _Request] = {}  #: task id -> who asked, while unanswered
        self.workers: dict[bytes, _MdpWorker] = {}  #: registered MDP workers by routing id
        self.wire = Wire()
        self._task_ids = (f"mdp-{nonce}-{n:x}" for n in itertools.count(1))
        self._rids = itertools.count(1)
        self._fetch_rid: int | None = None  #: rid of the FETCH the core has not answered yet
        self._submits: dict[int, str] = {}  #: rid -> task id of each SUBMIT not answered yet
        self._acks: list[str] = []  #: delivered task ids, acknowledged with the next FETCH
        self._fed = False  #: the bridge called the core since its last flush
        self._next_prune = 0.0

    # ================================================================ clients

    def on_client(self, route: bytes, frames: list, now: float) -> None:
        """A frontend message from ``MDPC01`` on: [tag, service, *body]. Bad ones are dropped."""
        try:
            self._on_client(route, frames, now)
        except Exception as exc:  # a bridge bug that a peer's input reached: keep serving everyone else
            log.exception("peer_input_crashed", peer="mdp_client", error=repr(exc))

    def _on_client(self, route: bytes, frames: list, now: float) -> None:
        if len(frames) < 2:
            log.info("mdp_client_message_dropped", error="REQUEST needs a service frame")
            return
        service = as_bytes(frames[1])
        body = frames[2:]
        if service.startswith(MMI_PREFIX):
            self._reply(route, service, [self._mmi(service, body)])
            return
        try:
            name = service_name(service)
            blob, payload = pack_value([as_arrays(body), {}])
        except ValueError as exc:
            log.info("mdp_client_message_dropped", error=str(exc))
            return
        task_id = next(self._task_ids)
        record = SubmitRecord(task_id, name, blob, len(payload), resources=None, priority=0, retries=None,
                              timeout_s=None, key=None)
        self.requests[task_id] = _Request(route, service)
        rid = next(self._rids)
        self._submits[rid] = task_id
        self._call(Message(Command.SUBMIT, {"rid": rid, "session": self.session,
                                            "tasks": [record]}, payload), now)
        if self._fetch_rid is None:
            self._fetch(now)

    def _mmi(self, service: bytes, body: list) -> bytes:
        if service != MMI_SERVICE:
            return MMI_NOT_IMPLEMENTED
        try:
            name = as_bytes(body[0]).decode() if body else None
        except UnicodeDecodeError:
            name = None
        served = name is not None and any(name in w.serves and w.state is WorkerState.READY
                                          for w in self.core.workers.values())
        return MMI_FOUND if served else MMI_NOT_FOUND

    def _reply(self, route: bytes, service: bytes, body: list) -> None:
        # 7/MDP: a reply carries at least one body frame
        self.wire.frontend.append([route, EMPTY, MDP_CLIENT_TAG, service, *(body or [EMPTY])])

    def _fetch(self, now: float) -> None:
        """Ask the core for finished MDP tasks, acknowledging the ones already answered."""
        self._fetch_rid = next(self._rids)
        acks, self._acks = self._acks, []
        wait_ms = int(MAX_FETCH_WAIT_S * 1000) if self.requests else 0
        self._call(Message(Command.FETCH, {"rid": self._fetch_rid, "session": self.session, "ack": acks,
                                           "wait_ms": wait_ms}), now)

    def _call(self, msg: Message, now: float) -> None:
        self.core.on_client(BRIDGE_ROUTE, msg, now)
        self._fed = True

    # ================================================================ workers

    def on_worker(self, wid: bytes, frames: list, now: float) -> None:
        """A backend message from ``MDPW01`` on: [tag, command, ...]. Bad ones are dropped."""
        try:
            self._on_worker(wid, frames, now)
        except Exception as exc:  # a bridge bug that a peer's input reached: keep serving everyone else
            log.exception("peer_input_crashed", peer="mdp_worker", worker=worker_name(wid), error=repr(exc))

    def _on_worker(self, wid: bytes, frames: list, now: float) -> None:
        command = MDP_COMMANDS.get(as_bytes(frames[1])) if len(frames) > 1 else None
        if command is None:
            self._invalid(wid, "missing or unknown MDP/Worker command", now)
            return
        registered = self._registered(wid)
        if command is MdpCommand.DISCONNECT:
            if registered:
                self._unregister(wid, now)
            else:
                self.workers.pop(wid, None)
            return
        if command is MdpCommand.READY:
            self._on_ready(wid, frames, registered, now)
        elif not registered:  # also the worker the broker declared dead, heard from again
            self._disconnect(wid, f"{command.name} before READY", now)
        elif command is MdpCommand.HEARTBEAT:
            self._to_core(wid, Message(Command.HEARTBEAT, {}), now)
        elif command is MdpCommand.REPLY:
            self._on_reply(wid, frames, now)
        else:
            self._disconnect(wid, f"{command.name} is not sent by workers", now)

    def _on_ready(self, wid: bytes, frames: list, registered: bool, now: float) -> None:
        if registered:
            self._disconnect(wid, "a second READY", now)
            return
        if len(frames) < 3:
            self._invalid(wid, "READY without a service frame", now)
            return
        service = as_bytes(frames[2])
        if service.startswith(MMI_PREFIX):
            self._disconnect(wid, f"service {service[:64]!r} is in the broker's mmi. namespace", now)
            return
        try:
            name = service_name(service)
        except ValueError as exc:
            self._disconnect(wid, str(exc), now)
            return
        self.workers[wid] = _MdpWorker(service)
        self._to_core(wid, Message(Command.READY, {
            "name": worker_name(wid), "slots": 1, "resources": dict(MDP_WORKER_RESOURCES),
            "tasks": {name: dict(MDP_WORKER_RESOURCES)}}), now)
        log.info("mdp_worker_ready", worker=worker_name(wid), service=name)

    def _on_reply(self, wid: bytes, frames: list, now: float) -> None:
        if len(frames) < 4 or as_bytes(frames[3]) != EMPTY:
            self._invalid(wid, "REPLY needs a client address frame and an empty frame", now)
            return
        worker = self.workers[wid]
        task_id = as_bytes(frames[2]).decode("utf-8", "replace")
        if task_id != worker.current:
            self._disconnect(wid, "REPLY for a request it does not hold", now)
            return
        worker.current = None
        task = self.core.tasks.get(task_id)
        started_at = task.started_at if task is not None and task.started_at is not None else now
        blob, payload = pack_value(as_arrays(frames[4:]))
        record = DoneRecord(task_id, ok=True, value=blob, nframes=len(payload), run_s=now - started_at)
        self._to_core(wid, Message(Command.DONE, {"log": [record]}, payload), now)
        self._send_next(wid, worker, now)

    def _registered(self, wid: bytes) -> bool:
        """Whether ``wid`` sent READY and the core still counts it as live."""
        worker = self.core.workers.get(wid)
        return wid in self.workers and worker is not None and worker.name == worker_name(wid)

    def _to_core(self, wid: bytes, msg: Message, now: float) -> None:
        self.core.on_worker(wid, msg, now)
        self._fed = True

    def _unregister(self, wid: bytes, now: float) -> None:
        """The core forgets the worker; what it held is queued again."""
        self.workers.pop(wid, None)
        self._to_core(wid, Message(Command.DISCONNECT, {}), now)

    def _disconnect(self, wid: bytes, reason: str, now: float) -> None:
        """7/MDP: a valid but unexpected command gets DISCONNECT, then silence."""
        log.warning("mdp_worker_disconnected", worker=worker_name(wid), reason=reason)
        if self._registered(wid):
            self._unregister(wid, now)
        self.workers.pop(wid, None)
        self.wire.backend.append([wid, EMPTY, MDP_WORKER_TAG, DISCONNECT])

    def _invalid(self, wid: bytes, reason: str, now: float) -> None:
        """7/MDP: an invalid message is dropped and its sender treated as invalid (forgotten)."""
        log.warning("mdp_worker_message_dropped", worker=worker_name(wid), error=reason)
        if self._registered(wid):
            self._unregister(wid, now)
        self.workers.pop(wid, None)

    # ================================================================ output

    def route(self, out: Outgoing, now: float) -> tuple[Outgoing, Wire]:
        """Split a core flush into gridq messages and Majordomo frames.

        Translating can call the core again (fetching, acknowledging, failing a
        task that cannot travel as MDP), so the core is flushed until quiet.
        """
        kept = Outgoing()
        while True:
            self._fed = False
            for route, msg in out.clients:
                if route == BRIDGE_ROUTE:
                    self._from_core(msg, now)
                else:
                    kept.clients.append((route, msg))
            for wid, msg in out.workers:
                if wid in self.workers:
                    self._to_worker(wid, msg, now)
                else:
                    kept.workers.append((wid, msg))
            kept.events.extend(out.events)
            if not self._fed:
                break
            out = self.core.flush(now)
        if now >= self._next_prune:
            self._next_prune = now + self.core.heartbeat_s
            for wid in [w for w in self.workers if not self._registered(w)]:
                del self.workers[wid]  # expired by the core: it gets DISCONNECT if it speaks again
        wire, self.wire = self.wire, Wire()
        return kept, wire

    def _from_core(self, msg: Message, now: float) -> None:
        """The core's answer to one of the bridge's own requests."""
        if msg.command is Command.RESULTS:
            if msg.header.get("rid") == self._fetch_rid:
                self._fetch_rid = None
            self._deliver(msg)
            if self._fetch_rid is None and (self.requests or self._acks):
                self._fetch(now)
        elif msg.command is Command.ACCEPTED:
            self._submits.pop(msg.header.get("rid"), None)
            for task_id, reason in msg.header.get("rejected") or ():
                self.requests.pop(task_id, None)
                log.warning("mdp_request_refused", task_id=task_id, error=reason)
        elif msg.command is Command.ERROR:
            # never expected: the bridge builds its requests itself. Forget what the refusal concerns.
            rid = msg.header.get("rid")
            self.requests.pop(self._submits.pop(rid, None), None)
            if rid == self._fetch_rid:
                self._fetch_rid = None  # the next request fetches again
            log.error("mdp_bridge_request_refused", error=msg.header.get("error"))

    def _deliver(self, msg: Message) -> None:
        for rec, frames in records(msg):
            task_id, status, value = rec.task_id, rec.status, rec.value
            self._acks.append(task_id)
            request = self.requests.pop(task_id, None)
            if request is None:
                continue  # restored from a journal: the client that asked is gone
            if status != TaskState.SUCCEEDED.value:
                # 7/MDP has no error reply: the client's own retry is its recovery
                log.info("mdp_request_failed", task_id=task_id, error=value)
                continue
            try:
                body = frames_of(unpack_value(value, frames))
            except (ProtocolError, ValueError) as exc:
                log.warning("mdp_reply_dropped", task_id=task_id, error=str(exc))
                continue
            self._reply(request.route, request.service, body)

    def _to_worker(self, wid: bytes, msg: Message, now: float) -> None:
        worker = self.workers[wid]
        if msg.command is Command.TASKS:
            for rec, frames in records(msg):
                task_id, name = rec.task_id, rec.name
                try:
                    body = request_body(rec.args, frames)
                except (ProtocolError, ValueError) as exc:
                    self._refuse(wid, task_id, f"arguments of {name!r} cannot travel to an MDP worker: {exc}", now)
                    continue
                worker.waiting.append((task_id, body, bool(rec.ahead)))
            self._send_next(wid, worker, now)
        elif msg.command is Command.HEARTBEAT:
            self.wire.backend.append([wid, EMPTY, MDP_WORKER_TAG, HEARTBEAT])
        elif msg.command is Command.DISCONNECT:  # the broker is stopping
            self.workers.pop(wid, None)
            self.wire.backend.append([wid, EMPTY, MDP_WORKER_TAG, DISCONNECT])
        else:
            log.error("mdp_worker_message_unexpected", worker=worker_name(wid), command=msg.command.name)

    def _send_next(self, wid: bytes, worker: _MdpWorker, now: float) -> None:
        """REQUEST the next waiting task, if the worker is free: 7/MDP workers take one at a time."""
        if worker.current is not None or not worker.waiting:
            return
        task_id, body, sent_ahead = worker.waiting.popleft()
        worker.current = task_id
        self.wire.backend.append([wid, EMPTY, MDP_WORKER_TAG, REQUEST, task_id.encode(), EMPTY,
                                  *(body or [EMPTY])])
        if sent_ahead:  # the core counts it as started from now on (a start entry in the worker's log)
            self._to_core(wid, Message(Command.DONE, {"log": [task_id]}), now)

    def _refuse(self, wid: bytes, task_id: str, error: str, now: float) -> None:
        """Fail a task that cannot be put into MDP frames, as if the worker had answered with the error."""
        record = DoneRecord(task_id, ok=False, value={"type": ErrorType.PROTOCOL, "message": error, "traceback": ""},
                            nframes=0, run_s=0.0)
        self._to_core(wid, Message(Command.DONE, {"log": [record]}), now)
