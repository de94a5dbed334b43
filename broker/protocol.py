"""The wire contract of gridq: commands, headers, array frames, encode() and decode().

Every gridq message is a list of ZeroMQ frames:

    [protocol tag, command, header, *payload]

- protocol tag: ``CLIENT_TAG`` (frontend) or ``WORKER_TAG`` (backend), so that
  Majordomo traffic (``MDPC01``/``MDPW01``) on the same sockets is told apart;
- command: one byte, a ``Command``;
- header: one msgpack map;
- payload: zero or more raw frames holding numpy array bytes, referenced from
  msgpack blobs by index. The broker never decodes them: it forwards the frames.

Values (task arguments, results) are packed into an opaque msgpack *blob* plus
their own array frames (``pack_value``/``unpack_value``). The broker carries the
blob and frames of a task as they are. Nothing is pickled.

This module imports nothing else of gridq but ``broker.fields`` (its fields' rules) and
``broker.values`` (values as blobs and frames), which it re-exports: clients and workers import it too.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import msgpack
import msgspec

from broker.fields import (DEFAULT_RESOURCES, MAX_BACKOFF_S, MAX_NAME_LEN, MAX_RESOURCE_QTY,  # noqa: F401  (the
                           MAX_RETRIES, MAX_RETRY_ON, check_int, check_name, check_resources,  # field rules are
                           check_seconds, error_map, retry_names)  # part of the vocabulary: re-exported)
from broker.values import ARRAY_EXT, EncodeError, ProtocolError, frame_buffer, pack_value, unpack_value  # noqa: F401

#: Where a broker listens unless told otherwise: clients (ROUTER), workers (ROUTER), events (XPUB).
DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
DEFAULT_EVENTS = "tcp://127.0.0.1:5557"

#: First frame of a gridq client message (after the REQ/DEALER empty delimiter).
CLIENT_TAG = b"GQC1"
#: First frame of a gridq worker message.
WORKER_TAG = b"GQW1"
#: Majordomo 0.1 client and worker tags (RFC 7/MDP), served beside gridq's own.
MDP_CLIENT_TAG = b"MDPC01"
MDP_WORKER_TAG = b"MDPW01"

#: Largest header we accept; headers carry task records, never array bytes.
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Most payload frames one message may carry.
MAX_FRAMES = 100_000
#: start of a DISCONNECT reason that tells a worker to stop for good: its --name is taken
NAME_IN_USE = "worker name in use"
#: start of a DISCONNECT reason (to a worker) or an ERROR (to a client) that says the peer
#: dialled the other role's socket; the peer reports it and stops at once
WRONG_PORT = "wrong port"
#: SUBMIT header key of a FETCH header sent in the same message; the broker handles it right
#: after the SUBMIT, as if it were the next message (one message fewer per lone round trip)
FETCH_IN_SUBMIT = "fetch"
#: SUBMIT header key (milliseconds): the broker may hold this SUBMIT's ACCEPTED that long and send it
#: inside the RESULTS answering the FETCH that came with it, where those come sooner (a lone round
#: trip then costs one reply, not two). A SUBMIT with a task refused, aliased or in conflict is
#: answered at once
DEFER_ACCEPTED = "defer_ms"
#: longest a broker holds an ACCEPTED, whatever a client asks
MAX_DEFER_ACCEPTED_MS = 50
#: RESULTS header key: the header of an ACCEPTED the broker held (its own ``rid``, that of the SUBMIT)
ACCEPTED_IN_RESULTS = "accepted"
#: gridq's top-level import names (a user's module named so shadows gridq's, or is shadowed)
OUR_PACKAGES = ("broker", "worker", "client")


class Topic:
    """Event topics on the broker's events socket; every event map also carries ``seq`` and ``ts``."""

    TASK_SUBMITTED = "task.submitted"  #: task_id, name, resources, priority
    TASK_STARTED = "task.started"  #: task_id, name, worker, attempt, resources
    TASK_SUCCEEDED = "task.succeeded"  #: task_id, name, worker, run_s
    TASK_FAILED = "task.failed"  #: task_id, name, worker, error, error_type, resources
    TASK_RETRIED = "task.retried"  #: task_id, name, reason
    TASK_CANCELLED = "task.cancelled"  #: task_id, name, resources
    WORKER_JOINED = "worker.joined"  #: worker, resources, slots, tasks
    WORKER_LOST = "worker.lost"  #: worker, requeued
    WORKER_LEFT = "worker.left"  #: worker
    BROKER_STATS = "broker.stats"  #: counters, rate, percentiles, per_worker, queues (about once a second)
    ALL = (TASK_SUBMITTED, TASK_STARTED, TASK_SUCCEEDED, TASK_FAILED, TASK_RETRIED, TASK_CANCELLED,
           WORKER_JOINED, WORKER_LOST, WORKER_LEFT, BROKER_STATS)


