"""The OpenAPI schema says what the server does (issue 13.8), checked by schemathesis against a
live tiny server: no 5xx, and every status, content type and body as documented."""

import json
import subprocess
import sys

import httpx
import pytest
from server_util import MODEL, RunningServer, tiny_core_factory

from server.api.app import create_app
from server.config import ServerSettings

ERROR_STATUSES = {"400", "401", "404", "413", "429", "503"}
MAX_TOKENS = 8
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,negative_data_rejection"
)


def test_schema_documents_errors_not_422() -> None:
    schema = create_app(ServerSettings(model=MODEL)).openapi()
    assert "422" not in json.dumps(schema["paths"]) and "HTTPValidationError" not in json.dumps(schema)
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert ERROR_STATUSES <= set(responses), path
        for status in ERROR_STATUSES:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse"
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "503" in schema["paths"]["/ready"]["get"]["responses"]


def bounded(schema: dict) -> dict:
    """The served schema with one model name and at most MAX_TOKENS tokens per request, so
    that generated requests reach the engine and finish quickly. (min_tokens is left alone:
    its bound would make schemathesis send 9 as "invalid" and fail when the server takes it;
    a min_tokens above max_tokens is a 400 anyway.)"""
    components = schema["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components[name]["properties"]
        properties["model"] = {"type": "string", "enum": [MODEL]}
        for field in ("max_tokens", "max_completion_tokens"):
            for option in properties.get(field, {}).get("anyOf", [properties.get(field, {})]):
                if option.get("type") == "integer":
                    option["maximum"] = MAX_TOKENS
    return schema


SCHEMATHESIS_ARGS = [
    "--checks",
    CHECKS,
    "--phases",
    "examples,coverage,fuzzing",
    "--max-examples",
    "100",
    "--max-time",
    "110",
    "--seed",
    "13",
    "--workers",
    "2",
    "--request-timeout",
    "60",
    "--no-color",
    "--suppress-health-check",
    "all",
    "--warnings",
    "off",
]


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path) -> None:
    """About two minutes of generated requests (valid and invalid) against every route."""
    with RunningServer(tiny_core_factory(max_num_seqs=8), max_body_bytes=65536) as srv:
        srv.wait_ready()
        schema_file = tmp_path / "openapi.json"
        schema_file.write_text(json.dumps(bounded(httpx.get(f"{srv.url}/openapi.json").json())))
        command = [f"{sys.prefix}/bin/schemathesis", "run", str(schema_file), "--url", srv.url, *SCHEMATHESIS_ARGS]
        done = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
