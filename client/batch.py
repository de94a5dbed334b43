"""gridq-submit: run every task of a JSON-lines file through Client.stream, resumably, with progress."""

from __future__ import annotations

import argparse
import base64
import heapq
import inspect
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import msgpack
import numpy as np
import zmq

from broker.logs import configure_logging
from broker.protocol import DEFAULT_FRONTEND, EncodeError, Topic, check_resources, pack_value
from client.client import Client, GridFuture
from client.errors import BrokerUnavailable, TaskError

#: exit status: every line good and every task succeeded
EXIT_OK = 0
#: exit status: some line was malformed or some task failed (or the run was cut short)
EXIT_FAILED = 1
#: exit status: bad command line, unreadable input, or no broker answering
EXIT_USAGE = 2
#: exit status after SIGINT/SIGTERM (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130

#: fields a task line may have; anything else is a typo worth reporting
LINE_FIELDS = ("id", "task", "args", "kwargs", "resources", "priority", "timeout", "retries")
#: names a task's kwargs cannot use: Client.submit takes them for itself
RESERVED_KWARGS = frozenset(
    p.name for p in inspect.signature(Client.submit).parameters.values()
    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
#: longest id (as JSON text): the idempotency key built from it must fit the broker's name limit
MAX_ID_CHARS = 200
#: default bound on tasks submitted and not yet finished (and so on futures held in memory)
DEFAULT_MAX_IN_FLIGHT = 10_000
#: malformed lines / failed tasks reported one by one on stderr before the rest are only counted
MAX_REPORTED = 50
#: how many of the slowest tasks the summary names
SLOWEST_SHOWN = 5
#: seconds between progress lines when stderr is not a terminal
PLAIN_PROGRESS_EVERY_S = 10.0
#: seconds of history behind the displayed rate and ETA
RATE_WINDOW_S = 10.0
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


class _Submission(tuple):
    """``(name, args, kwargs, options)`` as Client.stream takes it, carrying its Job along."""

    job: Job
    task_id: str


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


# ==================================================================== progress


@dataclass
class Stats:
    """Counts for the progress display and the summary; written by the main thread."""

    total: int | None = None  #: input lines, where known
    blank: int = 0
    bad: int = 0
    skipped: int = 0  #: already in --out (resume)
    skipped_failed: int = 0  #: of those, ones that had failed
    submitted: int = 0
    done: int = 0
    failed: int = 0
    watcher: "StartedWatcher | None" = None  #: tells how many are running, where --events is given
    started_at: float = field(default_factory=time.monotonic)
    slowest: list = field(default_factory=list)  #: min-heap of (run_s, id_text, worker)
    _samples: deque = field(default_factory=deque)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def resolved(self) -> int:
        """Lines with a final outcome: the bar's position."""
        return self.finished + self.bad + self.skipped + self.blank

    def note_slow(self, job: Job, info: dict) -> None:
        run_s = info.get("run_s")
        if isinstance(run_s, (int, float)):
            item = (float(run_s), job.id_text, str(info.get("worker", "?")))
            if len(self.slowest) < SLOWEST_SHOWN:
                heapq.heappush(self.slowest, item)
            elif item > self.slowest[0]:
                heapq.heapreplace(self.slowest, item)

    def rate(self, now: float) -> float:
        """Tasks finished per second over the last RATE_WINDOW_S (called from one display thread)."""
        samples = self._samples
        if not samples:
            samples.append((self.started_at, 0))
        samples.append((now, self.finished))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW_S:
            samples.popleft()
        t0, n0 = samples[0]
        return (self.finished - n0) / (now - t0) if now - t0 > 0.5 else 0.0

    def line(self, now: float) -> str:
        rate = self.rate(now)
        parts = [f"{self.resolved}/{self.total}" if self.total is not None else f"{self.resolved}",
                 f"done {self.done}", f"failed {self.failed}"]
        in_flight = self.submitted - self.finished
        if self.watcher is not None:
            running = min(self.watcher.running, in_flight)
            parts += [f"running {running}", f"waiting {in_flight - running}"]
        else:
            parts.append(f"in flight {in_flight}")
        if self.bad:
            parts.append(f"bad {self.bad}")
        if self.skipped:
            parts.append(f"skipped {self.skipped}")
        parts.append(f"{rate:,.0f}/s")
        if self.total is not None:
            left = max(self.total - self.resolved, 0)
            parts.append("ETA " + (_duration(left / rate) if rate > 0 else "?") if left else "ETA 0s")
        return " · ".join(parts)


def _seconds(run_s: float) -> str:
    return f"{run_s * 1000:.1f} ms" if run_s < 1 else f"{run_s:.2f} s"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Display:
    """Progress on stderr: a rich bar on a terminal, else a plain line every PLAIN_PROGRESS_EVERY_S."""

    def __init__(self, stats: Stats, label: str, quiet: bool = False) -> None:
        from rich.console import Console

        self.stats = stats
        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal and not quiet
        self._last_update = 0.0
        self._stop = threading.Event()
        self._thread = None
        self._progress = None
        if self.live:
            from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.text import Text

            class CountsColumn(ProgressColumn):
                def render(_self, task):
                    return Text(stats.line(time.monotonic()))

            self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                      CountsColumn(), TimeElapsedColumn(), console=self.console,
                                      refresh_per_second=4)
            self._task = self._progress.add_task(label, total=stats.total)
        elif not quiet:
            self._thread = threading.Thread(target=self._plain, name="gridq-submit-progress", daemon=True)

    def start(self) -> None:
        if self._progress is not None:
            self._progress.start()
        elif self._thread is not None:
            self._thread.start()

    def tick(self, force: bool = False) -> None:
        """Move the bar; cheap enough to call per line (it updates at most ten times a second)."""
        if self._progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_update >= 0.1:
            self._last_update = now
            self._progress.update(self._task, completed=self.stats.resolved)

    def note(self, text: str) -> None:
        """A message above the bar (a bad line, a failed task)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def _plain(self) -> None:
        while not self._stop.wait(PLAIN_PROGRESS_EVERY_S):
            print(f"gridq-submit: {self.stats.line(time.monotonic())}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        if self._progress is not None:
            self.tick(force=True)
            self._progress.stop()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=1)


class StartedWatcher:
    """Counts this run's tasks that have started and not finished, from the broker's task.started events."""

    def __init__(self, address: str, ctx: zmq.Context, security=None) -> None:
        self.in_flight: set[str] = set()
        self.started: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = ctx.socket(zmq.SUB)
        self._sock.linger = 0
        if security is not None:  # the events socket has the same CURVE policy as the frontend
            security.apply_client(self._sock)
        self._sock.setsockopt(zmq.SUBSCRIBE, Topic.TASK_STARTED.encode())
        self._sock.connect(address)
        self._thread = threading.Thread(target=self._run, name="gridq-submit-events", daemon=True)
        self._thread.start()

    def submitted(self, task_id: str) -> None:
        with self._lock:
            self.in_flight.add(task_id)

    def finished(self, task_id: str) -> None:
        with self._lock:
            self.in_flight.discard(task_id)
            self.started.discard(task_id)

    @property
    def running(self) -> int:
        return len(self.started)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            while True:
                try:
                    _topic, body = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ValueError:
                    continue  # not two frames: not an event we understand
                try:
                    task_id = msgpack.unpackb(body, strict_map_key=False).get("task_id")
                except (ValueError, AttributeError, msgpack.UnpackException):
                    continue
                with self._lock:
                    if task_id in self.in_flight:
                        self.started.add(task_id)
        self._sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# ==================================================================== the run


class BatchRun:
    """One gridq-submit invocation: input lines in, result lines out, counts kept."""

    def __init__(self, args: argparse.Namespace, source: str, lines: IO[bytes], out: IO[str], key_prefix: str,
                 finished_before: dict[str, bool], stats: Stats, display: Display) -> None:
        self.args = args
        self.source = source
        self.lines = lines
        self.out = out
        self.key_prefix = key_prefix
        self.finished_before = finished_before
        self.stats = stats
        self.display = display
        self.seen: set[str] = set()  #: id_text of every line read: duplicates are errors
        self.watcher: StartedWatcher | None = None
        self._reported_bad = 0
        self._reported_failed = 0

    def submissions(self) -> Iterator[_Submission]:
        """Read the input lazily, reporting and skipping what cannot run; yields what Client.stream takes."""
        stats = self.stats
        for lineno, raw in enumerate(self.lines, 1):
            if not raw.strip():
                stats.blank += 1
                continue
            try:
                job = parse_line(raw, lineno)
                if job.id_text in self.seen:
                    raise LineError(f"duplicate id {job.id_text}")
                self.seen.add(job.id_text)
            except LineError as exc:
                stats.bad += 1
                self._report_bad(lineno, str(exc))
                self.display.tick()
                continue
            ok_before = self.finished_before.get(job.id_text)
            if ok_before is not None:
                stats.skipped += 1
                stats.skipped_failed += not ok_before
                self.display.tick()
                continue
            options = dict(job.options)
            options["key"] = f"batch:{self.key_prefix}:{job.id_text}"
            if "timeout" not in options and self.args.timeout is not None:
                options["timeout"] = self.args.timeout
            item = _Submission((job.name, job.args, job.kwargs, options))
            item.job = job
            yield item

    def on_submit(self, future: GridFuture, item: _Submission) -> None:
        item.task_id = future.task_id  # the future's own id may later become that of an earlier run's task
        future.batch_item = item
        self.stats.submitted += 1
        if self.watcher is not None:
            self.watcher.submitted(future.task_id)

    def on_finished(self, future: GridFuture) -> None:
        item: _Submission = future.batch_item
        job = item.job
        if self.watcher is not None:
            self.watcher.finished(item.task_id)
        record = result_record(job, future)
        self.out.write(dump_record(record) + "\n")
        self.out.flush()  # a killed run keeps every result it had
        if record["ok"]:
            self.stats.done += 1
        else:
            self.stats.failed += 1
            self._report_failed(job, record["error"])
        self.stats.note_slow(job, record["info"])
        self.display.tick()

    def _report_bad(self, lineno: int, message: str) -> None:
        self._reported_bad += 1
        if self._reported_bad <= MAX_REPORTED:
            self.display.note(f"{self.source}:{lineno}: skipped: {message}")
        elif self._reported_bad == MAX_REPORTED + 1:
            self.display.note(f"{self.source}: more malformed lines; only counting them from here")

    def _report_failed(self, job: Job, error: dict) -> None:
        self._reported_failed += 1
        if self._reported_failed <= MAX_REPORTED:
            self.display.note(f"{self.source}:{job.lineno}: task {job.id_text} failed: {error['type']}: "
                              f"{error['message']}")
        elif self._reported_failed == MAX_REPORTED + 1:
            self.display.note(f"{self.source}: more failed tasks; see the results for the rest")

    def run(self, client: Client) -> None:
        """Submit everything through Client.stream and write each result as it comes back."""
        stream = client.stream(None, self.submissions(), max_in_flight=self.args.max_in_flight,
                               on_submit=self.on_submit)
        try:
            for future in stream:
                if not future.cancelled() and isinstance(future.exception(), BrokerUnavailable):
                    raise future.exception()  # not the task's failure: leave it for --resume
                self.on_finished(future)
        finally:
            stream.close()


def summary(stats: Stats, wall_s: float, out_name: str, interrupted: str | None) -> list[str]:
    """The closing report: counts, wall time, throughput, the slowest tasks, and what an interruption left."""
    rate = stats.finished / wall_s if wall_s > 0 else 0.0
    lines = [f"gridq-submit: {stats.finished} tasks in {wall_s:.1f} s ({rate:,.0f} tasks/s): "
             f"{stats.done} succeeded, {stats.failed} failed"]
    extra = [f"{stats.bad} malformed line{'s' if stats.bad != 1 else ''} skipped"]
    if stats.skipped:
        extra.append(f"{stats.skipped} already in {out_name}"
                     + (f" ({stats.skipped_failed} of them failed)" if stats.skipped_failed else ""))
    lines.append("  " + "; ".join(extra))
    if stats.slowest:
        slow = sorted(stats.slowest, reverse=True)
        lines.append("  slowest: " + ", ".join(f"id {i} {_seconds(s)} on {w}" for s, i, w in slow))
    if interrupted:
        left = stats.submitted - stats.finished
        lines.append(f"  {interrupted}: {left} submitted task{'s' if left != 1 else ''} without a result here"
                     + ("; rerun with --resume to collect them without running them again" if out_name != "stdout"
                        else ""))
    return lines


# ==================================================================== command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gridq-submit",
        description="Run one gridq task per line of a JSON-lines file and write one result line per task.",
        epilog='A line: {"id": 1, "task": "square", "args": [7], "kwargs": {}, "resources": {"cpu": 1}, '
               '"priority": 0} (only "id" and "task" are required; "timeout" and "retries" are allowed too). '
               "Exit status: 0 when every line was good and every task succeeded, 1 otherwise, "
               "2 for usage errors or no broker, 130 when interrupted.")
    p.add_argument("file", metavar="FILE.jsonl", help="task lines; - reads standard input")
    p.add_argument("--broker", default=DEFAULT_FRONTEND, metavar="ADDR", help="broker frontend")
    p.add_argument("--out", default=None, metavar="RESULTS.jsonl",
                   help="result lines go here (standard output when absent); replaced unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="keep --out, skip the ids it already has, resubmit the rest under the same keys")
    p.add_argument("--events", default=None, metavar="ADDR",
                   help="broker events endpoint: shows how many of this run's tasks are running")
    p.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, metavar="N",
                   help=f"tasks submitted and not yet finished, at most [{DEFAULT_MAX_IN_FLIGHT}]")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="per-task time limit once running (a line's own \"timeout\" wins)")
    p.add_argument("--quiet", action="store_true", help="no progress, only problems and the summary")
    p.add_argument("--broker-key", default=None, metavar="FILE", help="the broker's public CURVE key")
    p.add_argument("--curve-secret", default=None, metavar="FILE", help="this client's CURVE key pair (secret file)")
    args = p.parse_args(argv)
    if args.max_in_flight < 1:
        p.error("--max-in-flight must be at least 1")
    if args.timeout is not None and not args.timeout > 0:
        p.error("--timeout must be a positive number of seconds")
    if args.resume and args.out is None:
        p.error("--resume needs --out: the results file is what it resumes from")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _err(text: str) -> None:
    print(f"gridq-submit: {text}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("console", "warning")  # the client's own log lines, on stderr, only when they matter
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        client = Client(args.broker, broker_key=args.broker_key, secret=args.curve_secret)
    except (OSError, ValueError) as exc:
        _err(f"cannot use the CURVE keys: {exc}")
        return 2
    try:
        return _main(args, client)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    finally:
        client.close()


def _main(args: argparse.Namespace, client: Client) -> int:
    total = None
    if args.file != "-":
        try:
            total = count_lines(Path(args.file))
        except OSError as exc:
            _err(f"cannot read {args.file}: {exc.strerror or exc}")
            return EXIT_USAGE
    try:
        snapshot = client.status()  # before touching --out: no broker, nothing changed
    except BrokerUnavailable as exc:
        _err(str(exc))
        return EXIT_USAGE
    if not snapshot.get("workers"):
        _err("no workers are connected yet: tasks wait for one")

    out_path = None if args.out is None else Path(args.out)
    finished_before: dict[str, bool] = {}
    try:
        if args.resume and out_path.exists():
            finished_before = read_finished(out_path)
        key_prefix, found = run_key(out_path, args.resume)
        if args.resume and finished_before and not found:
            _err(f"no {out_path.name}{RUN_FILE_SUFFIX} beside the results: tasks the interrupted run had submitted "
                 "but not finished will run again")
        out = sys.stdout if out_path is None else open(out_path, "a" if args.resume else "w", encoding="utf-8")
    except OSError as exc:
        _err(f"cannot write {args.out}: {exc.strerror or exc}")
        return EXIT_USAGE
    try:
        lines = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as exc:
        _err(f"cannot read {args.file}: {exc.strerror or exc}")
        return EXIT_USAGE

    source = "<stdin>" if args.file == "-" else args.file
    stats = Stats(total=total)
    display = Display(stats, "stdin" if args.file == "-" else Path(args.file).name, quiet=args.quiet)
    run = BatchRun(args, source, lines, out, key_prefix, finished_before, stats, display)
    if args.events:
        run.watcher = stats.watcher = StartedWatcher(args.events, zmq.Context.instance(), client._security)
    interrupted = None
    started = time.monotonic()
    display.start()
    try:
        run.run(client)
    except BrokerUnavailable as exc:
        interrupted = f"broker lost ({exc})"
    except KeyboardInterrupt:
        interrupted = "interrupted"
    except BrokenPipeError:
        interrupted = "output closed"
    finally:
        display.stop()
        if run.watcher is not None:
            run.watcher.close()
        if lines is not sys.stdin.buffer:
            lines.close()
        if out is not sys.stdout:
            out.close()
    for text in summary(stats, time.monotonic() - started, out_path.name if out_path else "stdout", interrupted):
        print(text, file=sys.stderr, flush=True)
    if interrupted == "interrupted":
        return EXIT_INTERRUPTED
    if interrupted is not None and interrupted.startswith("broker"):
        return EXIT_USAGE
    if interrupted is not None or stats.bad or stats.failed or stats.skipped_failed:
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
