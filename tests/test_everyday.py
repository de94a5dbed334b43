"""Everyday use: failures that explain themselves, retries on exceptions, keys that conflict,
wrong ports, a quiet library, a worker's Ctrl-C (issue 17)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import pytest
import zmq
from structlog.testing import capture_logs

from broker.protocol import Command, Message, pack_value
from broker.server import Broker, BrokerConfig
from broker.states import TaskState
from client import AsyncClient, BrokerUnavailable, Client, GridqError, KeyConflict, TaskError, TaskTimeout
from client.errors import RemoteTraceback, task_error
from tests.conftest import ROOT, silent_endpoints
from tests.test_batch import running  # noqa: F401 -- the same one-worker cluster fixture
from tests.harness import Harness, wait_until


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


# ------------------------------------------------------------------ keys and retries in the core


def submit_record(h, name, *args, key=None, retries=None, retry_on=None, backoff_s=None, session="s1"):
    """SUBMIT one task with every field (retry_on, backoff_s too); returns the ACCEPTED header."""
    h.n += 1
    task_id = f"t{h.n}"
    blob, frames = pack_value([list(args), {}])
    rec = [task_id, name, blob, len(frames), None, 0, retries, None, key, retry_on, backoff_s]
    h.to_clients.clear()
    h.core.on_client(b"c1", Message(Command.SUBMIT, {"rid": h.n, "session": session, "tasks": [rec]}, frames), h.now)
    h.flush()
    return task_id, next(m.header for _, m in h.to_clients if m.command is Command.ACCEPTED)


def fail(h, wid: bytes, task_id: str, *types: str):
    error = {"type": types[0], "message": "boom", "traceback": "", "types": list(types)}
    h.core.on_worker(wid, Message(Command.DONE, {"log": [[task_id, False, error, 0, 0.01]]}), h.now)
    h.flush()


def test_a_key_reused_with_another_name_or_other_arguments_is_refused_as_a_conflict():
    h = Harness()
    first, accepted = submit_record(h, "square", 5, key="k")
    assert accepted["conflicts"] == [] and accepted["aliases"] == []
    other_name, accepted = submit_record(h, "echo", 5, key="k")
    assert [c[0] for c in accepted["conflicts"]] == [other_name] and "'square'" in accepted["conflicts"][0][1]
    other_args, accepted = submit_record(h, "square", 6, key="k")
    assert [c[0] for c in accepted["conflicts"]] == [other_args]
    same, accepted = submit_record(h, "square", 5, key="k", session="s2")
    assert accepted["aliases"] == [[same, first]] and accepted["conflicts"] == []
    assert set(h.core.tasks) == {first}


def test_a_key_conflict_is_seen_after_a_restart_with_a_journal(tmp_path):
    from broker.journal import Journal

    journal = Journal(str(tmp_path / "j.db"))
    h = Harness(journal=journal)
    h.join(b"w1")
    first, _ = submit_record(h, "square", 5, key="k")
    h.done(b"w1", first, 25)
    journal.commit()
    journal.close()
    journal = Journal(str(tmp_path / "j.db"))
    again = Harness(journal=journal)
    journal.restore(again.core, again.now)
    again.n = 10  # fresh task ids
    _, accepted = submit_record(again, "echo", "hello", key="k")
    assert len(accepted["conflicts"]) == 1
    _, accepted = submit_record(again, "square", 5, key="k")
    assert accepted["aliases"] == [[f"t{again.n}", first]]
    journal.close()


def test_a_task_that_raises_a_retry_on_type_runs_again_after_a_doubling_backoff():
    h = Harness()
    h.join(b"w1")
    t, _ = submit_record(h, "square", 1, retries=2, retry_on=["OSError"], backoff_s=0.5)
    assert h.dispatched(b"w1") == [t]
    fail(h, b"w1", t, "ConnectionError", "OSError", "Exception", "BaseException")  # a subclass counts
    retried = h.topics("task.retried")
    assert len(retried) == 1 and "ConnectionError: boom" in retried[0]["reason"]
    assert h.state(t) is TaskState.QUEUED and h.dispatched(b"w1") == []
    h.tick(0.4)
    assert h.dispatched(b"w1") == []  # the backoff is data the core keeps, not a sleep
    h.tick(0.15)
    assert h.dispatched(b"w1") == [t]
    fail(h, b"w1", t, "OSError")
    h.tick(0.9)
    assert h.dispatched(b"w1") == []
    h.tick(0.15)  # 0.5 s, then 1.0 s
    assert h.dispatched(b"w1") == [t]
    fail(h, b"w1", t, "OSError")  # retries=2 spent: fails for good
    assert h.state(t) is TaskState.FAILED and len(h.topics("task.retried")) == 2
    assert h.fetch()[t][4]["attempts"] == 3


def test_an_exception_not_named_in_retry_on_fails_at_once():
    h = Harness()
    h.join(b"w1")
    t, _ = submit_record(h, "square", 1, retries=3, retry_on=["KeyError"])
    h.dispatched(b"w1")
    fail(h, b"w1", t, "ValueError", "Exception")
    assert h.state(t) is TaskState.FAILED and h.topics("task.retried") == []


def test_a_retry_on_declared_by_the_task_applies_and_a_task_waiting_out_its_backoff_can_be_cancelled():
    h = Harness()
    header = {"name": "w1", "slots": 1, "resources": {}, "tasks": {"flaky": {"cpu": 1}},
              "retry": {"flaky": [["ValueError"], 30.0]}}
    h.core.on_worker(b"w1", Message(Command.READY, header), h.now)
    h.flush()
    t, _ = submit_record(h, "flaky")
    h.dispatched(b"w1")
    fail(h, b"w1", t, "ValueError")
    assert h.state(t) is TaskState.QUEUED and len(h.topics("task.retried")) == 1
    h.core.on_client(b"c1", Message(Command.CANCEL, {"rid": 9, "session": "s1", "ids": [t]}), h.now)
    h.flush()
    assert h.state(t) is TaskState.CANCELLED and h.core.counts["queued"] == 0
    h.tick(31)
    assert h.dispatched(b"w1") == [] and h.state(t) is TaskState.CANCELLED


def test_a_retry_counts_against_the_same_retries_as_a_lost_worker():
    h = Harness()
    h.join(b"w1")
    t, _ = submit_record(h, "square", 1, retries=1, retry_on=["ValueError"])
    h.dispatched(b"w1")
    fail(h, b"w1", t, "ValueError")
    h.tick(0.01)
    assert h.dispatched(b"w1") == [t]
    h.tick(10)  # w1 goes silent and is lost: that would be a second run again
    assert h.state(t) is TaskState.FAILED


# ------------------------------------------------------------------ keys and retries end to end


def test_a_key_reused_for_another_task_raises_key_conflict_never_the_other_result(running):
    with running.client() as c:
        assert c.submit("square", 5, key="k-17").result(timeout=20) == 25
        with pytest.raises(KeyConflict, match="'square'"):
            c.submit("echo", "hello", key="k-17").result(timeout=20)
        assert c.submit("square", 5, key="k-17").result(timeout=20) == 25


FLAKY_TASKS = '''
from pathlib import Path
from worker import task

@task(retry_on=("ConnectionError",), backoff=0.05)
def flaky(path, failures):
    runs = Path(path)
    n = int(runs.read_text()) + 1 if runs.exists() else 1
    runs.write_text(str(n))
    if n <= failures:
        raise ConnectionError(f"run {n} fails")
    return n
'''


def test_retry_on_from_submit_and_from_the_task_decorator_run_a_raising_task_again(cluster, events):
    (cluster.tmp_path / "flaky_tasks.py").write_text(FLAKY_TASKS)
    cluster.start_broker()
    cluster.start_worker("--tasks", "flaky_tasks")
    cluster.wait_workers(1)
    log = events("task.")
    with cluster.client() as c:
        f = c.submit("flaky", str(cluster.tmp_path / "runs"), 2)
        assert f.result(timeout=30) == 3 and f.info["attempts"] == 3
        retried = [e for e in log.of("task.retried") if e["task_id"] == f.task_id]
        assert len(retried) == 2 and "ConnectionError: run 1 fails" in retried[0]["reason"]
        g = c.submit("sleep", "not seconds", retries=2, retry_on=(ValueError,), backoff=0.2)
        with pytest.raises(TaskError, match="ValueError") as raised:
            g.result(timeout=30)
        assert g.info["attempts"] == 3 and "float" in raised.value.traceback
        starts = [e["ts"] for e in log.of("task.started") if e["task_id"] == g.task_id]
        assert len(starts) == 3 and starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4
        with pytest.raises(ValueError, match="retry_on"):
            c.submit("square", 1, retry_on=(3,))


# ------------------------------------------------------------------ wrong ports, typos


def test_a_client_that_dials_the_worker_port_fails_at_once_saying_where_to_connect(cluster):
    cluster.start_broker()
    cluster.wait_workers(0)
    started = time.monotonic()
    with Client(cluster.backend, timeout=2.0) as c:
        with pytest.raises(GridqError, match=f"worker port; clients connect to {cluster.frontend}") as raised:
            c.status()
        f = c.submit("square", 2)
        with pytest.raises(GridqError, match="wrong port"):
            f.result(timeout=10)
    assert time.monotonic() - started < 5.0  # not a BrokerUnavailable after timeout x retries
    assert not isinstance(raised.value, BrokerUnavailable)


def test_a_worker_that_dials_the_client_port_says_so_and_exits_non_zero(cluster):
    cluster.start_broker()
    cluster.wait_workers(0)
    worker = cluster._spawn(["-m", "worker", "--broker", cluster.frontend, "--heartbeat", "0.2"], "worker")
    assert worker.wait(timeout=15) != 0
    logs = cluster.logs()
    assert f"client port; workers connect to {cluster.backend}" in logs
    assert "broker_silent" not in logs


def test_an_unknown_task_name_fails_suggesting_the_closest_served_names(running):
    with running.client() as c:
        with pytest.raises(TaskError, match="did you mean 'square'"):
            c.submit("sqare", 3).result(timeout=30)


# ------------------------------------------------------------------ a quiet library

SILENT_BROKER = """
    import logging, sys
    {setup}
    from client import BrokerUnavailable, Client
    c = Client({address!r}, timeout=0.2, retries=2)
    try:
        c.status()
    except BrokerUnavailable:
        print("unavailable")
    c.close()
    """


def test_the_client_prints_nothing_at_default_settings(cluster):
    with silent_endpoints() as (address,):
        done = run_script(cluster, SILENT_BROKER.format(setup="", address=address))
    assert (done.stdout, done.stderr) == ("unavailable\n", "")


def test_the_client_logs_through_stdlib_logging_where_the_application_configured_it(cluster):
    setup = "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)"
    with silent_endpoints() as (address,):
        done = run_script(cluster, SILENT_BROKER.format(setup=setup, address=address))
    assert done.stdout == "unavailable\n"
    assert "DEBUG:client.engine:broker_silent_resending" in done.stderr


def test_a_result_the_broker_already_has_is_logged_at_debug_only():
    h = Harness()
    h.join(b"w1")
    with capture_logs() as logs:
        h.core.on_worker(b"w1", Message(Command.DONE, {"log": [["gone", True, b"\xc0", 0, 0.0]]}), h.now)
    assert [(e["log_level"], e["event"]) for e in logs] == [("debug", "result_for_task_not_held")]


@pytest.mark.parametrize("max_bytes, level", [(BrokerConfig.max_message_bytes, "debug"), (2_000_000_000, "warning")])
def test_a_journaled_broker_warns_of_a_lowered_message_cap_only_where_one_was_asked_for(tmp_path, max_bytes, level):
    ctx = zmq.Context()
    config = BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", events="tcp://127.0.0.1:*",
                          journal=str(tmp_path / "j.db"), max_message_bytes=max_bytes)
    with capture_logs() as logs:
        broker = Broker(config, context=ctx)
    try:
        assert [e["log_level"] for e in logs if e["event"] == "max_message_bytes_lowered"] == [level]
    finally:
        for sock in (broker.frontend, broker.backend, broker.events):
            sock.close(linger=0)
        broker.journal.close()
        ctx.term()


# ------------------------------------------------------------------ worker Ctrl-C, import names


def test_a_workers_first_sigint_says_it_drains_and_for_how_long_the_second_stops_it_handing_back(cluster, events):
    cluster.start_broker()
    worker = cluster.start_worker("--drain-timeout", "60")
    cluster.wait_workers(1)
    log = events("task.")
    with cluster.client() as c:
        f = c.submit("sleep", 60)
        log.wait_for("task.started", lambda e: e["task_id"] == f.task_id)
        worker.send_signal(signal.SIGINT)
        wait_until(lambda: "worker_draining" in cluster.logs(), 10, what="the draining line")
        assert "up to 60 s" in cluster.logs() and "Ctrl-C again" in cluster.logs()
        assert worker.poll() is None  # still finishing its task
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=10) == 0 and time.monotonic() - stopped_at < 5
        retried = log.wait_for("task.retried", lambda e: e["task_id"] == f.task_id)
        assert "handed back" in retried["reason"]
        c.cancel(f)


SHADOWING_TASKS = '''
import client
from worker import task

@task
def which_client():
    return client.__file__
'''


def test_task_directories_go_to_the_end_of_sys_path_so_a_users_client_py_shadows_nothing(cluster):
    (cluster.tmp_path / "mytasks.py").write_text(SHADOWING_TASKS)
    (cluster.tmp_path / "client.py").write_text("raise RuntimeError('the user\\'s own client.py was imported')\n")
    cluster.start_broker()
    cluster.start_worker("--tasks", "mytasks")  # python -m worker, from the directory holding both files
    cluster.wait_workers(1)
    with cluster.client() as c:
        assert c.submit("which_client").result(timeout=20).startswith(str(ROOT / "client"))


def test_a_task_module_named_like_a_gridq_package_is_refused_with_a_message(cluster):
    (cluster.tmp_path / "client.py").write_text("")
    cluster.start_broker()
    worker = cluster.start_worker("--tasks", "client")
    assert worker.wait(timeout=20) == 2
    assert "named like gridq's own package 'client'" in cluster.logs()


def test_an_import_of_gridqs_that_finds_a_users_module_named_like_gridqs_says_so(tmp_path):
    (tmp_path / "broker.py").write_text("X = 1\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for package in ("client", "worker"):
        done = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=60)
        assert done.returncode == 1
        assert f"'broker' is {tmp_path / 'broker.py'}, a module of yours named like it" in done.stderr


# ------------------------------------------------------------------ abandoned work is cancelled


@pytest.fixture
def one_slot(cluster):
    cluster.start_broker()
    cluster.start_worker("--slots", "1")
    cluster.wait_workers(1)
    return cluster


def queued(cluster) -> int:
    with cluster.client() as c:
        return c.status()["queued"]


def test_a_failing_map_says_which_item_failed_and_cancels_what_has_not_started(one_slot, events):
    log = events("task.")
    with one_slot.client() as c:
        with pytest.raises(TaskError, match="ValueError") as raised:
            c.map("sleep", [0.05, "not seconds", *[0.2] * 30])
        assert raised.value.index == 1 and raised.value.name == "sleep"
        assert "item 1 of the map" in "".join(traceback.format_exception(raised.value))
        wait_until(lambda: queued(one_slot) == 0, 5, what="the rest of the map cancelled")
        assert len(log.of("task.cancelled")) >= 25
        results = c.map("sleep", [0, "x", 0], return_exceptions=True)
        assert results[0] == 0 and results[2] == 0 and isinstance(results[1], TaskError) and results[1].index == 1


def test_a_map_past_its_timeout_raises_a_clear_error_and_cancels_the_rest(one_slot):
    with one_slot.client() as c:
        with pytest.raises(TimeoutError, match=r"of 20 tasks finished within its timeout of 1 s"):
            c.map("sleep", [0.3] * 20, timeout=1)
        wait_until(lambda: queued(one_slot) == 0, 5, what="the rest of the map cancelled")
        with pytest.raises(TaskTimeout):
            c.map("sleep", [5], task_timeout=0.3)


def test_an_async_map_that_fails_says_which_item_and_cancels_the_rest(one_slot):
    async def go():
        async with AsyncClient(one_slot.frontend, timeout=2.0) as c:
            with pytest.raises(TaskError) as raised:
                await c.map("sleep", [0.05, "x", *[0.2] * 30])
            assert raised.value.index == 1
            for _ in range(100):
                if (await c.status())["queued"] == 0:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the rest of the map was not cancelled")

    asyncio.run(go())


def test_ctrl_c_of_a_client_process_cancels_its_queued_tasks(one_slot, events):
    log = events("task.")
    script = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite run in the background ignores it
        from client import Client
        with Client({one_slot.frontend!r}, timeout=2.0) as c:
            c.map("sleep", [0.3] * 50)
        """)], env=one_slot.env, cwd=one_slot.tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: log.of("task.started"), 20, what="the map running")
        script.send_signal(signal.SIGINT)
        assert script.wait(timeout=20) != 0
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    wait_until(lambda: queued(one_slot) == 0, 5, what="the client's queued tasks cancelled")
    assert len(log.of("task.cancelled")) >= 40