class ErrorType:
    """``type`` of the error map of a failed task, set by the broker; a task that raised carries
    its exception's class name instead."""

    TASK_ERROR = "TaskError"  #: a worker reported a failure without an error map
    TASK_LOST = "TaskLost"  #: its worker died more often than its retries allow
    TASK_TIMEOUT = "TaskTimeout"  #: it ran past its timeout_s
    NO_WORKER = "NoWorkerAvailable"  #: no connected worker could serve it for --no-worker-timeout
    PROTOCOL = "ProtocolError"  #: it cannot travel to the worker that took it (an MDP worker: frames only)
    KEY_CONFLICT = "KeyConflict"  #: its idempotency key belongs to a task of another name or arguments


class Command(enum.IntEnum):
    """Commands, one byte on the wire. C: client, B: broker, W: worker."""

    # client <-> broker (frontend)
    SUBMIT = 1  #: C->B tasks to accept; answered by ACCEPTED
    ACCEPTED = 2  #: B->C which submitted tasks are durable, and under which id
    FETCH = 3  #: C->B acknowledge delivered results, wait for new ones
    RESULTS = 4  #: B->C finished tasks of the session (B->W never)
    CANCEL = 5  #: C->B cancel queued tasks of the session; answered by CANCELLED
    CANCELLED = 6  #: B->C which ids were cancelled
    STATUS = 7  #: C->B ask for a snapshot; answered by SNAPSHOT
    SNAPSHOT = 8  #: B->C cluster snapshot with the event seq it includes
    ERROR = 9  #: B->C the request was refused; header["error"] says why
    # worker <-> broker (backend)
    READY = 20  #: W->B announce capabilities (join or rejoin)
    TASKS = 21  #: B->W tasks to run, a batch
    DONE = 22  #: W->B finished tasks, a batch of results
    HEARTBEAT = 23  #: both ways, proof of life
    DISCONNECT = 24  #: W->B leaving (hands back held tasks); B->W stop or re-announce
    RETURN = 25  #: W->B tasks handed back unstarted (graceful stop)
    KILL = 26  #: B->W stop these tasks where they run (past their timeout, or cancelled with terminate)


_COMMAND_BYTES = {c: bytes([c]) for c in Command}
_BYTES_COMMAND = {bytes([c]): c for c in Command}

@dataclass(slots=True)
class Message:
    """One decoded gridq message: a command, its header map and payload frames."""

    command: Command
    header: dict = field(default_factory=dict)
    frames: list = field(default_factory=list)
    #: the header's typed records, each with its payload frames, once ``records()`` read them
    typed: list | None = None


def encode(tag: bytes, message: Message) -> list:
    """Frames for ``message`` (without any routing envelope)."""
    return [tag, _COMMAND_BYTES[message.command], msgpack.packb(message.header), *message.frames]


def decode(frames: Sequence, tag: bytes) -> Message:
    """Parse frames that start at the protocol tag; any bad input -> ProtocolError.

    Frames may be ``bytes`` or ``zmq.Frame``; payload frames are kept as given,
    so array bytes are never copied here.
    """
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames (tag, command, header), got {len(frames)}")
    if len(frames) - 3 > MAX_FRAMES:
        raise ProtocolError(f"too many payload frames: {len(frames) - 3} > {MAX_FRAMES}")
    if as_bytes(frames[0]) != tag:
        raise ProtocolError(f"unknown protocol tag {as_bytes(frames[0])[:16]!r}, expected {tag!r}")
    command = _BYTES_COMMAND.get(as_bytes(frames[1]))
    if command is None:
        raise ProtocolError(f"unknown command {as_bytes(frames[1])[:8]!r}")
    raw = as_bytes(frames[2])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return Message(command, header, list(frames[3:]))


#: packs event bodies: msgspec's encoder, reused (an event map in ~0.6 us against msgpack's ~1.6; the
#: broker's event Structs, broker/events.py, as the same map in ~0.25 us)
_pack_event = msgspec.msgpack.Encoder().encode


