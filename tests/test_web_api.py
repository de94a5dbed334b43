"""gridq-web's HTTP API against real broker, worker and gateway processes: every endpoint and status code."""

from __future__ import annotations

import re
import signal
import ssl
import time

import httpx
import pytest

from tests.conftest import Cluster, silent_endpoints, wait_until
from tests.web_support import SSE, run_module, self_signed, start_web, web_grid

XSS = '<img src=x onerror="window.__xss=1">'


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One broker, one worker (2 slots) and one gateway for the module's tests."""
    with web_grid(tmp_path_factory.mktemp("web"), broker_args=("--no-worker-timeout", "3")) as cluster:
        yield cluster


@pytest.fixture
def web(grid):
    return grid.web


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return body["error"]


# ------------------------------------------------------------------ submit and results


def test_a_task_submitted_over_http_runs_and_its_result_is_kept(web):
    r = web.post("/api/tasks", {"task": "square", "args": [7]})
    assert r.status_code == 202
    body = r.json()
    assert body["state"] == "queued" and isinstance(body["task_id"], str)
    done = web.result(body["task_id"])
    assert done["state"] == "succeeded" and done["result"] == 49 and done["name"] == "square"
    assert done["info"]["worker"] == "w1" and done["info"]["attempts"] == 1


def test_an_array_of_tasks_answers_one_acceptance_per_task_in_order(web):
    r = web.post("/api/tasks", [{"task": "square", "args": [i]} for i in range(50)])
    assert r.status_code == 202
    ids = [a["task_id"] for a in r.json()]
    assert len(set(ids)) == 50
    assert [web.result(i)["result"] for i in ids] == [i * i for i in range(50)]


def test_numpy_results_come_back_as_nested_lists_and_kwargs_pass_through(web):
    done = web.result(web.submit("matmul", [[1, 2], [3, 4]], [[1, 0], [0, 1]]))
    assert done["result"] == [[1, 2], [3, 4]]
    assert web.result(web.submit("echo", kwargs={"x": {"k": [1, "two"]}}))["result"] == {"k": [1, "two"]}


def test_one_bad_object_refuses_the_whole_array_naming_its_index(web):
    before = web.get("/api/tasks", params={"name": "noop", "limit": 1000}).json()["tasks"]
    r = web.post("/api/tasks", [{"task": "noop"}, {"task": "noop"}, {"task": "noop", "priority": "7"}])
    assert r.status_code == 422
    assert "body[2].priority" in error_of(r)["message"]
    time.sleep(0.3)  # nothing was submitted: none may show up
    assert web.get("/api/tasks", params={"name": "noop", "limit": 1000}).json()["tasks"] == before


@pytest.mark.parametrize("body, field", [
    ({"task": "square", "priority": "7"}, "body.priority"),
    ({"task": "square", "priority": 1.5}, "body.priority"),
    ({"task": "square", "timeout": True}, "body.timeout"),
    ({"task": "square", "retries": -1}, "body.retries"),
    ({"task": "square", "args": 7}, "body.args"),
    ({"task": "square", "resources": {"cpu": "1"}}, "body.resources"),
    ({"task": "square", "kwargs": {"priority": 1}}, "body.kwargs.priority"),
    ({"task": "square", "args": [2**70]}, "body.args"),
    ({"task": "square", "colour": "red"}, "body.colour"),
    ({"args": [1]}, "body.task"),
    ({"task": ""}, "body.task"),
    (7, "body"),
    ([], "body"),
])
def test_a_bad_body_is_refused_with_422_naming_the_field(web, body, field):
    r = web.post("/api/tasks", body)
    assert r.status_code == 422, r.text
    assert error_of(r)["message"].startswith(field), error_of(r)


