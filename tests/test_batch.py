"""gridq-submit against real broker and worker processes: bad lines, failures, stdin, resume after kill -9, memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from client.batch_io import LineError, parse_line, to_json
from tests.conftest import wait_until

#: generous deadline for one tool run; a run that needs it has hung
RUN_DEADLINE_S = 120


def submit_cmd(cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "client.batch", *args, "--broker", cluster.frontend]


def run_submit(cluster, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(submit_cmd(cluster, *args), input=stdin, capture_output=True, env=cluster.env,
                          cwd=cluster.tmp_path, timeout=RUN_DEADLINE_S)


def write_lines(path: Path, lines) -> Path:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def running(cluster):
    cluster.start_broker("--no-worker-timeout", "1.5")
    cluster.start_worker("--slots", "2")
    cluster.wait_workers(1)
    return cluster


# ---------------------------------------------------------------- lines, without a cluster

@pytest.mark.parametrize("raw, why", [
    ("{not json", "bad JSON"),
    ("[1, 2]", "JSON object"),
    ('{"task": "noop"}', 'missing "id"'),
    ('{"id": 1}', 'missing "task"'),
    ('{"id": 1, "task": "echo", "args": 3}', '"args" must be a list'),
    ('{"id": 1, "task": "echo", "kwargs": []}', '"kwargs" must be an object'),
    ('{"id": 1, "task": "echo", "kwargs": {"priority": 1}}', "'priority'"),
    ('{"id": 1, "task": "echo", "priority": "high"}', '"priority" must be an integer'),
    ('{"id": 1, "task": "echo", "resources": {"cpu": -1}}', '"resources"'),
    ('{"id": 1, "task": "echo", "timeout": 0}', '"timeout"'),
    ('{"id": 1.5, "task": "echo"}', '"id" must be a string or an integer'),
    ('{"id": 1, "task": "echo", "arg": [1]}', "unknown field(s) 'arg'"),
    ('{"id": 1, "task": "echo", "args": [123456789012345678901234567890]}', "cannot be sent"),
])
def test_a_malformed_line_is_refused_with_the_reason(raw, why):
    with pytest.raises(LineError) as info:
        parse_line(raw, 1)
    assert why in str(info.value)


def test_a_good_line_keeps_its_id_type_and_options():
    job = parse_line(b'{"id": "7", "task": "square", "args": [7], "priority": 3, "resources": {"cpu": 1}}', 4)
    assert (job.lineno, job.id, job.id_text, job.name, job.args) == (4, "7", '"7"', "square", [7])
    assert job.options == {"priority": 3, "resources": {"cpu": 1}}
    assert parse_line(b'{"id": 7, "task": "noop"}', 1).id_text != job.id_text  # 7 and "7" are two ids


def test_numpy_results_become_json_lists_and_numbers():
    import numpy as np

    value = {"a": np.arange(6).reshape(2, 3), "s": np.float32(1.5), "c": np.array([1 + 2j]), "b": b"\x00\x01"}
    assert json.loads(json.dumps(value, default=to_json)) == {"a": [[0, 1, 2], [3, 4, 5]], "s": 1.5,
                                                              "c": [[1.0, 2.0]], "b": "AAE="}


# ---------------------------------------------------------------- against a cluster

def test_bad_lines_and_failing_tasks_are_reported_by_line_and_the_others_run(running):
    src = write_lines(running.tmp_path / "jobs.jsonl", [
        {"id": 1, "task": "square", "args": [7]},                                   # 1 ok
        {"id": 2, "task": "sleep", "args": ["not a number"]},                       # 2 fails on the worker
        "this is not json",                                                         # 3 bad
        {"id": 1, "task": "square", "args": [3]},                                   # 4 duplicate id
        "",                                                                         # 5 blank: ignored
        {"id": "m", "task": "matmul", "args": [[[1, 2], [3, 4]], [[1, 0], [0, 1]]]},  # 6 ok, a numpy result
        {"id": 7, "args": [1]},                                                     # 7 no task
        {"id": 8, "task": "echo", "args": 5},                                       # 8 args not a list
        {"id": 9, "task": "no.such.task", "args": []},                              # 9 fails: nobody serves it
        {"id": 10, "task": "echo", "kwargs": {"x": {"deep": [1, None]}}, "priority": 5},  # 10 ok
    ])
    out = running.tmp_path / "results.jsonl"
    proc = run_submit(running, str(src), "--out", str(out))
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    for lineno, why in [(3, "bad JSON"), (4, "duplicate id 1"), (7, 'missing "task"'), (8, '"args" must be a list')]:
        assert f"jobs.jsonl:{lineno}: skipped: {why}" in stderr, stderr
    assert "jobs.jsonl:2: task 2 failed: ValueError" in stderr
    assert "jobs.jsonl:9: task 9 failed" in stderr and "no.such.task" in stderr
    assert "3 succeeded, 2 failed" in stderr and "4 malformed lines" in stderr

    results = {r["id"]: r for r in read_results(out)}
    assert sorted(results, key=str) == [1, 10, 2, 9, "m"]
    assert results[1]["ok"] and results[1]["result"] == 49 and results[1]["info"]["attempts"] == 1
    assert results["m"]["ok"] and results["m"]["result"] == [[1, 2], [3, 4]]  # numpy array -> nested lists
    assert results[10]["result"] == {"deep": [1, None]}
    assert not results[2]["ok"] and results[2]["error"]["type"] == "ValueError"
    assert "Traceback" in results[2]["error"]["traceback"]
    assert not results[9]["ok"] and "no.such.task" in results[9]["error"]["message"]


def test_stdin_input_writes_results_to_stdout_and_exits_zero_when_all_succeed(running):
    lines = "".join(json.dumps({"id": f"t{i}", "task": "square", "args": [i]}) + "\n" for i in range(50)).encode()
    proc = run_submit(running, "-", stdin=lines)
    assert proc.returncode == 0, proc.stderr.decode()
    results = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert sorted((r["id"], r["result"]) for r in results) == sorted((f"t{i}", i * i) for i in range(50))
    assert "50 succeeded, 0 failed" in proc.stderr.decode()


def test_usage_errors_exit_two():
    cmd = [sys.executable, "-m", "client.batch"]
    assert subprocess.run([*cmd, "missing.jsonl", "--broker", "tcp://127.0.0.1:1"], capture_output=True,
                          timeout=RUN_DEADLINE_S).returncode == 2
    assert subprocess.run([*cmd, "-", "--resume"], capture_output=True, timeout=RUN_DEADLINE_S).returncode == 2


@pytest.mark.slow
def test_a_run_killed_mid_way_and_resumed_loses_and_repeats_nothing(cluster, events):
    cluster.start_broker()
    cluster.start_worker("--slots", "1")
    cluster.start_worker("--slots", "1")
    cluster.wait_workers(2)
    seen = events("task.")
    n = 200
    src = write_lines(cluster.tmp_path / "slow.jsonl", ({"id": i, "task": "sleep", "args": [0.05]} for i in range(n)))
    out = cluster.tmp_path / "results.jsonl"

    first = subprocess.Popen(submit_cmd(cluster, str(src), "--out", str(out), "--max-in-flight", "64"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cluster.env,
                             cwd=cluster.tmp_path)
    wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 30, 60, interval=0.02,
               what="30 results from the first run")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    before = out.read_bytes().count(b"\n")
    assert before < n, "the first run finished before it could be killed"
    # the killed run had more tasks accepted than results written: those are what --resume must not run twice
    wait_until(lambda: len(seen.of("task.submitted")) > before, 10, what="tasks accepted beyond the results written")

    second = run_submit(cluster, str(src), "--out", str(out), "--resume", "--events", cluster.events)
    stderr = second.stderr.decode()
    assert second.returncode == 0, stderr
    assert f"{before} already in results.jsonl" in stderr

    ids = Counter(r["id"] for r in read_results(out))
    assert ids == Counter(range(n))  # every id exactly once
    assert all(r["ok"] and r["result"] == 0.05 for r in read_results(out))
    # no task ran twice: the broker finished exactly n, and published exactly n successes
    with cluster.client() as c:
        assert c.status()["done"] == n
    wait_until(lambda: len(seen.of("task.succeeded")) >= n, 20, what=f"{n} task.succeeded events")
    last_seq = max(f["seq"] for _t, f in seen.events)
    seen.wait_for("broker.stats", lambda f: f["seq"] > last_seq, timeout=10)  # nothing more was on its way
    assert len(seen.of("task.succeeded")) == n
    assert len({f["task_id"] for f in seen.of("task.submitted")}) == n == len(seen.of("task.submitted"))


@pytest.mark.slow
def test_a_hundred_thousand_line_file_runs_in_bounded_memory(running):
    n = 100_000
    src = write_lines(running.tmp_path / "noop.jsonl", ({"id": i, "task": "noop"} for i in range(n)))
    out = running.tmp_path / "results.jsonl"
    log = running.tmp_path / "submit.stderr"
    started = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen(submit_cmd(running, str(src), "--out", str(out)), stdout=subprocess.DEVNULL,
                                stderr=err, env=running.env, cwd=running.tmp_path)
    # wait4 reports this one child's own peak RSS (ru_maxrss, KiB on Linux), nobody else's
    deadline = time.monotonic() + 300
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError("gridq-submit did not finish 100,000 no-ops")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.monotonic() - started
    stderr = log.read_text()
    assert proc.returncode == 0, stderr
    assert out.read_bytes().count(b"\n") == n
    peak_mb = usage.ru_maxrss / 1024
    print(f"\ngridq-submit, {n:,} no-op lines: peak RSS {peak_mb:.0f} MiB, "
          f"{wall_s:.1f} s, {n / wall_s:,.0f} tasks/s")
    print(next(line for line in stderr.splitlines() if " tasks in " in line))
    # every line and future held at once measures ~380 MB here; streaming keeps it to about a quarter
    assert peak_mb < 200