def event_body(events: list, pack=_pack_event) -> bytes:
    """The second frame of an event message: one event's map, or an array of several of one topic
    (maps, or the broker's event Structs, which encode as the same maps)."""
    return pack(events[0] if len(events) == 1 else events)


#: decodes and checks an event body in one call, at half msgpack.unpackb's cost (a subscriber's main cost per event)
_event_body = msgspec.msgpack.Decoder(dict | list[dict]).decode


def read_events(body) -> list[dict]:
    """The events in an event message's second frame (a map, or an array of maps, in seq order)."""
    try:
        value = _event_body(body)
    except msgspec.DecodeError as exc:  # not msgpack, or neither a map nor an array of maps
        raise ProtocolError(f"an event body is a msgpack map or an array of maps: {exc}") from None
    return [value] if type(value) is dict else value


def as_bytes(frame) -> bytes:
    """A frame's bytes (``bytes`` as is, a ``zmq.Frame`` copied out)."""
    if isinstance(frame, bytes):
        return frame
    return frame.bytes  # zmq.Frame


def task_digest(name: str, args: bytes, frames: Sequence) -> bytes:
    """What an idempotency key stands for: a task's name and its arguments (blob and arrays)."""
    h = hashlib.blake2b(name.encode(), digest_size=16)
    h.update(b"\0")
    h.update(args)
    for frame in frames:
        h.update(frame_buffer(frame))
    return h.digest()


def hold(free: dict, needs: dict, sign: int) -> None:
    """Take (sign -1) or give back (+1) ``needs`` from ``free``, rounded to 9 decimals:
    fractional quantities (0.1 + 0.2 ...) would otherwise drift with every hold until a
    task needing the whole resource never fits again."""
    for res, qty in needs.items():
        have = free.get(res, 0)
        if type(qty) is int and type(have) is int:  # the usual whole slots: nothing to round
            free[res] = have + sign * qty
        else:
            free[res] = round(have + sign * qty, 9)


# --------------------------------------------------------------------- records
# Records travel in lists inside headers, not maps: a batch of thousands of tasks is
# decoded on the hot path. Each is a NamedTuple, so it packs as that list as it is
# (writing one costs nothing) and every reader uses names. ``records(message)`` is how
# they are read: it checks their shape once, pairs each with its own payload frames and
# keeps the result in ``Message.typed``; a field's meaning is checked by its reader
# (``SubmitRecord.checked``), so one bad task is refused alone, not its whole batch.


new_record = tuple.__new__  #: a record from a sequence of all its fields, at the cost of a plain tuple


class SubmitRecord(NamedTuple):
    """SUBMIT header["tasks"] item: one task a client asks the broker to accept."""

    task_id: str
    name: str
    args: bytes  #: msgpack blob of ``[args, kwargs]``
    nframes: int  #: payload frames the blob references
    resources: dict | None  #: overrides what the task's @task declares
    priority: int
    retries: int | None  #: None: the broker's --max-retries
    timeout_s: float | None
    key: str | None  #: idempotency key
    #: exception type names after which the task runs again (within retries); may be left off
    retry_on: list | None = None
    backoff_s: float | None = None  #: first wait before such a run, doubling; may be left off

    def checked(self, default_retries: int) -> SubmitRecord:
        """This record with its fields validated (ValueError: the task is rejected, not the batch)."""
        task_id, name, args, nframes, resources, priority, retries, timeout_s, key, retry_on, backoff_s = self
        if not isinstance(args, bytes):
            raise ValueError("args must be a msgpack blob (bytes)")
        # the usual task (names, priority 0, nothing optional) passes with a few type checks
        if not (type(task_id) is str and 0 < len(task_id) <= MAX_NAME_LEN):
            check_name(task_id, "task_id")
        if not (type(name) is str and 0 < len(name) <= MAX_NAME_LEN):
            check_name(name, "task name")
        if priority != 0 or type(priority) is not int:
            check_int(priority, "priority", -(2**31), 2**31)
        return new_record(SubmitRecord, (  # as SubmitRecord(...) does, without its keyword handling
            task_id, name, args, nframes, None if resources is None else check_resources(resources), priority,
            default_retries if retries is None else check_int(retries, "retries", 0, MAX_RETRIES),
            None if timeout_s is None else check_seconds(timeout_s, "timeout"),
            None if key is None else check_name(key, "key"), () if retry_on is None else tuple(retry_names(retry_on)),
            None if backoff_s is None else check_seconds(backoff_s, "backoff", MAX_BACKOFF_S, zero=True)))


