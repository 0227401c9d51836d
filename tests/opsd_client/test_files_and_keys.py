"""The SDK's and CLI's Files API and admin keys against the real running service (`opsd up`).

`client.files.create/list/retrieve/delete` and `opsd files upload/list/show/delete` with real
uploads; `client.keys.list/revoke` with the service's first key (an admin key: `opsd up` makes
one for its single user) and `opsd keys list/revoke` on the service's store. A revoked key is
refused on the next request. The SDK models agree with the server's OpenAPI document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from opsd_cli import app
from opsd_client import Client
from opsd_client.errors import (
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableEntityError,
)
from opsd_client.models import ApiKeyList, File, FileList
from tests.opsd_client.service import LiveService
from tests.opsd_client.test_openapi_agreement import disagreements

ROWS = [{"problem": f"{i} + 2", "solution": f"\\boxed{{{i + 2}}}"} for i in range(5)]
runner = CliRunner()


def _dataset(tmp_path: Path, rows: list[dict[str, Any]] = ROWS, name: str = "t.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sdk_files_round_trip_and_jobs_take_their_ids(
    client: Client, service: LiveService, tmp_path: Path, tiny_model_dir: Path
) -> None:
    file = client.files.create(_dataset(tmp_path))
    assert file.id.startswith("file-") and (file.rows, file.fields) == (5, ["problem", "solution"])
    assert client.files.retrieve(file.id) == file
    assert file.id in [f.id for f in client.files.list()]
    job = client.jobs.create(base_model=str(tiny_model_dir), dataset_uri=file.id)
    assert job.spec["dataset_uri"] == file.id and job.status == "queued"
    client.jobs.cancel(job.id)
    bad = _dataset(tmp_path, name="bad.jsonl")
    bad.write_text('{"problem": "x"}\nnot json\n')
    with pytest.raises(UnprocessableEntityError) as caught:
        client.files.create(bad)
    assert caught.value.param == "file" and "line 2" in caught.value.message
    other = Client(base_url=service.base_url, api_key=service.new_key("files-other"))
    with other, pytest.raises(NotFoundError):
        other.files.retrieve(file.id)
    assert client.files.delete(file.id).deleted
    with pytest.raises(NotFoundError):
        client.files.retrieve(file.id)


async def _async_round_trip(service: LiveService, path: Path) -> None:
    from opsd_client import AsyncClient

    async with AsyncClient(base_url=service.base_url, api_key=service.api_key) as client:
        file = await client.files.create(path)
        assert (await client.files.retrieve(file.id)).rows == 5
        assert file.id in [f.id for f in await client.files.list()]
        assert (await client.files.delete(file.id)).deleted
        assert any(k.admin for k in await client.keys.list())


def test_async_files_and_keys(service: LiveService, tmp_path: Path) -> None:
    import asyncio

    asyncio.run(_async_round_trip(service, _dataset(tmp_path)))


def test_cli_files_commands(service: LiveService, tmp_path: Path) -> None:
    env = {"OPSD_BASE_URL": service.base_url, "OPSD_API_KEY": service.api_key}
    uploaded = runner.invoke(app, ["files", "upload", str(_dataset(tmp_path))], env=env)
    assert uploaded.exit_code == 0, uploaded.output
    file_id = uploaded.stdout.strip().splitlines()[-1]
    assert file_id.startswith("file-")
    listed = runner.invoke(app, ["files", "list", "--json"], env=env)
    assert file_id in [f["id"] for f in json.loads(listed.stdout)]
    shown = runner.invoke(app, ["files", "show", file_id], env=env)
    assert shown.exit_code == 0 and "5 rows" in shown.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text('problem\n"unterminated\n')
    refused = runner.invoke(app, ["files", "upload", str(bad)], env=env)
    assert refused.exit_code == 2 and "line 2" in refused.output
    assert runner.invoke(app, ["files", "delete", file_id], env=env).exit_code == 0
    assert runner.invoke(app, ["files", "show", file_id], env=env).exit_code == 3


def test_keys_list_and_revoke_through_the_sdk_and_the_cli(
    client: Client, service: LiveService
) -> None:
    victim = service.new_key("keys-victim")
    with Client(base_url=service.base_url, api_key=victim) as theirs:
        assert theirs.jobs.list(limit=1) is not None
        with pytest.raises(PermissionDeniedError):
            theirs.keys.list()
        keys = client.keys.list()
        record = next(k for k in keys if k.tenant == "keys-victim")
        assert record.prefix == victim.split("_")[1] and record.revoked_at is None
        assert client.keys.revoke(record.id).revoked_at is not None
        with pytest.raises(AuthenticationError):
            list(theirs.jobs.list(limit=1))
    # the service-side commands work on the service's store
    env = {"OPSD_DATABASE_URL": f"sqlite:///{service.home / 'opsd.db'}"}
    other = service.new_key("keys-cli")
    listed = runner.invoke(app, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and "keys-cli" in listed.stdout and "keys-victim" in listed.stdout
    prefix = other.split("_")[1]
    assert runner.invoke(app, ["keys", "revoke", prefix], env=env).exit_code == 0
    with (
        Client(base_url=service.base_url, api_key=other) as revoked,
        pytest.raises(AuthenticationError),
    ):
        list(revoked.jobs.list(limit=1))
    assert runner.invoke(app, ["keys", "revoke", "key_nope"], env=env).exit_code == 3


@pytest.mark.parametrize(
    ("method", "path", "status", "model"),
    [
        ("post", "/files", "201", File),
        ("get", "/files", "200", FileList),
        ("get", "/files/{file_id}", "200", File),
        ("get", "/keys", "200", ApiKeyList),
    ],
)
def test_sdk_models_agree_with_the_openapi_document(
    service: LiveService, method: str, path: str, status: str, model: Any
) -> None:
    import httpx

    openapi = httpx.get(f"{service.base_url}/openapi.json", timeout=10).json()
    assert disagreements(openapi, method, path, status, model) == []
