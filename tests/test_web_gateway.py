"""Pieces of gridq-web without processes: refusals to status codes, tokens files, the task window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from client.errors import BrokerUnavailable, GridqError, TaskError
from client.web.auth import AuthError, Tokens, TokensError, bearer
from client.web.gateway import refusal
from client.web.models import BodyError, TaskIn, TaskSpec, _plain, parse_tasks
from client.web.tasks import TaskWindow, to_json


class KeyConflict(GridqError):
    """Stands in for client.errors.KeyConflict (issue 17): recognised by name."""


@pytest.mark.parametrize("exc, status", [
    (KeyConflict("key 'k' is used by another task"), 409),
    (GridqError("broker refused the request: key 'k' is taken by another task"), 409),
    (TaskError("InvalidRequest", "priority must be an integer"), 422),
    (BrokerUnavailable("silent"), 503),
])
def test_a_refused_task_gets_the_status_its_reason_calls_for(exc, status):
    answer = refusal(exc, "body[4]")
    assert answer.status == status
    if status != 503:
        assert answer.message.startswith("body[4]")


def test_a_tokens_file_gives_roles_and_refuses_bad_lines(tmp_path):
    good = tmp_path / "tokens"
    good.write_text("# comment\n\nabcdefgh1 submit\nabcdefgh2 read\n")
    tokens = Tokens.load(good)
    assert tokens.check("abcdefgh1", "submit") == "submit"
    assert tokens.check("abcdefgh2", "read") == "read"
    with pytest.raises(AuthError) as err:
        tokens.check("abcdefgh2", "submit")
    assert err.value.status == 403
    for token in (None, "", "abcdefgh3"):
        with pytest.raises(AuthError) as err:
            tokens.check(token, "read")
        assert err.value.status == 401
    for text, where in (("abcdefgh1 admin\n", ":1"), ("short read\n", ":1"), ("", "no tokens")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(TokensError, match=where):
            Tokens.load(bad)
    assert bearer("Bearer  abc ") == "abc" and bearer("Basic abc") is None and bearer(None) is None


def test_the_window_keeps_the_newest_tasks_and_pages_them_newest_first():
    window = TaskWindow(size=5)
    for i in range(8):
        window.event("task.submitted", {"task_id": f"t{i}", "name": "even" if i % 2 == 0 else "odd", "ts": i})
    window.event("task.started", {"task_id": "t7", "name": "odd", "worker": "w"})
    window.event("task.succeeded", {"task_id": "t7", "name": "odd", "worker": "w", "run_s": 0.5})
    assert len(window) == 5 and window.get("t2") is None
    page, cursor = window.list(limit=2)
    assert [t["task_id"] for t in page] == ["t7", "t6"]
    page, cursor = window.list(limit=2, cursor=cursor)
    assert [t["task_id"] for t in page] == ["t5", "t4"]
    page, cursor = window.list(limit=2, cursor=cursor)
    assert [t["task_id"] for t in page] == ["t3"] and cursor is None
    assert [t["task_id"] for t in window.list(name="even")[0]] == ["t6", "t4"]
    assert window.get("t7").full()["state"] == "succeeded"


def test_values_json_cannot_carry_are_converted():
    import numpy as np

    assert to_json({1: np.arange(3), "b": b"\x00\x01", "f": float("nan"), "t": (1, 2)}) == {
        "1": [0, 1, 2], "b": {"base64": "AAE="}, "f": "nan", "t": [1, 2]}


_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=6)
_field = st.sampled_from(["task", "args", "kwargs", "resources", "priority", "retries", "timeout", "key", "extra"])
_value = st.one_of(_json, st.sampled_from(["noop", "", "x" * 300, 0, 7, 7.0, -(2**31), 2**31, 2**31 + 1, 100, 101, 0.5,
                                           -1.0, 1e9, [], [1, "a"], {}, {"a": 1}, {"cpu": 1}, True, "7"]))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_field, _value, max_size=5))
def test_the_quick_check_passes_only_what_pydantic_passes_with_the_same_values(item):
    """parse_tasks' cheap pass for the usual task never lets through what TaskIn would refuse, nor
    changes a value; anything it is unsure of goes to pydantic (whose 422 names the field)."""
    plain = _plain(item)
    try:
        model = TaskIn.model_validate(item)
    except ValidationError:
        assert plain is None
        return
    if plain is not None:
        assert {f: getattr(plain, f) for f in TaskSpec._fields} == {f: getattr(model, f) for f in TaskSpec._fields}


def test_a_batch_with_one_unusual_task_is_judged_whole_by_pydantic():
    tasks, batch = parse_tasks([{"task": "noop"}] * 3 + [{"task": "noop", "priority": 7.0}])
    assert batch and [t.priority for t in tasks] == [0, 0, 0, 7] and all(isinstance(t, TaskIn) for t in tasks)
    tasks, _ = parse_tasks([{"task": "noop", "args": [1]}] * 3)
    assert all(isinstance(t, TaskSpec) for t in tasks) and tasks[0].args == [1]
    with pytest.raises(BodyError, match=r"body\[2\]\.priority"):
        parse_tasks([{"task": "noop"}] * 2 + [{"task": "noop", "priority": "7"}])


def test_the_window_shows_each_task_where_its_latest_event_puts_it_and_forgets_tasks_it_does_not_hold():
    window = TaskWindow(size=4)
    seq = iter(range(1, 1000))
    for i in range(3):
        window.events("task.submitted", [{"task_id": f"t{i}", "name": "n", "ts": 10.0 + i, "seq": next(seq)}])
    window.events("task.started", [{"task_id": f"t{i}", "name": "n", "worker": "w", "seq": next(seq)} for i in range(3)])
    window.events("task.retried", [{"task_id": "t0", "name": "n", "reason": "lost", "seq": next(seq)}])
    window.events("task.failed", [{"task_id": "t1", "name": "n", "worker": "w", "error": "E: no", "error_type": "E",
                                   "seq": next(seq)}])
    window.events("task.succeeded", [{"task_id": "t2", "name": "n", "worker": "w", "run_s": 0.5, "seq": next(seq)}])
    assert [window.get(f"t{i}").state for i in range(3)] == ["queued", "failed", "succeeded"]
    assert window.get("t1").full()["error"]["message"] == "E: no" and window.get("t2").full()["info"]["run_s"] == 0.5
    window.events("task.started", [{"task_id": "t0", "name": "n", "worker": "w2", "seq": next(seq)}])
    assert window.get("t0").state == "running" and window.get("t0").worker == "w2" and window.get("t0").submitted_at == 10.0
    # events of tasks submitted before the window saw them: not shown, and not kept for long
    for start in range(0, 100, 10):
        window.events("task.succeeded", [{"task_id": f"x{i}", "name": "n", "seq": next(seq)} for i in range(start, start + 10)])
    assert window.get("x5") is None and max(len(d) for d in window._after.values()) <= 3 + window._slack + 10
    # a malformed event is skipped, the others in its run are taken
    window.events("task.submitted", [{"name": "no id"}, {"task_id": ["unhashable"]}, {"task_id": "t3", "seq": next(seq)}])
    assert window.get("t3").state == "queued" and len(window) == 4


def test_a_request_waiting_on_a_task_seen_only_on_the_stream_wakes_when_it_finishes():
    import asyncio

    async def main():
        window = TaskWindow(size=10)
        window.events("task.submitted", [{"task_id": "t", "name": "n", "seq": 1}])
        waiting = asyncio.ensure_future(window.wait("t", 30))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        window.events("task.succeeded", [{"task_id": "t", "name": "n", "worker": "w", "run_s": 0.1, "seq": 2}])
        record = await asyncio.wait_for(waiting, 5)
        assert record.state == "succeeded" and not window._waiters
        assert (await window.wait("missing", 1)) is None
        assert (await window.wait("t", 30)).state == "succeeded"  # finished: at once

    asyncio.run(main())
