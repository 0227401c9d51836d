"""The SDK's response models agree with the live server's OpenAPI document.

For each operation the SDK calls, the server's success-response schema is walked field by field
and compared with the JSON schema of the SDK model that parses it: every server field must exist
in the model with a type that accepts every value the server may send (an integer fits a
number, an enum fits a wider enum or a string, `null` needs an optional field), and the model
must not require a field the server does not have. Evals are checked in `test_evals.py`.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from opsd_client.models import (
    CheckpointList,
    EventList,
    Job,
    JobList,
    Metrics,
    Preflight,
    PreflightList,
)
from tests.opsd_client.service import LiveService

JOB_OPERATIONS: list[tuple[str, str, str, type[BaseModel]]] = [
    ("post", "/jobs", "201", Job),
    ("get", "/jobs", "200", JobList),
    ("get", "/jobs/{job_id}", "200", Job),
    ("post", "/jobs/{job_id}/cancel", "200", Job),
    ("get", "/jobs/{job_id}/metrics", "200", Metrics),
    ("get", "/jobs/{job_id}/events", "200", EventList),
    ("get", "/jobs/{job_id}/checkpoints", "200", CheckpointList),
    ("post", "/jobs/{job_id}/preflight", "201", Preflight),
    ("get", "/jobs/{job_id}/preflight", "200", Preflight),
    ("get", "/jobs/{job_id}/preflights", "200", PreflightList),
]

Schema = dict[str, Any]


def _resolve(schema: Schema | bool, defs: dict[str, Schema]) -> Schema:
    if schema is True:
        return {}
    if schema is False:
        return {"not": {}}
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _variants(schema: Schema, defs: dict[str, Schema]) -> list[Schema]:
    schema = _resolve(schema, defs)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return [v for option in schema[key] for v in _variants(option, defs)]
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _variants(schema["allOf"][0], defs)
    if isinstance(schema.get("type"), list):
        return [{**schema, "type": t} for t in schema["type"]]
    return [schema]


def _kind(schema: Schema) -> str:
    if "const" in schema or "enum" in schema:
        return "enum"
    if "type" not in schema:
        return "any"
    if schema["type"] == "object":
        return "model" if "properties" in schema else "map"
    return str(schema["type"])


def _enum_values(schema: Schema) -> set[Any]:
    return {schema["const"]} if "const" in schema else set(schema["enum"])


def _accepts(sdk: Schema, server: Schema, sdk_defs: dict, server_defs: dict, where: str) -> str:
    """'' when the SDK variant `sdk` accepts every value of the server variant `server`."""
    sdk_kind, server_kind = _kind(sdk), _kind(server)
    if sdk_kind == "any":
        return ""
    if server_kind == "enum":
        values = _enum_values(server)
        if sdk_kind == "enum":
            missing = values - _enum_values(sdk)
            return f"{where}: SDK enum lacks {sorted(missing)}" if missing else ""
        types = {type(v).__name__ for v in values}
        return "" if sdk_kind == {"str": "string"}.get(types.pop(), "?") else f"{where}: enum"
    if server_kind == "any":
        return f"{where}: the server allows any value, the SDK only {sdk_kind}"
    if server_kind == "integer" and sdk_kind in {"integer", "number"}:
        return ""
    if server_kind in {"string", "number", "boolean", "null"}:
        if sdk_kind != server_kind:
            return f"{where}: server {server_kind}, SDK {sdk_kind}"
        if server.get("format") == "date-time" and sdk.get("format") != "date-time":
            return f"{where}: the SDK does not parse date-times"
        return ""
    if server_kind == "array":
        if sdk_kind != "array":
            return f"{where}: server array, SDK {sdk_kind}"
        return "; ".join(
            _compare(sdk.get("items", {}), server.get("items", {}), sdk_defs, server_defs, where)
        )
    if server_kind == "map":
        if sdk_kind == "map":
            sdk_values = sdk.get("additionalProperties", True)
            server_values = server.get("additionalProperties", True)
            return "; ".join(
                _compare(sdk_values, server_values, sdk_defs, server_defs, f"{where}.*")
            )
        if sdk_kind == "model" and not sdk.get("required"):
            return ""  # the SDK documents the shape of a free-form object; all fields optional
        return f"{where}: server object, SDK {sdk_kind}"
    if server_kind == "model":
        if sdk_kind == "map":
            return "" if sdk.get("additionalProperties", True) in (True, {}) else f"{where}: map"
        if sdk_kind != "model":
            return f"{where}: server object, SDK {sdk_kind}"
        problems: list[str] = []
        sdk_props = sdk["properties"]
        for name, prop in server["properties"].items():
            if name not in sdk_props:
                problems.append(f"{where}.{name}: missing from the SDK model")
                continue
            problems += _compare(sdk_props[name], prop, sdk_defs, server_defs, f"{where}.{name}")
        for name in sdk.get("required", []):
            if name not in server["properties"]:
                problems.append(f"{where}.{name}: required by the SDK, unknown to the server")
        return "; ".join(problems)
    return f"{where}: unhandled server schema {server}"


def _compare(
    sdk: Schema | bool, server: Schema | bool, sdk_defs: dict, server_defs: dict, where: str
) -> list[str]:
    problems = []
    sdk_variants = _variants(sdk if isinstance(sdk, dict) else {}, sdk_defs)
    for variant in _variants(server if isinstance(server, dict) else {}, server_defs):
        answers = [_accepts(s, variant, sdk_defs, server_defs, where) for s in sdk_variants]
        if all(answers):
            problems.append(" | ".join(sorted(set(answers))))
    return problems


def response_schema(openapi: Schema, method: str, path: str, status: str) -> Schema:
    operation = openapi["paths"][path][method]
    return operation["responses"][status]["content"]["application/json"]["schema"]


def disagreements(openapi: Schema, method: str, path: str, status: str, model: type) -> list[str]:
    server = response_schema(openapi, method, path, status)
    sdk = model.model_json_schema(mode="validation")
    where = f"{method.upper()} {path}"
    return _compare(
        sdk, server, sdk.get("$defs", {}), openapi.get("components", {}).get("schemas", {}), where
    )


@pytest.fixture(scope="module")
def openapi(service: LiveService) -> Schema:
    return httpx.get(f"{service.base_url}/openapi.json", timeout=10).json()


@pytest.mark.parametrize(
    ("method", "path", "status", "model"),
    JOB_OPERATIONS,
    ids=[f"{m.upper()} {p}" for m, p, _, _ in JOB_OPERATIONS],
)
def test_sdk_models_accept_every_field_the_server_documents(
    openapi: Schema, method: str, path: str, status: str, model: type[BaseModel]
) -> None:
    assert disagreements(openapi, method, path, status, model) == []


def test_the_comparison_notices_a_missing_field_and_a_wrong_type(openapi: Schema) -> None:
    class Narrow(BaseModel):
        id: str
        status: int

    problems = disagreements(openapi, "get", "/jobs/{job_id}", "200", Narrow)
    joined = "\n".join(problems)
    assert "progress: missing from the SDK model" in joined
    assert "status" in joined and "attempt: missing" in joined
