"""gridq-submit's files: a task line becomes a Job, a finished task a result line, and --resume
reads back what an earlier run finished."""

from __future__ import annotations

import base64
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.protocol import EncodeError, check_resources, pack_value
from client.client import Client, GridFuture
from client.errors import TaskError

#: fields a task line may have; anything else is a typo worth reporting
LINE_FIELDS = ("id", "task", "args", "kwargs", "resources", "priority", "timeout", "retries")
#: names a task's kwargs cannot use: Client.submit takes them for itself
RESERVED_KWARGS = frozenset(
    p.name for p in inspect.signature(Client.submit).parameters.values()
    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
#: longest id (as JSON text): the idempotency key built from it must fit the broker's name limit
MAX_ID_CHARS = 200
#: suffix of the file beside --out that keeps the run's idempotency-key prefix for --resume
RUN_FILE_SUFFIX = ".run"


class LineError(ValueError):
    """A task line that cannot be submitted; the message says why."""


@dataclass(slots=True)
class Job:
    """One good task line."""

    lineno: int
    id: object  #: the line's id, as written (str or int)
    id_text: str  #: json.dumps(id): tells 5 from "5", and is what --resume matches
    name: str
    args: list
    kwargs: dict
    options: dict  #: resources, priority, timeout, retries for Client.submit


# ==================================================================== input


def parse_line(raw: bytes | str, lineno: int) -> Job:
    """Turn one input line into a Job, or raise LineError saying what is wrong with it."""
    try:
        obj = json.loads(raw)
    except ValueError as exc:  # includes bad UTF-8
        raise LineError(f"bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LineError(f"a task line is a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(LINE_FIELDS))
    if unknown:
        raise LineError(f"unknown field(s) {', '.join(map(repr, unknown))}; a line may have {', '.join(LINE_FIELDS)}")
    if "id" not in obj:
        raise LineError('missing "id"')
    task_id = obj["id"]
    if isinstance(task_id, bool) or not isinstance(task_id, (str, int)):
        raise LineError(f'"id" must be a string or an integer, got {json.dumps(task_id)}')
    id_text = json.dumps(task_id, ensure_ascii=False)
    if len(id_text) > MAX_ID_CHARS:
        raise LineError(f'"id" is longer than {MAX_ID_CHARS} characters')
    if "task" not in obj:
        raise LineError('missing "task"')
    name = obj["task"]
    if not isinstance(name, str) or not name:
        raise LineError(f'"task" must be a non-empty string, got {json.dumps(name)}')
    args = obj.get("args", [])
    if not isinstance(args, list):
        raise LineError(f'"args" must be a list, got {type(args).__name__}')
    kwargs = obj.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise LineError(f'"kwargs" must be an object, got {type(kwargs).__name__}')
    clash = sorted(RESERVED_KWARGS & set(kwargs))
    if clash:
        raise LineError(f'"kwargs" cannot use {", ".join(map(repr, clash))}: the client takes those names itself')
    options = {}
    if obj.get("resources") is not None:
        try:
            options["resources"] = check_resources(obj["resources"])
        except ValueError as exc:
            raise LineError(f'"resources": {exc}') from None
    priority = obj.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise LineError(f'"priority" must be an integer, got {json.dumps(priority)}')
    options["priority"] = priority
    timeout = obj.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise LineError(f'"timeout" must be a positive number of seconds, got {json.dumps(timeout)}')
        options["timeout"] = timeout
    retries = obj.get("retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise LineError(f'"retries" must be a non-negative integer, got {json.dumps(retries)}')
        options["retries"] = retries
    try:
        pack_value([args, kwargs])  # what JSON can say but msgpack cannot (integers past 64 bits)
    except EncodeError as exc:
        raise LineError(f"arguments cannot be sent: {exc}") from None
    return Job(lineno, task_id, id_text, name, args, kwargs, options)


def count_lines(path: Path) -> int:
    """Lines in a file, read in chunks: the total for the progress bar, in a fraction of the run's time."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# ==================================================================== output


def to_json(value):
    """json.dumps fallback for what results hold beyond JSON: arrays become (nested) lists.

    numpy arrays -> lists (complex numbers as [real, imag]), numpy scalars -> numbers,
    bytes -> base64 text, tuples and sets -> lists; anything else -> its repr().
    """
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, complex):
        return [value.real, value.imag]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return repr(value)


def result_record(job: Job, future: GridFuture) -> dict:
    """The result line for a finished future: id, ok, result or error, info."""
    info = future.info or {}
    if future.cancelled():
        return {"id": job.id, "ok": False, "error": {"type": "CancelledError", "message": "task was cancelled",
                                                     "traceback": ""}, "info": info}
    exc = future.exception()
    if exc is None:
        return {"id": job.id, "ok": True, "result": future.result(), "info": info}
    if isinstance(exc, TaskError):
        error = {"type": exc.type, "message": exc.message, "traceback": exc.traceback}
    else:
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": ""}
    return {"id": job.id, "ok": False, "error": error, "info": info}


def dump_record(record: dict) -> str:
    try:
        return json.dumps(record, default=to_json, ensure_ascii=False)
    except (TypeError, ValueError):  # e.g. a dict keyed by something JSON has no key for
        return json.dumps({**record, "result": repr(record.get("result"))}, default=to_json, ensure_ascii=False)


def read_finished(out: Path) -> dict[str, bool]:
    """id_text -> ok for every complete line already in ``out``; cuts off a half-written last line."""
    finished: dict[str, bool] = {}
    good_end = 0
    with open(out, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the run was killed while writing this line
            good_end += len(raw)
            try:
                rec = json.loads(raw)
                finished[json.dumps(rec["id"], ensure_ascii=False)] = bool(rec.get("ok"))
            except (ValueError, KeyError, TypeError):
                continue
    if good_end != out.stat().st_size:
        os.truncate(out, good_end)
    return finished


def run_key(out: Path | None, resume: bool) -> tuple[str, bool]:
    """The run's key prefix, and whether it was found again; kept in OUT.run so --resume reuses it.

    Idempotency keys are broker-wide, so they carry a per-run prefix: two batch files
    that both number their lines 1..N must not share results, and a fresh run of the
    same file must run again rather than get the last run's results back.
    """
    side = None if out is None else out.with_name(out.name + RUN_FILE_SUFFIX)
    if resume and side is not None and side.exists():
        try:
            return str(json.loads(side.read_text())["run"]), True
        except (ValueError, KeyError, TypeError, OSError):
            pass
    token = os.urandom(8).hex()
    if side is not None:
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(json.dumps({"run": token, "created": time.time()}) + "\n")
        os.replace(tmp, side)
    return token, False
