"""Everyday use: failures that explain themselves, retries on exceptions, keys that conflict,
wrong ports, a quiet library, a worker's Ctrl-C (issue 17)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import traceback

import pytest

from client import KeyConflict, TaskError
from client.errors import RemoteTraceback, task_error


@pytest.fixture
def running(cluster):
    cluster.start_broker("--no-worker-timeout", "1.5")
    cluster.start_worker("--slots", "2")
    cluster.wait_workers(1)
    return cluster


def run_script(cluster, source: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``source`` in a fresh Python process (cwd: the test's directory) and wait for it."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True, text=True,
                          env=cluster.env, cwd=cluster.tmp_path, timeout=timeout)


# ------------------------------------------------------------------ TaskError explains itself


def test_task_error_keeps_its_str_and_chains_the_remote_traceback_as_its_cause():
    error = task_error({"type": "KeyError", "message": "'q'", "traceback": "Traceback ...\n  line 3 in f\nKeyError: 'q'\n"},
                       task_id="abc-1", name="lookup", worker="w1")
    assert str(error) == "KeyError: 'q'"
    assert isinstance(error.__cause__, RemoteTraceback)
    shown = "".join(traceback.format_exception(error))
    assert "line 3 in f" in shown and "The above exception was the direct cause" in shown
    assert "task 'lookup' (id abc-1) on worker w1" in shown
    assert error.task_id == "abc-1" and error.name == "lookup" and error.index is None
    assert error.at_index(7).index == 7 and "item 7 of the map" in "".join(traceback.format_exception(error))


def test_key_conflict_is_a_task_error_exported_by_client():
    assert issubclass(KeyConflict, TaskError)
    assert isinstance(task_error({"type": "KeyConflict", "message": "key k"}), KeyConflict)


def test_an_uncaught_task_error_prints_the_remote_traceback_and_says_which_task(running):
    done = run_script(running, f"""
        from client import Client
        with Client({running.frontend!r}, timeout=2.0) as c:
            c.submit("square", "not a number").result(timeout=30)
        """)
    assert done.returncode == 1
    assert "return x * x" in done.stderr  # the line that raised, on the worker
    assert "The above exception was the direct cause of the following exception" in done.stderr
    assert "client.errors.TaskError: TypeError: can't multiply sequence" in done.stderr
    assert "task 'square' (id " in done.stderr
