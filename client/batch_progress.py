"""gridq-submit's progress: counts, rates, the slowest tasks, the display, and the count of running
tasks heard from the broker's events."""

from __future__ import annotations

import heapq
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from broker.protocol import ProtocolError, Topic, read_events
from client.batch_io import Job

#: how many of the slowest tasks the summary names
SLOWEST_SHOWN = 5
#: seconds between progress lines when stderr is not a terminal
PLAIN_PROGRESS_EVERY_S = 10.0
#: seconds of history behind the displayed rate and ETA
RATE_WINDOW_S = 10.0


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


def seconds_text(run_s: float) -> str:
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
                    events = read_events(body)
                except ProtocolError:
                    continue
                with self._lock:
                    for event in events:  # one message may carry several task.started events
                        if event.get("task_id") in self.in_flight:
                            self.started.add(event["task_id"])
        self._sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
