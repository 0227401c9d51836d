"""Fuzzing every operation of the HTTP API with schemathesis, every check on (`--checks all`).

Generated from the app's own OpenAPI document, positive and negative examples (a bounded number
per operation) go to the real app on a real store (SQLite) and a real Redis broker, with a valid
key. Zero server errors, and every answer must conform to the document: status codes,
content types, headers (`Allow` on 405), response schemas; schema-violating requests must be
rejected and the document's constraints must match what the server enforces. Issue 11: the
report found 500s for inputs that passed validation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig

from tests.api.conftest import REDIS_TEST_URL
from tests.service_fixtures import sqlite_url

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from api.app import create_app
    from jobstore.migrate import upgrade
    from opsd_service.settings import ServiceSettings

    root = tmp_path_factory.mktemp("fuzz")
    url = sqlite_url(root / "opsd.db")
    upgrade(url)
    settings = ServiceSettings(
        home=root / "home",
        database_url=url,
        broker_url=REDIS_TEST_URL,
        artifacts_uri=str(root / "artifacts"),
        queue="fuzz",
        dataset_uri_policy=json.dumps({"*": [str(root / "data")]}),
        max_queued_jobs_per_tenant=10_000,
    )
    app = create_app(settings)
    app.state.fuzz_key = app.state.store.create_api_key("fuzzer", admin=True)
    (root / "data").mkdir()
    yield app
    app.state.store.close()


# Schema-valid requests may still be refused for what JSON Schema cannot say: a dataset the
# tenant's policy does not allow or whose fields do not fit (422), an id that does not exist
# (404), a quota (429). Everything else the server enforces is in the document.
CONFIG = {
    "checks": {
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429"]
        }
    }
}


def _operations(app: Any) -> list[Any]:
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    return [result.ok() for result in schema.get_all_operations()]


def test_the_fuzzer_covers_every_operation(fuzz_app: Any) -> None:
    labels = {operation.label for operation in _operations(fuzz_app)}
    for path, item in fuzz_app.openapi()["paths"].items():
        for method in item:
            assert f"{method.upper()} {path}" in labels


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_a_server_error_or_breaks_its_contract(
    fuzz_app: Any, mode: GenerationMode
) -> None:
    # schemathesis's pytest plugin (`schema.parametrize`) does not run on pytest 9, so each
    # operation's strategy is driven by hypothesis here, with the same checks.
    load_all_checks()
    checks = list(CHECKS.get_all())
    headers = {"Authorization": f"Bearer {fuzz_app.state.fuzz_key}"}
    failures = []
    for operation in _operations(fuzz_app):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=checks)

        try:
            run()
        except Unsatisfiable:  # no parameters at all: nothing to make invalid (GET /healthz)
            assert mode is GenerationMode.NEGATIVE, operation.label
            assert not list(operation.iter_parameters()) and not operation.body, operation.label
        except Exception as exc:  # every operation is fuzzed; all failures are reported
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