def test_a_client_process_that_ends_without_closing_cancels_its_unkeyed_tasks_and_keeps_keyed_ones(one_slot, events):
    log = events("task.")
    done = run_script(one_slot, f"""
        from client import Client
        c = Client({one_slot.frontend!r}, timeout=2.0)
        unkeyed = [c.submit("sleep", 0.3) for _ in range(20)]
        keyed = c.submit("sleep", 0.01, key="kept-17", priority=-1)
        c.status()  # every submit has reached the broker
        print(keyed.task_id)
        """)
    assert done.returncode == 0, done.stderr
    keyed_id = done.stdout.strip()
    wait_until(lambda: queued(one_slot) == 0, 10, what="the unkeyed tasks cancelled, the keyed one run")
    log.wait_for("task.succeeded", lambda e: e["task_id"] == keyed_id)
    assert len(log.of("task.cancelled")) >= 15


def test_an_asyncio_program_that_ends_without_closing_its_client_cancels_its_unkeyed_tasks(one_slot, events):
    log = events("task.")
    done = run_script(one_slot, f"""
        import asyncio
        from client import AsyncClient

        async def main():
            c = AsyncClient({one_slot.frontend!r}, timeout=2.0)  # never closed: asyncio.run ends, then Python
            unkeyed = [c.submit("sleep", 0.3) for _ in range(20)]
            keyed = c.submit("sleep", 0.01, key="kept-async", priority=-1)
            await c.status()  # every submit has reached the broker
            return keyed.task_id

        print(asyncio.run(main()))
        """)
    assert done.returncode == 0, done.stderr
    keyed_id = done.stdout.strip()
    wait_until(lambda: queued(one_slot) == 0, 10, what="the unkeyed tasks cancelled, the keyed one run")
    log.wait_for("task.succeeded", lambda e: e["task_id"] == keyed_id)
    assert len(log.of("task.cancelled")) >= 15
