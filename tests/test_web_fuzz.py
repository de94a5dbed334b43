"""Property-based fuzzing of gridq-web from its own OpenAPI schema (Schemathesis): no 5xx, every answer
matches the published schema, input the schema calls invalid is refused with a 4xx, and the gateway and
the broker keep serving afterwards."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.web_support import web_grid

#: the fuzzer's token (the gateway runs with --tokens, so the schema's security is real)
TOKEN = "fuzz-token-submit"
#: examples per operation and mode: enough to find type and bound mistakes, small enough for < 60 s
EXAMPLES = 25


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webfuzz")
    (tmp / "tokens").write_text(f"{TOKEN} submit\nread-only-token read\n")
    # tasks the fuzzer submits name no real task: they fail fast instead of waiting 10 s; a 503 counts as
    # a failure here, so the gateway waits long for a broker slowed by a loaded machine
    with web_grid(tmp, broker_args=("--no-worker-timeout", "0.5"),
                  web_args=("--tokens", str(tmp / "tokens"), "--broker-wait", "20"), token=TOKEN) as cluster:
        yield cluster


def operations(url: str) -> list:
    # the event stream never ends: it has its own tests (test_web_api.py)
    schema = schemathesis.openapi.from_url(url + "/openapi.json").exclude(path="/api/events")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_answer_matches_the_published_schema(grid, mode):
    # Schemathesis' own pytest plugin does not load under pytest 9 yet: drive its strategies with hypothesis
    ops = operations(grid.web.url)
    assert {op.label for op in ops} >= {"POST /api/tasks", "GET /api/tasks/{task_id}", "DELETE /api/tasks/{task_id}",
                                       "GET /api/tasks", "GET /api/status", "GET /healthz", "GET /metrics"}
    fuzzed = []
    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None, phases=[Phase.explicit, Phase.generate, Phase.shrink])  # no slow "explain" tracing
        def fuzz(case):
            negated = case.operation.schema.is_security_param_negated(case)  # a case testing a missing token
            response = case.call(headers={} if negated else {"Authorization": f"Bearer {TOKEN}"}, timeout=30)
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
            if mode is GenerationMode.POSITIVE and response.status_code in (400, 413, 422):
                # the one refusal of schema-valid input: JSON integers beyond 64 bits cannot travel (msgpack)
                assert "cannot be sent to a worker" in response.text, response.text

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, op.label  # nothing of it can be made invalid
            continue
        fuzzed.append(op.label)
    assert "POST /api/tasks" in fuzzed and "GET /api/tasks" in fuzzed


def test_after_the_fuzzing_the_gateway_and_broker_still_serve(grid):
    web = grid.web
    assert web.get("/healthz").status_code == 200
    assert web.result(web.submit("square", 9))["result"] == 81
