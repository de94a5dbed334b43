"""gridq-submit: run every task of a JSON-lines file through Client.stream, resumably, with progress."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import zmq

from broker.logs import configure_logging
from broker.protocol import DEFAULT_FRONTEND
from client.batch_io import (RUN_FILE_SUFFIX, Job, LineError, count_lines, dump_record, parse_line, read_finished,
                             result_record, run_key)
from client.batch_progress import Display, StartedWatcher, Stats, seconds_text
from client.client import Client, GridFuture
from client.errors import BrokerUnavailable

#: exit status: every line good and every task succeeded
EXIT_OK = 0
#: exit status: some line was malformed or some task failed (or the run was cut short)
EXIT_FAILED = 1
#: exit status: bad command line, unreadable input, or no broker answering
EXIT_USAGE = 2
#: exit status after SIGINT/SIGTERM (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130

#: default bound on tasks submitted and not yet finished (and so on futures held in memory)
DEFAULT_MAX_IN_FLIGHT = 10_000
#: malformed lines / failed tasks reported one by one on stderr before the rest are only counted
MAX_REPORTED = 50


class _Submission(tuple):
    """``(name, args, kwargs, options)`` as Client.stream takes it, carrying its Job along."""

    job: Job
    task_id: str


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
        lines.append("  slowest: " + ", ".join(f"id {i} {seconds_text(s)} on {w}" for s, i, w in slow))
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
