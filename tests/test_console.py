"""gridq-status: --once and --json against a live cluster, the live view drawn from a real state, no hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from broker.protocol import Command, Message
from client.console import fmt_s, render
from client.state import ClusterState
from tests.conftest import ROOT, silent_endpoints, wait_until
from tests.harness import Harness


def gridq_status(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "LINES": "40"}
    return subprocess.run([sys.executable, "-m", "client.console", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture
def busy(cluster):
    cluster.start_broker()
    cluster.start_worker("--slots", "2", "--name", "alpha")
    cluster.start_worker("--slots", "1", "--name", "beta", "--resources", "gpu=1")
    cluster.wait_workers(2)
    with cluster.client() as c:
        c.map("square", range(200))
        c.submit("sleep", 60)  # one task stays running
        wait_until(lambda: c.status()["running"] == 1, 10, what="the sleep to start")
    return cluster


@pytest.mark.parametrize("flags", [("--json",), ("--once", "--json")], ids=["json", "once-json"])
def test_json_prints_exactly_the_client_status_snapshot_with_or_without_once(busy, flags):
    out = gridq_status("--broker", busy.frontend, *flags)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    with busy.client() as c:
        snap = c.status()
    assert set(printed) == set(snap)
    assert {"seq", "workers", "queued", "running", "done", "failed"} <= set(printed)
    assert printed["done"] == snap["done"] == 200 and printed["running"] == 1
    assert sorted(w["name"] for w in printed["workers"]) == ["alpha", "beta"]
    for w in printed["workers"]:
        assert {"name", "resources", "free", "slots", "running", "tasks", "heartbeat_age_s"} <= set(w)


def test_once_prints_the_snapshot_as_readable_tables(busy):
    out = gridq_status("--broker", busy.frontend, "--once")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("workers", "queues per resource", "running tasks", "alpha", "beta", "gpu 1/1", "sleep",
                     "done 200", "running 1"):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_once_and_json_fail_fast_and_clearly_without_a_broker():
    with silent_endpoints() as [dead]:
        for flag in ("--once", "--json"):
            out = gridq_status("--broker", dead, flag, "--timeout", "0.3", timeout=30)  # a hang raises TimeoutExpired
            assert out.returncode == 1 and out.stdout == ""
            assert "did not answer" in out.stderr


def test_the_live_view_runs_for_a_few_refreshes_against_a_busy_cluster(busy):
    out = gridq_status("--broker", busy.frontend, "--events", busy.events, "--refreshes", "12", "--refresh", "0.25")
    assert out.returncode == 0, out.stderr
    for expected in ("workers (2)", "alpha", "beta", "running tasks (1)", "sleep", "throughput", "● live"):
        assert expected in out.stdout, f"{expected!r} missing from:\n{out.stdout}"


def test_the_live_view_without_a_broker_says_it_is_reconnecting():
    with silent_endpoints(2) as (broker, events):
        out = gridq_status("--broker", broker, "--events", events, "--timeout", "0.2", "--refreshes", "16",
                           "--refresh", "0.25")
    assert out.returncode == 0, out.stderr
    assert "broker unreachable, reconnecting" in out.stdout


def _state_of_a_busy_core() -> ClusterState:
    h = Harness()
    h.join(b"w1", slots=2, resources={"gpu": 1}, name="alpha")
    state = ClusterState(None, clock=lambda: h.now)
    state.load(h.core.snapshot(h.now))
    done, bad = h.submit("square", 3), h.submit("square", 4)
    h.done(b"w1", done, 9)
    h.done(b"w1", bad, ok=False)
    running = h.submit("sleep", 30, resources={"cpu": 1, "gpu": 1})
    h.submit("noop", resources={"cpu": 1, "gpu": 1})  # waits for the GPU
    for topic, fields in h.events:
        state.receive(topic, fields)
    seen = len(h.events)
    h.now += 2.0
    h.core.on_worker(b"w1", Message(Command.HEARTBEAT, {}), h.now)
    h.tick(0)
    for topic, fields in h.events[seen:]:
        state.receive(topic, fields)
    assert not state.stale and running in state.running
    return state


def test_render_draws_every_panel_from_a_state():
    state = _state_of_a_busy_core()
    console = Console(record=True, width=120, height=40, color_system=None)
    console.print(render(state.view(), "tcp://127.0.0.1:5555", height=40))
    text = console.export_text()
    for expected in ("● live", "workers (1)", "alpha", "1/2", "cpu 1/2  gpu 0/1", "queues per resource", "gpu",
                     "running tasks (1)", "sleep", "cpu 1  gpu 1", "2.00 s", "recent failures", "ValueError: boom",
                     "done 1", "failed 1", "queued 1"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert len(text.splitlines()) == 40  # exactly the screen: no scrolling, no flicker


def test_render_shows_an_unreachable_broker_and_fits_tiny_screens():
    view = {**_state_of_a_busy_core().view(), "link": "unreachable", "down_s": 4.0}
    for width, height in ((120, 40), (60, 12)):
        console = Console(record=True, width=width, height=height, color_system=None)
        console.print(render(view, height=height))
        text = console.export_text()
        assert "broker unreachable" in text
        assert len(text.splitlines()) == height


@pytest.mark.parametrize("seconds,text", [(None, "–"), (4e-6, "4 µs"), (0.0123, "12.3 ms"), (1.5, "1.50 s"),
                                          (200, "3m20s"), (7300, "2h01m")])
def test_durations_read_well(seconds, text):
    assert fmt_s(seconds) == text
