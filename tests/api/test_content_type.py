"""JSON bodies are accepted whatever Content-Type the client sent, on every JSON-body route.

`curl -d '{...}'` sends `Content-Type: application/x-www-form-urlencoded` (curl's manual, `-d`:
"... in the same way that a browser does when a user has filled in an HTML form ... using the
content-type application/x-www-form-urlencoded"), which is how the README's examples are pasted.
The routes are found in the app's own OpenAPI document, so a new JSON-body route is covered
without editing this test; each must carry an OpenAPI example body (used as the request here).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from api.routes.jobs import EXAMPLE_FILE_ID
from tests.api.conftest import auth

CONTENT_TYPES = [
    None,  # no header at all
    "application/x-www-form-urlencoded",  # curl -d
    "text/plain; charset=utf-8",
    "application/octet-stream",
]


def _json_body_routes(app: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, example body) of every operation whose request body is JSON."""
    routes = []
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            media = (operation.get("requestBody") or {}).get("content", {})
            if "application/json" not in media:
                continue
            examples = media["application/json"].get("examples") or {}
            assert examples, f"{method.upper()} {path}: give the body an OpenAPI example"
            routes.append((method.upper(), path, next(iter(examples.values()))["value"]))
    return routes


def _send(client: Any, method: str, path: str, body: bytes, key: str, content_type: str | None):
    headers = auth(key)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.request(method, path, content=body, headers=headers)


def test_every_json_body_route_accepts_json_under_any_content_type(
    app, client, tenant_keys
) -> None:
    key = tenant_keys["a"]
    job = client.post(
        "/jobs", json={"base_model": "m", "dataset_uri": "/d.jsonl"}, headers=auth(key)
    ).json()
    # the examples name an uploaded file (what dataset_uri takes): upload one for them
    row = b'{"problem": "1 + 1", "solution": "\\boxed{2}", "answer": "2"}\n'
    upload = {"file": ("d.jsonl", row)}
    file_id = client.post("/files", files=upload, headers=auth(key)).json()["id"]
    routes = _json_body_routes(app)
    assert ("POST", "/jobs") in {(m, p) for m, p, _ in routes}
    assert ("POST", "/jobs/{job_id}/evals") in {(m, p) for m, p, _ in routes}
    for method, template, example in routes:
        path = template.replace("{job_id}", job["id"])
        assert not re.search(r"\{\w+\}", path), f"no value for the parameters of {template}"
        body = json.dumps(example).replace(EXAMPLE_FILE_ID, file_id).encode()
        reference = _send(client, method, path, body, key, "application/json")
        assert reference.status_code != 422, (template, reference.text)
        for content_type in CONTENT_TYPES:
            response = _send(client, method, path, body, key, content_type)
            if response.status_code == 409 and reference.status_code == 201:
                # one at a time (a job's pre-flight): the body was parsed and validated before
                # the route found the first request still in progress
                assert response.json()["error"]["code"].endswith("_in_progress"), response.text
                continue
            assert response.status_code == reference.status_code, (
                template,
                content_type,
                response.text,
            )
            if response.status_code in (200, 201):
                assert response.json()["object"] == reference.json()["object"]
            else:
                assert response.json()["error"]["code"] == reference.json()["error"]["code"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_a_body_that_is_not_json_is_still_a_422_naming_the_body(
    client, tenant_keys, content_type
) -> None:
    response = _send(client, "POST", "/jobs", b"base_model=m&x=1", tenant_keys["a"], content_type)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def test_the_size_limit_still_applies_to_bodies_of_any_type(client, tenant_keys) -> None:
    body = json.dumps({"base_model": "m", "dataset_uri": "/d", "metadata": {"x": "y" * 70_000}})
    response = _send(
        client,
        "POST",
        "/jobs",
        body.encode(),
        tenant_keys["a"],
        "application/x-www-form-urlencoded",
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