def test_a_body_that_is_not_json_is_422(web):
    r = web.post("/api/tasks", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in error_of(r)["message"]


def test_more_than_10000_tasks_in_one_array_is_422(web):
    r = web.post("/api/tasks", [{"task": "noop"}] * 10_001)
    assert r.status_code == 422 and "10000" in error_of(r)["message"]


def test_a_body_over_max_body_is_413_whether_declared_or_streamed(web):
    big = b'{"task": "noop", "args": ["' + b"x" * (17 << 20) + b'"]}'
    r = web.post("/api/tasks", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["type"] == "PayloadTooLarge"

    def chunks():  # no Content-Length: the cap must hold while the body streams in
        for _ in range(18):
            yield b" " * (1 << 20)

    r = web.post("/api/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert web.get("/healthz").status_code == 200


def test_a_failed_task_shows_its_error_with_the_traceback_and_user_text_verbatim(web):
    done = web.result(web.submit("sleep", XSS))
    assert done["state"] == "failed"
    assert done["error"]["type"] == "ValueError"
    assert XSS in done["error"]["message"]
    assert "Traceback" in done["error"]["traceback"]


def test_wait_holds_the_answer_until_the_task_finishes(web):
    task_id = web.submit("sleep", 0.5)
    assert web.get(f"/api/tasks/{task_id}").json()["state"] in ("queued", "running")
    started = time.monotonic()
    done = web.result(task_id, wait=30)
    assert done["state"] == "succeeded" and time.monotonic() - started < 10
    r = web.get(f"/api/tasks/{task_id}", params={"wait": 1000})  # more than 60 is 60: allowed
    assert r.status_code == 200
    assert web.get(f"/api/tasks/{task_id}", params={"wait": "soon"}).status_code == 422


def test_unknown_task_ids_are_404(web):
    assert web.get("/api/tasks/nope").status_code == 404
    r = web.delete("/api/tasks/nope")
    assert r.status_code == 404 and error_of(r)["type"] == "NotFound"


def test_a_queued_task_is_cancelled_and_a_running_one_is_not(web):
    blockers = [web.submit("sleep", 1.5) for _ in range(2)]  # both slots of w1
    wait_until(lambda: all(web.get(f"/api/tasks/{b}").json()["state"] == "running" for b in blockers), 15,
               what="blockers running")
    queued = web.submit("sleep", 0.1)
    r = web.delete(f"/api/tasks/{queued}")
    assert r.status_code == 200 and r.json() == {"cancelled": True}
    assert web.result(queued)["state"] == "cancelled"
    r = web.delete(f"/api/tasks/{blockers[0]}")
    assert r.status_code == 200 and r.json() == {"cancelled": False}
    assert web.result(blockers[0])["state"] == "succeeded"


def test_the_task_list_is_newest_first_filtered_and_paged_by_cursor(web):
    ids = [a["task_id"] for a in web.post("/api/tasks", [{"task": "echo", "args": [i]} for i in range(30)]).json()]
    wait_until(lambda: all(web.get(f"/api/tasks/{i}").json()["state"] == "succeeded" for i in ids), 20,
               what="echo tasks done")
    seen, cursor = [], None
    while True:
        page = web.get("/api/tasks", params={"name": "echo", "limit": 7, **({"cursor": cursor} if cursor else {})}).json()
        seen += [t["task_id"] for t in page["tasks"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen[:30] == ids[::-1]  # newest first, none repeated, none missing
    assert len(seen) == len(set(seen))
    failed = web.get("/api/tasks", params={"state": "failed"}).json()["tasks"]
    assert failed and all(t["state"] == "failed" for t in failed)
    assert web.get("/api/tasks", params={"state": "melted"}).status_code == 422
    assert web.get("/api/tasks", params={"limit": 0}).status_code == 422
    assert web.get("/api/tasks", params={"cursor": "x"}).status_code == 422


def test_tasks_submitted_elsewhere_show_their_state(grid, web):
    with grid.client() as c:
        f = c.submit("square", 5)
        assert f.result(timeout=20) == 25
    t = wait_until(lambda: (r := web.get(f"/api/tasks/{f.task_id}")).status_code == 200 and r.json(), 10,
                   what="task seen on the event stream")
    t = web.result(f.task_id)
    assert t["state"] == "succeeded" and t["via"] == "events" and t["worker"] == "w1"


def test_status_is_the_broker_snapshot_and_workers_its_workers(web):
    status = web.get("/api/status").json()
    assert {"seq", "workers", "queued", "running", "done", "failed"} <= set(status)
    workers = web.get("/api/workers").json()
    assert [w["name"] for w in workers] == ["w1"]
    assert {"name", "resources", "free", "slots", "running", "tasks", "heartbeat_age_s"} <= set(workers[0])


# ------------------------------------------------------------------ events, metrics, health


def test_a_new_event_stream_starts_with_a_snapshot_and_resumes_without_gap_or_repeat(web):
    first = SSE(web)
    try:
        first.wait(lambda evs: evs and evs[0][1] == "snapshot", what="snapshot first")
        snap_id = int(first.snapshot()[0][0])
        ids = [a["task_id"] for a in web.post("/api/tasks", [{"task": "noop"} for _ in range(20)]).json()]
        first.wait(lambda evs: sum(1 for e in evs if e[1] == "task.succeeded" and e[2]["task_id"] in ids) == 20,
                   what="20 succeeded events")
    finally:
        first.close()
    got = [e for e in first.snapshot() if e[0] is not None]  # not a gateway.link note (a hub not yet live)
    seqs = [int(e[0]) for e in got]
    assert seqs == list(range(snap_id, snap_id + len(seqs)))  # consecutive: no gap, no repeat
    assert all(e[2]["seq"] == int(e[0]) for e in got[1:])
    # resume from the middle: the rest again, exactly, then live events
    middle = seqs[len(seqs) // 2]
    resumed = SSE(web, last_id=str(middle))
    try:
        resumed.wait(lambda evs: len(evs) >= seqs[-1] - middle, what="resumed events")
    finally:
        resumed.close()
    again = resumed.snapshot()
    assert again[0][1] != "snapshot"
    assert [int(e[0]) for e in again[: seqs[-1] - middle]] == list(range(middle + 1, seqs[-1] + 1))
    assert [e[2] for e in again[: seqs[-1] - middle]] == [e[2] for e in got if int(e[0]) > middle]


def test_gzip_and_plain_event_streams_get_the_same_events_in_order(web):
    gzip, plain = SSE(web, headers={"accept-encoding": "gzip"}), SSE(web, headers={"accept-encoding": "identity"})
    try:
        for stream in (gzip, plain):
            stream.wait(lambda evs: evs and evs[0][1] == "snapshot", what="snapshot first")
        ids = [a["task_id"] for a in web.post("/api/tasks", [{"task": "noop"} for _ in range(300)]).json()]
        for stream in (gzip, plain):
            stream.wait(lambda evs: sum(1 for e in evs if e[1] == "task.succeeded" and e[2]["task_id"] in ids) == 300,
                        what="300 succeeded events")
    finally:
        gzip.close()
        plain.close()
    assert gzip.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
    assert "accept-encoding" in gzip.headers["vary"].lower()
    tasks = {"gzip": [], "plain": []}
    for name, stream in (("gzip", gzip), ("plain", plain)):
        got = [e for e in stream.snapshot() if e[0] is not None]
        seqs = [int(e[0]) for e in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "consecutive: no gap, no repeat"
        tasks[name] = [(e[0], e[1], e[2]) for e in got[1:] if e[2].get("task_id") in ids]
    assert tasks["gzip"] == tasks["plain"] and len(tasks["gzip"]) == 900  # submitted, started, succeeded each


@pytest.mark.parametrize("last_id", ["not-a-number", "1", "99999999999"])
def test_an_unknown_or_unreadable_last_event_id_starts_with_a_snapshot(web, last_id):
    stream = SSE(web, last_id=last_id)
    try:
        stream.wait(lambda evs: len(evs) >= 1, what="first event")
        first = stream.snapshot()[0]
        assert first[1] == "snapshot" and int(first[0]) == first[2]["seq"]
    finally:
        stream.close()


def test_metrics_count_the_work_done(web):
    names = ("submitted", "started", "succeeded", "failed")
    before = {n: web.metric("gridq_tasks_total", f'event="{n}"') for n in names}
    runs = web.metric("gridq_task_run_seconds_count")
    ids = [a["task_id"] for a in web.post("/api/tasks", [{"task": "square", "args": [i]} for i in range(40)]).json()]
    ids.append(web.submit("sleep", "not a number"))
    for i in ids:
        web.result(i)
    expected = {"submitted": 41, "started": 41, "succeeded": 40, "failed": 1}
    wait_until(lambda: all(web.metric("gridq_tasks_total", f'event="{n}"') - before[n] == expected[n] for n in names),
               10, what="metrics to count the tasks")
    assert web.metric("gridq_task_run_seconds_count") - runs == 40
    for n in ("retried", "cancelled"):
        web.metric("gridq_tasks_total", f'event="{n}"')  # present, even at zero
    assert web.metric("gridq_workers") == 1
    rows = web.get("/api/throughput").json()["seconds"]
    assert sum(r[2] for r in rows) >= 40 and all(len(r) == 4 for r in rows)
    assert web.metric("gridq_tasks_queued") >= 0 and web.metric("gridq_tasks_running") >= 0


def test_every_answer_carries_the_security_headers(web):
    for path in ("/", "/api/status", "/static/js/main.js", "/api/tasks/nope"):
        h = web.get(path).headers
        assert "script-src 'self'" in h["content-security-policy"] and "unsafe-inline" not in h["content-security-policy"]
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY"


def test_openapi_declares_every_status_code_and_docs_work_offline(web):
    spec = web.get("/openapi.json").json()
    codes = {(path, method): set(op["responses"]) for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert {"202", "401", "403", "409", "413", "422", "503"} <= codes[("/api/tasks", "post")]
    assert {"200", "401", "404", "422"} <= codes[("/api/tasks/{task_id}", "get")]
    assert {"200", "401", "403", "404", "503"} <= codes[("/api/tasks/{task_id}", "delete")]
    assert {"200", "401", "503"} <= codes[("/api/events", "get")]
    assert {"200", "503"} <= codes[("/healthz", "get")]
    docs = web.get("/docs").text
    page = web.get("/").text
    for html in (docs, page):
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "nothing from another host"
    assert web.get("/static/js/docs.js").status_code == 200
    assert web.get("/static/vendor/uplot/LICENSE").status_code == 200


def test_http_submitted_tasks_outlive_a_gateway_restart(grid):
    web = start_web(grid)
    try:
        task_id = web.submit("sleep", 1.0)
    finally:
        web.stop()  # SIGTERM while the task is queued or running
    with grid.client() as c:
        wait_until(lambda: c.status()["running"] == 0 and c.status()["queued"] == 0, 20, what="the task to finish")
    assert grid.web.result(task_id)["state"] == "succeeded"


# ------------------------------------------------------------------ a broker that does not answer


def test_without_a_broker_health_and_broker_endpoints_answer_503_in_bounded_time(tmp_path):
    cluster = Cluster(tmp_path)
    with silent_endpoints(2) as (frontend, events):  # bound, never answering: a broker that is down
        _answers_503_while_the_broker_is_silent(cluster, start_web(cluster, "--broker-wait", "1", broker=frontend,
                                                                   events=events))


def _answers_503_while_the_broker_is_silent(cluster, web) -> None:
    try:
        for method, path, body in (("GET", "/healthz", None), ("GET", "/api/status", None), ("GET", "/api/workers", None),
                                   ("POST", "/api/tasks", {"task": "noop"}), ("GET", "/api/events", None)):
            started = time.monotonic()
            r = web.http.request(method, path, json=body, timeout=30)
            assert r.status_code == 503, (path, r.text)
            assert time.monotonic() - started < 10
            assert r.json()["broker" if path == "/healthz" else "error"]
        assert web.get("/api/tasks").status_code == 200  # the window needs no broker
    finally:
        web.stop()
        cluster.close()


# ------------------------------------------------------------------ tokens, HTTPS, the command line


def test_tokens_need_a_bearer_and_a_read_token_cannot_submit(grid, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# token role\nsubmit-token-123 submit\nread-token-4567 read\n")
    web = start_web(grid, "--tokens", str(tokens))
    reader = httpx.Client(base_url=web.url, headers={"authorization": "Bearer read-token-4567"}, timeout=20)
    writer = httpx.Client(base_url=web.url, headers={"authorization": "Bearer submit-token-123"}, timeout=20)
    try:
        for path in ("/api/status", "/api/tasks", "/metrics", "/api/workers", "/api/events"):
            r = web.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert web.get(path, headers={"authorization": "Bearer wrong-token-000"}).status_code == 401
        assert web.post("/api/tasks", {"task": "noop"}).status_code == 401
        for path in ("/healthz", "/openapi.json", "/docs", "/", "/static/js/main.js"):
            assert web.get(path).status_code == 200, path
        assert reader.get("/api/status").status_code == 200
        r = reader.post("/api/tasks", json={"task": "square", "args": [3]})
        assert r.status_code == 403 and error_of(r)["type"] == "Forbidden"
        r = writer.post("/api/tasks", json={"task": "square", "args": [3]})
        assert r.status_code == 202
        task_id = r.json()["task_id"]
        assert reader.delete(f"/api/tasks/{task_id}").status_code == 403
        assert reader.get(f"/api/tasks/{task_id}", params={"wait": 20}).json()["result"] == 9
        stream = SSE(web, params={"token": "read-token-4567"})
        try:
            stream.wait(lambda evs: evs and evs[0][1] == "snapshot", what="snapshot with ?token=")
        finally:
            stream.close()
        assert SSE(web, params={"token": "nope-nope-nope"}).closed.wait(10)
    finally:
        reader.close()
        writer.close()
        web.stop()


def test_off_loopback_without_tokens_it_refuses_to_start(tmp_path):
    r = run_module("-m", "client.web", "--listen", "0.0.0.0:0")
    assert r.returncode != 0
    assert "--tokens" in r.stderr and "loopback" in r.stderr
    bad = tmp_path / "tokens"
    bad.write_text("abc superuser\n")
    r = run_module("-m", "client.web", "--tokens", str(bad), "--listen", "127.0.0.1:0")
    assert r.returncode != 0 and "tokens:1" in r.stderr


def test_https_with_certfile_and_keyfile(grid, tmp_path):
    cert, key = self_signed(tmp_path)
    web = start_web(grid, "--certfile", cert, "--keyfile", key)
    try:
        assert web.url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=cert), timeout=20) as c:
            r = c.get(f"{web.url}/api/status")
            assert r.status_code == 200 and "strict-transport-security" in r.headers
    finally:
        web.stop()


def test_sigterm_stops_the_gateway_cleanly(grid):
    web = start_web(grid)
    web.proc.send_signal(signal.SIGTERM)
    assert web.proc.wait(timeout=15) == 0
    web.stop()
