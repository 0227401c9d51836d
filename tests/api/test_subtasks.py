"""`api.subtasks`: a pre-flight submitted while the broker is down is answered 503 and leaves
nothing behind (the evals' case is in tests/evals/test_eval_api.py), on the real app and store;
a worker's progress document is shown when it fits the response model and left out when not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.routes.preflight import PreflightProgressOut
from api.schemas import EvalProgressOut
from api.subtasks import progress_or_none


def test_a_preflight_with_the_broker_down_answers_503_and_leaves_nothing(
    settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from api.app import create_app

    app = create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    with TestClient(app, raise_server_exceptions=False) as client:
        store = app.state.store
        key = store.create_api_key("alice")
        tenant = store.authenticate(key)
        job, _ = store.create_job(tenant.id, spec={"base_model": "m", "dataset_uri": "/d.jsonl"})
        response = client.post(
            f"/jobs/{job.id}/preflight", json={}, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "queue_unavailable"
        assert response.headers["Retry-After"] == "5"
        assert store.list_preflights(job.id) == []
    assert any("could not enqueue" in r.getMessage() for r in caplog.records)


def test_progress_is_shown_when_it_fits_the_model() -> None:
    eval_doc = {"role": "base", "done": 3, "total": 8, "samples_per_s": 1.5}
    assert progress_or_none(EvalProgressOut, eval_doc) == EvalProgressOut(**eval_doc)
    shown = progress_or_none(PreflightProgressOut, {"phase": "teacher", "done": 1, "total": 2})
    assert shown == PreflightProgressOut(phase="teacher", done=1, total=2)
    assert progress_or_none(EvalProgressOut, None) is None
    assert progress_or_none(EvalProgressOut, {}) is None
    assert progress_or_none(PreflightProgressOut, {"phase": "nope", "done": 1, "total": 2}) is None
    assert progress_or_none(EvalProgressOut, {"done": "x"}) is None
