"""kvtier_controller's REST API against its own OpenAPI document, on a live controller process:
schemathesis generates requests for every operation (valid ones and, in its negative mode, invalid
ones), bounded in examples and derandomized so a run is repeatable; no answer may be a 5xx or
break the documented response schema. Then the cases a fuzzer does not reliably reach: malformed
JSON, unknown instance ids, bodies over the limit, and the bearer token (missing, wrong, malformed).

Two controllers: the index and admin endpoints are fuzzed on one where nothing registers, so a
generated pin or clear never reaches a made-up instance address (a 502 there is documented
behaviour, not a bug); the agent endpoints (register, heartbeat, events) on the other.
"""

from __future__ import annotations

import json
import re

import hypothesis
import pytest
import schemathesis
from fleet_processes import TOKEN, running_fleet
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

MAX_EXAMPLES = 25  # per operation and generation mode
MAX_BODY_BYTES = 1 << 20
CONFIG = {"max_body_bytes": MAX_BODY_BYTES, "command_timeout_s": 2.0}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AGENT = re.compile(r"^POST /v1/instances/")
# The issue's endpoints; every operation the document has must be one of them (a new one is fuzzed
# once it is added here).
OPERATIONS = ["GET /health", "GET /metrics", "GET /v1/instances", "GET /v1/stats", "POST /v1/lookup",
              "POST /v1/route", "POST /v1/pin", "POST /v1/unpin", "POST /v1/move", "POST /v1/compress",
              "POST /v1/decompress", "POST /v1/clear",
              "POST /v1/instances/register", "POST /v1/instances/{}/heartbeat",
              "POST /v1/instances/{}/events", "POST /v1/peers"]
PROMPT = {"model_id": "m", "tokens": [1, 2, 3]}


@pytest.fixture(scope="module")
def controllers(tmp_path_factory):
    """(the controller for index and admin endpoints, the one for agent endpoints)."""
    with running_fleet(tmp_path_factory.mktemp("schemathesis")) as fleet:
        yield fleet.start_controller(CONFIG, name="admin"), fleet.start_controller(CONFIG, name="agent")


def operation_name(method: str, path: str) -> str:
    return f"{method.upper()} {re.sub(r'{[^}]*}', '{}', path)}"


def schema_of(controller) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_dict(controller.client().get("/openapi.json"))


def operations(schema) -> dict:
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[operation_name(operation.method, operation.path)] = operation
    return found


def test_the_document_lists_exactly_the_issues_endpoints(controllers):
    assert sorted(operations(schema_of(controllers[0]))) == sorted(OPERATIONS)


@pytest.mark.parametrize("name", OPERATIONS)
def test_generated_requests_get_no_5xx_and_answers_match_the_schema(controllers, name):
    controller = controllers[1] if AGENT.match(name) else controllers[0]
    schema = schema_of(controller)
    operation = operations(schema).get(name)
    if operation is None:
        pytest.fail(f"{name} is not in /openapi.json")
    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            response = case.call(base_url=controller.url, headers=AUTH)
            case.validate_response(response, checks=checks)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # Nothing to get wrong: an operation without parameters or a body has no negative cases.
            assert mode is GenerationMode.NEGATIVE and name.startswith("GET "), name


# -- explicit cases ------------------------------------------------------------------------------

def detail(body) -> str:
    """The error message of a JSON error body (FastAPI's validation list counts as a message)."""
    assert isinstance(body, dict) and body.get("detail"), body
    return body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])


@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/route", "/v1/pin", "/v1/move", "/v1/clear",
                                  "/v1/instances/register", "/v1/instances/i1/heartbeat",
                                  "/v1/instances/i1/events"])
@pytest.mark.parametrize("body", [b"{", b"not json", b"[1, 2", b"\xff\xfe", b"", b"null", b"[]", b'"text"'])
def test_malformed_json_is_a_4xx_with_a_message(controllers, path, body):
    controller = controllers[1] if path.startswith("/v1/instances/") else controllers[0]
    status, reply, _ = controller.request("POST", path, body, {**AUTH, "Content-Type": "application/json"})
    assert status in (400, 422), (status, reply)
    detail(reply)


@pytest.mark.parametrize("path,body,status", [
    ("/v1/pin", {**PROMPT, "instance_id": "nobody"}, 404),
    ("/v1/unpin", {**PROMPT, "instance_id": "nobody"}, 404),
    ("/v1/move", {**PROMPT, "instance_id": "nobody", "to": "disk"}, 404),
    ("/v1/clear", {"instance_id": "nobody"}, 404),
    ("/v1/pin", {**PROMPT, "instance_id": "../etc"}, 422),  # not an instance id at all
    ("/v1/lookup", {**PROMPT, "tokens": [-1]}, 422),
    ("/v1/lookup", {**PROMPT, "tokens": [2**32]}, 422),
    ("/v1/lookup", {**PROMPT, "tokens": [1.5]}, 422),
    ("/v1/route", {**PROMPT, "tokens": "123"}, 422),
    ("/v1/lookup", {**PROMPT, "extra": 1}, 422),
    ("/v1/lookup", {"tokens": [1]}, 422),
])
def test_bad_requests_are_4xx_with_a_message(controllers, path, body, status):
    got, reply, _ = controllers[0].request("POST", path, json.dumps(body).encode(),
                                           {**AUTH, "Content-Type": "application/json"})
    assert got == status, (got, reply)
    message = detail(reply)
    if status == 404:
        assert "nobody" in message


def test_unknown_instances_are_told_to_register(controllers):
    client = controllers[1].client()
    assert client.post("/v1/instances/ghost/heartbeat", {"session": "s", "tiers": []}) == {"known": False}
    reply = client.post("/v1/instances/ghost/events", {"session": "s", "seq": 1, "events": []})
    assert reply["known"] is False


def test_a_body_over_the_limit_is_413_with_a_message(controllers):
    body = json.dumps({"model_id": "m", "tokens": [7] * (MAX_BODY_BYTES // 2)}).encode()
    status, reply, _ = controllers[0].request("POST", "/v1/lookup", body,
                                              {**AUTH, "Content-Type": "application/json"})
    assert status == 413, (status, reply)
    detail(reply)


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token-0123456789"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer "},
    {"Authorization": f"bearer  {TOKEN} trailing"},
])
@pytest.mark.parametrize("name", OPERATIONS[1:])
def test_a_missing_or_wrong_token_is_401_everywhere_but_health(controllers, headers, name):
    method, path = name.split(" ")
    body = json.dumps(PROMPT).encode() if method == "POST" else None
    status, reply, response = controllers[1].request(method, path.replace("{}", "i1"), body,
                                                     {**headers, "Content-Type": "application/json"})
    assert status == 401, (name, headers, status, reply)
    assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
    detail(reply)
    assert TOKEN not in json.dumps(reply)


def test_the_openapi_document_needs_the_token_too(controllers):
    # "Every endpoint but /health requires the token" (the issue; kvtier.controller.app's docstring).
    status, reply, response = controllers[0].request("GET", "/openapi.json")
    assert status == 401, (status, str(reply)[:200])
    assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
    assert controllers[0].request("GET", "/openapi.json", headers=AUTH)[0] == 200


def test_health_needs_no_token(controllers):
    status, reply, _ = controllers[0].request("GET", "/health")
    assert (status, reply) == (200, {"status": "ok"})
