"""Schemathesis against ``/schema`` of a real server: whatever it sends (valid or not),
no 5xx, and every answer matches the schema (status, content type, body, headers).

Bounded to a few examples per operation so the whole run stays well under two minutes.
It acts as an admin (with a token), so every route is reachable.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
import yaml
from schemathesis import GenerationMode
from api_harness import write_configs
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serverproc import ServerProcess

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
EXAMPLES_PER_OPERATION = 10


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("schemathesis") / "data"
    write_configs(data_dir)
    server = ServerProcess(data_dir, gpus="4xA100:40").start()
    try:
        created = httpx.post(server.url + "/api/users", json={"name": "root", "level": "admin"})
        assert created.status_code == 201, created.text
        yield server, created.json()["token"]
    finally:
        server.stop(kill_jobs=True)


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/schema")  # where SPEC section 7 puts it
    return [result.ok() for result in schema.get_all_operations()]


def exercise(operation, mode: GenerationMode, url: str, token: str) -> None:
    """A bounded Hypothesis run of one operation; a failing check raises (shrunk)."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def run(case) -> None:
        case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"},
                               checks=CHECKS, timeout=30)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid-input", "invalid-input"])
def test_every_operation_answers_within_its_schema(live_server, mode) -> None:
    server, token = live_server
    found = operations(server.url)
    assert len(found) >= 25
    for operation in found:
        exercise(operation, mode, server.url, token)


def test_the_schema_documents_every_endpoint(live_server) -> None:
    server, _ = live_server
    answer = httpx.get(server.url + "/schema")
    assert answer.status_code == 200
    document = answer.json()
    assert document["openapi"].startswith("3.")
    assert httpx.get(server.url + "/schema/openapi.json").json() == document
    as_yaml = httpx.get(server.url + "/schema/openapi.yaml")
    assert as_yaml.status_code == 200 and yaml.safe_load(as_yaml.text) == document
    page = httpx.get(server.url + "/schema/redoc")  # a page to browse it
    assert (page.status_code, page.headers["content-type"].split(";")[0]) == (200, "text/html")
    paths = document["paths"]
    expected = {
        ("post", "/api/queue/submit"), ("get", "/api/queue"), ("get", "/api/queue/stats"),
        ("get", "/api/queue/me"), ("get", "/api/queue/position/{job_id}"),
        ("get", "/api/queue/{job_id}"), ("get", "/api/queue/{job_id}/explain"),
        ("post", "/api/queue/{job_id}/cancel"), ("post", "/api/queue/cancel"),
        ("post", "/api/queue/{job_id}/approve"), ("post", "/api/queue/{job_id}/reject"),
        ("post", "/api/queue/{job_id}/priority"), ("get", "/api/queue/concurrency"),
        ("post", "/api/queue/concurrency"), ("post", "/api/queue/process"),
        ("post", "/api/queue/cleanup"), ("get", "/api/users"), ("post", "/api/users"),
        ("patch", "/api/users/{user_id}"), ("post", "/api/users/{user_id}/tokens"),
        ("delete", "/api/users/{user_id}/tokens/{token_id}"), ("get", "/api/configs"),
        ("get", "/api/configs/{name}"), ("put", "/api/configs/{name}"),
        ("get", "/api/audit/export"),
    }
    documented = {(method, path) for path, item in paths.items() for method in item}
    assert expected <= documented
    submit = paths["/api/queue/submit"]["post"]
    assert {"200", "201", "400", "401", "404", "409", "413", "422"} <= set(submit["responses"])
    assert "BearerToken" in document["components"]["securitySchemes"]


def test_the_schema_states_what_the_server_enforces(live_server) -> None:
    """A client generated from the schema refuses what the server refuses: bounds of 0
    included (Litestar drops those unless told), our error body on every status, text
    for the logs."""
    server, _ = live_server
    document = httpx.get(server.url + "/schema").json()
    models = document["components"]["schemas"]
    bound = {(model, field): {k: v for k, v in models[model]["properties"][field].items()
                              if k in ("minimum", "exclusiveMinimum", "maximum")}
             for model, field in [("SubmitRequest", "num_processes"),
                                  ("SubmitRequest", "estimated_cost"),
                                  ("PriorityRequest", "priority"),
                                  ("ConcurrencyUpdate", "starvation_boost"),
                                  ("ConcurrencyUpdate", "approval_timeout_hours"),
                                  ("ConcurrencyUpdate", "cancel_grace_seconds"),
                                  ("ConfigBody", "num_processes")]}
    assert bound == {
        ("SubmitRequest", "num_processes"): {"minimum": 0},
        ("SubmitRequest", "estimated_cost"): {"minimum": 0},
        ("PriorityRequest", "priority"): {"minimum": 0, "maximum": 100},
        ("ConcurrencyUpdate", "starvation_boost"): {"minimum": 0},
        ("ConcurrencyUpdate", "approval_timeout_hours"): {"exclusiveMinimum": 0},
        ("ConcurrencyUpdate", "cancel_grace_seconds"): {"minimum": 0, "maximum": 3600},
        ("ConfigBody", "num_processes"): {"minimum": 0},
    }
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if not path.startswith("/api/"):
                continue
            for status in ("400", "401", "422"):
                content = operation["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (
                    method, path, status)
    logs = document["paths"]["/api/queue/{job_id}/logs"]["get"]
    assert logs["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    offset = next(p for p in logs["parameters"] if p["name"] == "offset")
    assert offset["schema"]["minimum"] == 0
