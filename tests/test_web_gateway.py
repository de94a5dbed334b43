"""Pieces of gridq-web without processes: refusals to status codes, tokens files, the task window."""

from __future__ import annotations

import pytest

from client.errors import BrokerUnavailable, GridqError, TaskError
from client.web.auth import AuthError, Tokens, TokensError, bearer
from client.web.gateway import refusal
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
