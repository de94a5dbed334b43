"""gridq-status: the live status console (``python -m client.console``), drawn from client/state.py."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import datetime

from rich import box
from rich.console import Console
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from broker.logs import add_logging_flags, configure_logging
from broker.protocol import DEFAULT_FRONTEND
from client.client import Client
from client.errors import GridqError
from client.state import DEFAULT_EVENTS, ClusterState

#: where a broker takes clients unless told otherwise
DEFAULT_BROKER = DEFAULT_FRONTEND
#: how long one status request waits before its one resend: short, so an unreachable broker shows quickly
CLIENT_TIMEOUT_S = 1.0
#: seconds between two redraws of the live view
REFRESH_S = 0.25
#: workers that stopped answering or left stay on screen this long
GONE_SHOWN_S = 120.0

_LINK_STYLE = {"live": "bold green", "connecting": "yellow", "resyncing": "yellow", "unreachable": "bold red"}
_WORKER_STYLE = {"ready": "green", "draining": "yellow", "lost": "red", "left": "dim"}


# ==================================================================== formatting


def fmt_s(seconds) -> str:
    """A duration for people: 850 µs, 12.3 ms, 1.25 s, 3m20s."""
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def fmt_qty(name: str, qty) -> str:
    if name.endswith("mem") and qty >= 1 << 20:  # bytes, such as gpu_mem
        return f"{qty / (1 << 30):.1f}G"
    return f"{qty:g}" if isinstance(qty, float) else str(qty)


def fmt_resources(free: dict | None, total: dict) -> str:
    """``cpu 1/2  gpu 0/1``: free of offered, per resource (or just the amounts where ``free`` is None)."""
    parts = []
    for name in sorted(total, key=lambda n: (n != "cpu", n)):
        if free is None:
            parts.append(f"{name} {fmt_qty(name, total[name])}")
        else:
            parts.append(f"{name} {fmt_qty(name, free.get(name, 0))}/{fmt_qty(name, total[name])}")
    return "  ".join(parts)


def fmt_clock(ts) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "–"


def _more(table: Table, hidden: int, columns: int) -> None:
    if hidden > 0:
        table.add_row(Text(f"… {hidden} more", style="dim italic"), *[""] * (columns - 1))


# ==================================================================== tables (shared by --once and the live view)


def summary_text(snap: dict, stats: dict | None = None) -> Text:
    text = Text()
    for label, key, style in (("queued", "queued", "cyan"), ("running", "running", "green"), ("done", "done", "blue"),
                              ("failed", "failed", "red"), ("cancelled", "cancelled", "dim")):
        text.append(f"{label} ", style="dim").append(f"{snap.get(key, 0):,}", style=f"bold {style}").append("   ")
    text.append("workers ", style="dim").append(str(len(snap.get("workers", ()))), style="bold")
    if stats:
        text.append("\n")
        text.append("throughput ", style="dim").append(f"{stats.get('rate', 0):,} tasks/s", style="bold")
        text.append("   queue wait p50/p99 ", style="dim")
        text.append(f"{fmt_s(stats.get('queued_p50_s'))} / {fmt_s(stats.get('queued_p99_s'))}", style="bold")
        text.append("   run p50/p99 ", style="dim")
        text.append(f"{fmt_s(stats.get('run_p50_s'))} / {fmt_s(stats.get('run_p99_s'))}", style="bold")
    return text


def workers_table(workers: list, gone: list = (), max_rows: int | None = None) -> Table | Text:
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    table.add_column("worker", no_wrap=True, overflow="ellipsis", ratio=3)
    table.add_column("state", no_wrap=True)
    table.add_column("slots", justify="right", no_wrap=True)
    table.add_column("resources free/total", no_wrap=True, overflow="ellipsis", ratio=4)
    table.add_column("tasks", justify="right", no_wrap=True)
    table.add_column("heartbeat", justify="right", no_wrap=True)
    rows = [(w, False) for w in sorted(workers, key=lambda w: w["name"])] + [(g, True) for g in gone]
    shown = rows if max_rows is None else rows[:max(max_rows, 1)]
    for w, is_gone in shown:
        state = w.get("state", "ready")
        if is_gone:
            table.add_row(Text(w["name"], style="dim"), Text(state, style=_WORKER_STYLE.get(state, "")),
                          Text(f"–/{w.get('slots', '?')}", style="dim"),
                          Text(fmt_resources(None, w.get("resources", {})), style="dim"),
                          Text(f"{w.get('tasks', 0):,}", style="dim"), Text(f"{state} {fmt_clock(w.get('ts'))}", style="dim"))
            continue
        busy = w["running"] >= w["slots"]
        age = w.get("heartbeat_age_s", 0.0)
        table.add_row(w["name"], Text(state, style=_WORKER_STYLE.get(state, "")),
                      Text(f"{w['running']}/{w['slots']}", style="bold yellow" if busy else "green"),
                      fmt_resources(w.get("free", {}), w.get("resources", {})), f"{w.get('tasks', 0):,}",
                      Text(fmt_s(age), style="red" if age > 3 else ""))
    if not rows:
        return Text("no workers connected", style="dim italic")
    _more(table, len(rows) - len(shown), 6)
    return table


def queues_table(queues: dict) -> Table | Text:
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    table.add_column("resource", no_wrap=True)
    table.add_column("queued", justify="right")
    for name in sorted(queues, key=lambda n: (-queues[n], n)):
        table.add_row(name, f"{queues[name]:,}")
    if not queues:
        return Text("nothing queued", style="dim italic")
    return table


def running_table(tasks: list, max_rows: int | None = None) -> Table | Text:
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    table.add_column("task", no_wrap=True, overflow="ellipsis", min_width=16)
    table.add_column("name", no_wrap=True, overflow="ellipsis", ratio=2)
    table.add_column("worker", no_wrap=True, overflow="ellipsis", ratio=2)
    table.add_column("try", justify="right", no_wrap=True)
    table.add_column("holds", no_wrap=True, overflow="ellipsis", ratio=2)
    table.add_column("for", justify="right", no_wrap=True)
    ordered = sorted(tasks, key=lambda t: -t.get("running_s", 0.0))  # the longest running first
    shown = ordered if max_rows is None else ordered[:max(max_rows, 1)]
    for t in shown:
        table.add_row(t["task_id"], t["name"], t["worker"], str(t["attempt"]),
                      fmt_resources(None, t.get("resources", {})), fmt_s(t.get("running_s")))
    if not tasks:
        return Text("nothing running", style="dim italic")
    _more(table, len(ordered) - len(shown), 6)
    return table


def failures_table(failures: list, max_rows: int | None = None) -> Table | Text:
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    table.add_column("at", no_wrap=True)
    table.add_column("task", no_wrap=True, overflow="ellipsis", min_width=16)
    table.add_column("name", no_wrap=True, overflow="ellipsis", ratio=1, min_width=6)
    table.add_column("worker", no_wrap=True, overflow="ellipsis", ratio=1, min_width=6)
    table.add_column("error", no_wrap=True, overflow="ellipsis", ratio=4)
    shown = failures if max_rows is None else failures[:max(max_rows, 1)]
    for f in shown:
        error = (f.get("error") or "").splitlines()[0] if f.get("error") else ""
        table.add_row(fmt_clock(f.get("ts")), f["task_id"], f["name"], f.get("worker") or "–", Text(error, style="red"))
    if not failures:
        return Text("no failures seen", style="dim italic")
    _more(table, len(failures) - len(shown), 5)
    return table


# ==================================================================== --once


def print_snapshot(snap: dict, console: Console, broker: str) -> None:
    """The snapshot as readable tables (``--once``)."""
    console.print(Text.assemble(("gridq ", "bold"), (f"broker {broker}   seq {snap.get('seq')}", "dim")))
    console.print(summary_text(snap))
    console.print(Panel(workers_table(snap.get("workers", [])), title="workers", title_align="left", box=box.ROUNDED))
    console.print(Panel(queues_table(snap.get("queues", {})), title="queues per resource", title_align="left",
                        box=box.ROUNDED))
    console.print(Panel(running_table(snap.get("running_tasks", [])), title="running tasks", title_align="left",
                        box=box.ROUNDED))


# ==================================================================== the live view


def header_text(view: dict, broker: str) -> Text:
    """Link state first: on a narrow screen the addresses are what gets cut."""
    link = view.get("link", "connecting")
    text = Text.assemble(("gridq ", "bold"), no_wrap=True, overflow="ellipsis")
    if link == "unreachable":
        text.append(f"broker unreachable, reconnecting (silent for {view.get('down_s') or 0:.0f} s)",
                    style=_LINK_STYLE[link])
    elif link == "live":
        text.append("● live", style=_LINK_STYLE[link]).append(f"  seq {view.get('seq')}", style="dim")
    else:
        text.append(f"◌ {link}", style=_LINK_STYLE.get(link, "")).append(f"  {view.get('reason') or ''}", style="dim")
    text.append(f"  broker {broker}  events {view.get('events')}", style="dim")
    text.append(f"  resyncs {view.get('resyncs', 0)}  gaps {view.get('gaps', 0)}  restarts {view.get('restarts', 0)}",
                style="dim")
    return text


def render(view: dict, broker: str = DEFAULT_BROKER, height: int = 40, now: float | None = None) -> Layout:
    """The whole screen for ``view`` (``ClusterState.view()``), fitted to ``height`` rows."""
    now = time.time() if now is None else now
    gone = [g for g in view.get("gone", ()) if not g.get("ts") or now - g["ts"] <= GONE_SHOWN_S]
    workers = view.get("workers", [])
    body = max(height - 6, 8)  # header (3) and summary (3) panels
    # the worker table grows with the cluster up to half of the body; running tasks and failures share the rest
    top = min(len(workers) + len(gone) + 5, max(body // 2, 7))
    bottom = body - top
    tables_rows = bottom // 2 - 5  # panel borders, the table's header and rule, a "more" line

    layout = Layout(name="root")
    layout.split_column(Layout(name="header", size=3), Layout(name="summary", size=4),
                        Layout(name="top", size=top), Layout(name="bottom"))
    layout["header"].update(Panel(header_text(view, broker), box=box.ROUNDED))
    layout["summary"].update(Panel(summary_text(view, view.get("stats") or {}), box=box.ROUNDED,
                                   title="cluster", title_align="left"))
    layout["top"].split_row(Layout(name="workers", ratio=3), Layout(name="queues", ratio=1))
    layout["workers"].update(Panel(workers_table(workers, gone, max_rows=top - 5), title=f"workers ({len(workers)})",
                                   title_align="left", box=box.ROUNDED))
    layout["queues"].update(Panel(queues_table(view.get("queues", {})), title="queues per resource",
                                  title_align="left", box=box.ROUNDED))
    layout["bottom"].split_column(Layout(name="running", ratio=1), Layout(name="failures", ratio=1))
    running = view.get("running_tasks", [])
    layout["running"].update(Panel(running_table(running, max_rows=tables_rows), title=f"running tasks ({len(running)})",
                                   title_align="left", box=box.ROUNDED))
    failures = view.get("failures", [])
    layout["failures"].update(Panel(failures_table(failures, max_rows=tables_rows), title="recent failures",
                                    title_align="left", box=box.ROUNDED))
    return layout


def run_live(state: ClusterState, console: Console, broker: str, refresh_s: float = REFRESH_S,
             refreshes: int | None = None) -> None:
    """Redraw from ``state`` until interrupted (or ``refreshes`` redraws, for tests)."""
    done = 0
    with Live(console=console, screen=console.is_terminal, auto_refresh=False, transient=False) as live:
        while refreshes is None or done < refreshes:
            live.update(render(state.view(), broker, console.size.height), refresh=True)
            done += 1
            time.sleep(refresh_s)


# ==================================================================== entry point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gridq-status", description="Watch a gridq cluster live.")
    p.add_argument("--broker", default=DEFAULT_BROKER, metavar="ADDR", help="broker frontend endpoint")
    p.add_argument("--events", default=DEFAULT_EVENTS, metavar="ADDR", help="broker event (PUB) endpoint")
    # --json prints exactly one snapshot and exits, so --once --json is the same request said twice
    p.add_argument("--once", action="store_true", help="print one snapshot as tables and exit")
    p.add_argument("--json", action="store_true",
                   help="print the Client.status() snapshot as JSON and exit (with or without --once)")
    p.add_argument("--broker-key", default=None, metavar="FILE", help="the broker's public CURVE key")
    p.add_argument("--curve-secret", default=None, metavar="FILE", help="this client's CURVE secret key file")
    p.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT_S, metavar="SECONDS",
                   help="how long one request waits for the broker before one resend")
    p.add_argument("--refresh", type=float, default=REFRESH_S, metavar="SECONDS", help="seconds between redraws")
    p.add_argument("--refreshes", type=int, default=None, help=argparse.SUPPRESS)  # tests: draw N times, then exit
    add_logging_flags(p)
    p.set_defaults(log_level=None)
    args = p.parse_args(argv)
    if args.timeout <= 0 or args.refresh <= 0:
        p.error("--timeout and --refresh must be > 0")
    return args


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    live = not (args.once or args.json)
    # log lines would tear the live screen: there, only errors (the screen itself shows an unreachable broker)
    configure_logging(args.log_format, args.log_level or ("error" if live else "warning"))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        client = Client(args.broker, timeout=args.timeout, retries=1, broker_key=args.broker_key,
                        secret=args.curve_secret)
    except (OSError, ValueError, RuntimeError, GridqError) as exc:  # unreadable key files, no CURVE, bad endpoint
        print(f"gridq-status: {exc}", file=sys.stderr)
        return 2
    try:
        if not live:
            try:
                snap = client.status()
            except (GridqError, TimeoutError) as exc:
                print(f"gridq-status: {exc}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(snap, indent=2))
            else:
                print_snapshot(snap, Console(), args.broker)
            return 0
        state = ClusterState(client, args.events).start()
        try:
            run_live(state, Console(), args.broker, args.refresh, args.refreshes)
        except KeyboardInterrupt:
            pass
        finally:
            state.close()
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