class DispatchRecord(NamedTuple):
    """TASKS header["tasks"] item: one task for a worker to run."""

    task_id: str
    name: str
    args: bytes
    nframes: int
    attempt: int
    needs: dict | None  #: resources the broker holds for it on this worker
    ahead: bool  #: sent before a slot is free: report its start in the DONE log


class DoneRecord(NamedTuple):
    """DONE header["log"] item that is a list; a plain string item is the id of a task sent
    ``ahead`` that just started."""

    task_id: str
    ok: bool | str  #: True, False, or LOST: the child process running it died (retry it elsewhere)
    value: Any  #: result blob, or an error map when not ok
    nframes: int
    run_s: float


#: DoneRecord ``ok`` of a task whose process slot died under it
LOST = "lost"


class ResultRecord(NamedTuple):
    """RESULTS header["results"] item."""

    task_id: str
    status: str  #: a TaskState value
    value: Any  #: result blob, error map, or None once acknowledged
    nframes: int
    info: dict  #: worker, attempts, queued_s, run_s


#: field names, as they are on the wire
SUBMIT_FIELDS = SubmitRecord._fields
DISPATCH_FIELDS = DispatchRecord._fields
DONE_FIELDS = DoneRecord._fields
RESULT_FIELDS = ResultRecord._fields

#: command -> (header key of its record list, record type); DONE also reads "results", its older key
_RECORDS = {
    Command.SUBMIT: ("tasks", SubmitRecord),
    Command.TASKS: ("tasks", DispatchRecord),
    Command.DONE: ("log", DoneRecord),
    Command.RESULTS: ("results", ResultRecord),
}


#: record type -> {number of fields a record may have: the defaults of the ones it leaves off}
_PADS = {kind: {len(kind._fields) - i: list(kind._field_defaults.values())[len(kind._field_defaults) - i:]
                for i in range(len(kind._field_defaults) + 1)} for _, kind in _RECORDS.values()}


def records(message: Message) -> list:
    """``message``'s records, each as ``(record, its payload frames)`` (a started id in a DONE log
    stays a string). ProtocolError where their shape is wrong; commands without records get []."""
    if message.typed is None:
        message.typed = _parse_records(message)
    return message.typed


def _parse_records(message: Message) -> list:
    spec = _RECORDS.get(message.command)
    if spec is None:
        return []
    key, kind = spec
    items = message.header.get(key)
    if items is None and kind is DoneRecord:
        items = message.header.get("results")
    if not isinstance(items, list):
        raise ProtocolError(f"{message.command.name} needs a list {key!r}")
    make, strings, pads = new_record, kind is DoneRecord, _PADS[kind]
    typed = []
    for item in items:
        if type(item) is list and (pad := pads.get(len(item))) is not None:  # the usual record: a list
            typed.append(make(kind, item + pad if pad else item))
        elif strings and type(item) is str:
            typed.append(item)
        else:
            typed.append(make(kind, _padded(message.command, kind, item)))
    counts = [r[3] for r in typed if type(r) is not str] if strings else [r[3] for r in typed]  # nframes
    if len(set(map(type, counts)) - {int}) or (counts and min(counts) < 0):
        raise ProtocolError("nframes must be a non-negative integer")
    if not message.frames and not any(counts):  # the common case: no arrays travel
        return [item if type(item) is str else (item, []) for item in typed]
    per_record = iter(split_frames(message.frames, counts))
    return [item if type(item) is str else (item, next(per_record)) for item in typed]


def _padded(command: Command, kind, item) -> tuple:
    """A record that left off trailing fields, with their defaults; ProtocolError where ``item``
    is no record of ``kind`` at all."""
    pad = _PADS[kind].get(len(item)) if isinstance(item, (list, tuple)) else None
    if pad is None:
        optional = len(kind._field_defaults)
        raise ProtocolError(f"each {command.name} record is a list of {len(kind._fields)} fields {kind._fields}"
                            + (f" (the last {optional} may be left off)" if optional else ""))
    return (*item, *pad) if pad else item


def split_frames(frames: list, counts: Sequence[int]) -> list[list]:
    """Cut a message's payload into consecutive per-record slices of ``counts``."""
    if any(n < 0 for n in counts) or sum(counts) != len(frames):
        raise ProtocolError(f"records reference {sum(counts)} frames, message has {len(frames)}")
    out, start = [], 0
    for n in counts:
        out.append(frames[start : start + n])
        start += n
    return out
