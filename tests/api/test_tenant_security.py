"""Issue 11 against the real app (PostgreSQL and SQLite, real Redis broker): each numbered fault
of the hostile-tenant report as a test.

1. a tenant read another tenant's data and any worker-readable file through `dataset_uri`;
2. SSRF through http(s) dataset URIs (tested here with a server on loopback that must see no
   request, and by the resolver's decision for the other address classes: no traffic to them);
3. errors leaked the system (SQL, host:port);
4. unbounded numbers in a spec;
5. 500s for inputs that passed validation;
6. no quotas, no rate limits;
9. no way to revoke a key; `Allow` headers and the OpenAPI security scheme.
(7 and 8, store and broker outages, are in tests/worker/test_outages.py.)
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import auth

ROWS = [{"problem": f"{i} + 1 = ?", "solution": f"\\boxed{{{i + 1}}}"} for i in range(4)]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _app(settings: Any, **overrides: Any) -> Any:
    from api.app import create_app

    return create_app(settings.model_copy(update=overrides))


@pytest.fixture
def strict(settings: Any) -> Iterator[tuple[TestClient, Any]]:
    """The `opsd api` defaults: uploaded files only, hub ids only (no local base models)."""
    app = _app(settings, dataset_uri_policy="", base_model_policy="")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app.state.store


def _keys(store: Any) -> tuple[str, str]:
    import uuid

    suffix = uuid.uuid4().hex[:6]
    return store.create_api_key(f"acme-{suffix}"), store.create_api_key(f"globex-{suffix}")


def _upload(client: TestClient, key: str, content: bytes, name: str = "train.jsonl") -> Any:
    return client.post("/files", files={"file": (name, content)}, headers=auth(key))


# --------------------------------------------------------------------- 1. confinement, Files API
def test_files_api_upload_list_get_delete_and_tenant_scope(strict: Any) -> None:
    client, store = strict
    a, b = _keys(store)
    created = _upload(client, a, _jsonl(ROWS))
    assert created.status_code == 201, created.text
    file = created.json()
    assert file["id"].startswith("file-") and file["object"] == "file"
    assert (file["rows"], file["fields"], file["format"]) == (4, ["problem", "solution"], "jsonl")
    assert file["bytes"] == len(_jsonl(ROWS)) and len(file["sha256"]) == 64
    assert "uri" not in file  # where the bytes are stored is not the tenant's business
    listed = client.get("/files", headers=auth(a)).json()["data"]
    assert [f["id"] for f in listed] == [file["id"]]
    assert client.get(f"/files/{file['id']}", headers=auth(a)).json() == file
    # another tenant: the file does not exist, and its id is no dataset of theirs
    assert client.get(f"/files/{file['id']}", headers=auth(b)).status_code == 404
    assert client.get("/files", headers=auth(b)).json()["data"] == []
    assert client.delete(f"/files/{file['id']}", headers=auth(b)).status_code == 404
    body = {"base_model": "Qwen/Qwen3-4B", "dataset_uri": file["id"]}
    theirs = client.post("/jobs", json=body, headers=auth(b))
    assert theirs.status_code == 422 and theirs.json()["error"]["param"] == "dataset_uri"
    mine = client.post("/jobs", json=body, headers=auth(a))
    assert mine.status_code == 201, mine.text
    deleted = client.delete(f"/files/{file['id']}", headers=auth(a))
    assert deleted.status_code == 200 and deleted.json() == {
        "id": file["id"],
        "object": "file",
        "deleted": True,
    }
    assert client.get(f"/files/{file['id']}", headers=auth(a)).status_code == 404


@pytest.mark.parametrize(
    ("name", "content", "status", "needle"),
    [
        ("t.jsonl", b'{"problem": "a"}\n{"problem": "b"}\n{"problem": \n', 422, "line 3"),
        ("t.jsonl", b'{"problem": "a"}\n[1, 2]\n', 422, "line 2"),
        ("t.csv", b'problem,solution\n"a,b\n', 422, "line 2"),
        ("t.json", b'{"rows": [{"problem": "a"}, 7]}', 422, "row index 1"),
        ("t.txt", b'{"problem": "a"}\n', 422, "unsupported file type"),
        ("t.jsonl", b"", 422, "empty"),
        ("t.jsonl", b"\n\n", 422, "no rows"),
    ],
)
def test_uploads_are_validated_naming_the_first_bad_row(
    strict: Any, name: str, content: bytes, status: int, needle: str
) -> None:
    client, store = strict
    key, _ = _keys(store)
    response = _upload(client, key, content, name)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == "file" and needle in error["message"], error
    assert client.get("/files", headers=auth(key)).json()["data"] == []


def test_uploads_are_size_limited_per_file_and_per_tenant(settings: Any) -> None:
    app = _app(settings, max_file_bytes=300, max_tenant_file_bytes=300)
    with TestClient(app, raise_server_exceptions=False) as client:
        key, _ = _keys(app.state.store)
        big = _upload(client, key, _jsonl(ROWS * 10))
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        assert _upload(client, key, _jsonl(ROWS)).status_code == 201
        full = _upload(client, key, _jsonl(ROWS))
        assert full.status_code == 429 and full.json()["error"]["code"] == "quota_exceeded"


def test_dataset_problems_found_at_submit_name_the_field(strict: Any) -> None:
    client, store = strict
    key, _ = _keys(store)
    no_solution = _upload(client, key, _jsonl([{"question": "q", "answer": "1"}])).json()["id"]
    cases = [
        ({"dataset_uri": no_solution}, "dataset.problem_field"),
        (
            {"dataset_uri": no_solution, "dataset": {"problem_field": "question"}},
            "dataset.solution_field",
        ),
        (
            {"dataset_uri": no_solution, "eval": {"dataset_uri": "/etc/passwd"}},
            "dataset.problem_field",
        ),
    ]
    for patch, param in cases:
        response = client.post("/jobs", json={"base_model": "m", **patch}, headers=auth(key))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == param and no_solution in error["message"], error
        assert "/files/" not in error["message"]  # the storage location stays hidden
    # GRPO needs answers, not solutions: the same file is fine, and so is the eval group on it
    grpo = {
        "base_model": "m",
        "method": "grpo",
        "dataset_uri": no_solution,
        "dataset": {"problem_field": "question"},
        "eval": {"dataset_uri": no_solution, "problem_field": "question"},
    }
    assert client.post("/jobs", json=grpo, headers=auth(key)).status_code == 201
    bad_eval = {**grpo, "eval": {"dataset_uri": no_solution}}
    response = client.post("/jobs", json=bad_eval, headers=auth(key))
    assert response.json()["error"]["param"] == "eval.problem_field"
    assert client.get("/jobs", headers=auth(key)).json()["data"][0]["status"] == "queued"


@pytest.mark.parametrize(
    "uri",
    [
        "/etc/passwd",
        "file:///etc/passwd",
        "../../etc/passwd.csv",
        "~/.ssh/id_rsa.csv",
        "s3://bucket/x.jsonl",
        "memory://x.jsonl",
        "hf://datasets/x/y.jsonl",
        "github://o:r@main/x.jsonl",
        "data:application/json,{}",
        "zip://x.jsonl::file:///tmp/a.zip",
        "simplecache::http://127.0.0.1:1/x.jsonl",
        "http://127.0.0.1:1/anything?fmt=.jsonl",
        "ftp://example.com/x.jsonl",
    ],
)
def test_by_default_only_uploaded_files_are_datasets(strict: Any, uri: str) -> None:
    client, store = strict
    key, _ = _keys(store)
    body = {"base_model": "m", "dataset_uri": uri}
    response = client.post("/jobs", json=body, headers=auth(key))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "dataset_uri"
    nested = {"base_model": "m", "dataset_uri": "file-" + "0" * 26, "eval": {"dataset_uri": uri}}
    response = client.post("/jobs", json=nested, headers=auth(key))
    assert response.json()["error"]["param"] in ("dataset_uri", "eval.dataset_uri")


def test_local_roots_are_resolved_before_the_check(settings: Any, tmp_path: Path) -> None:
    root = tmp_path / "datasets" / "acme"
    root.mkdir(parents=True)
    (root / "train.jsonl").write_bytes(_jsonl(ROWS))
    outside = tmp_path / "secret.csv"
    outside.write_text("root:x:0:0\n")
    (root / "link.csv").symlink_to(outside)
    (root / "shards").mkdir()
    (root / "shards" / "a.jsonl").symlink_to(outside)
    app = _app(settings, dataset_uri_policy=json.dumps({"acme-x": [str(root)]}))
    with TestClient(app, raise_server_exceptions=False) as client:
        acme = app.state.store.create_api_key("acme-x")
        other = app.state.store.create_api_key("globex-x")
        ok = {"base_model": "m", "dataset_uri": str(root / "train.jsonl")}
        assert client.post("/jobs", json=ok, headers=auth(acme)).status_code == 201
        for uri in (
            str(root / "link.csv"),
            f"{root}/../secret.csv",
            f"file://{root}/../../datasets/acme/../secret.csv",
            str(tmp_path / "datasets" / "acmeX" / "x.jsonl"),
        ):
            response = client.post(
                "/jobs", json={"base_model": "m", "dataset_uri": uri}, headers=auth(acme)
            )
            assert response.status_code == 422, uri
            assert "root:x" not in response.text
        # the policy is per tenant
        response = client.post("/jobs", json=ok, headers=auth(other))
        assert response.status_code == 422


def test_the_worker_enforces_the_policy_when_it_opens_a_dataset(tmp_path: Path) -> None:
    """At open time, whatever the API let through: symlinks out of a root inside a folder of
    shards, another tenant's file id, a path outside the roots."""
    from opsd_engine.access import AccessPolicy, DatasetGuard, enforcing
    from opsd_engine.data import DatasetError, load_examples

    root = tmp_path / "root"
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "a.jsonl").write_bytes(_jsonl(ROWS))
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(_jsonl([{"problem": "TOP SECRET", "solution": "x"}]))
    mine = tmp_path / "store" / "mine.jsonl"
    mine.parent.mkdir()
    mine.write_bytes(_jsonl(ROWS))
    policy = AccessPolicy.parse(json.dumps({"acme": [str(root)]}))
    files = {"file-" + "1" * 26: str(mine)}
    guard = DatasetGuard(policy, "acme", files.get)
    with enforcing(guard):
        assert len(load_examples(str(root / "shards"))) == 4
        assert len(load_examples("file-" + "1" * 26)) == 4
        (root / "shards" / "b.jsonl").symlink_to(secret)
        for uri in (str(root / "shards"), str(secret), "file-" + "2" * 26):
            with pytest.raises(DatasetError, match="not allowed") as caught:
                load_examples(uri)
            assert "TOP SECRET" not in str(caught.value)
    assert len(load_examples(str(secret))) == 1  # no guard: the engine on one's own machine


# ---------------------------------------------------------------------------------- 2. SSRF
class _Recorder(BaseHTTPRequestHandler):
    """A loopback server that counts requests; `redirect_to` answers 302 to that URL."""

    hits: list[str]
    redirect_to: str | None = None

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        body = _jsonl(ROWS)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[Any]:
    servers = []

    def start(redirect_to: str | None = None) -> tuple[str, list[str]]:
        handler = type("H", (_Recorder,), {"hits": [], "redirect_to": redirect_to})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler.hits

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_datasets_to_loopback_are_refused_with_no_request(
    settings: Any, loopback_server: Any
) -> None:
    from opsd_engine.access import AccessPolicy, DatasetGuard, enforcing
    from opsd_engine.data import DatasetError, load_examples

    url, hits = loopback_server()
    policy = json.dumps({"*": [f"{url}/", "http://localhost/"]})
    app = _app(settings, dataset_uri_policy=policy)
    with TestClient(app, raise_server_exceptions=False) as client:
        key = app.state.store.create_api_key("ssrf")
        file_id = _upload(client, key, _jsonl(ROWS)).json()["id"]
        for uri in (f"{url}/anything?fmt=.jsonl", "http://localhost/x.jsonl"):
            for body in (
                {"base_model": "m", "dataset_uri": uri},
                {"base_model": "m", "dataset_uri": file_id, "eval": {"dataset_uri": uri}},
            ):
                response = client.post("/jobs", json=body, headers=auth(key))
                assert response.status_code == 422, response.text
                assert "loopback" in response.json()["error"]["message"]
    guard = DatasetGuard(AccessPolicy.parse(policy), "ssrf", lambda _: None)
    with enforcing(guard), pytest.raises(DatasetError, match="loopback"):
        load_examples(f"{url}/train.jsonl")
    assert hits == []  # neither the API nor the worker sent it a request


def test_redirects_are_checked_on_every_hop(loopback_server: Any) -> None:
    """A trusted internal server (operator's `dataset_private_hosts`) redirecting to a loopback
    server it does not trust: the second server never sees a request."""
    from opsd_engine.access import AccessPolicy, DatasetGuard, enforcing
    from opsd_engine.data import DatasetError, load_examples

    target, target_hits = loopback_server()
    trusted, trusted_hits = loopback_server(redirect_to=f"{target}/train.jsonl")
    plain, _ = loopback_server()
    policy = AccessPolicy.parse(
        json.dumps({"*": [f"{trusted}/", f"{target}/", f"{plain}/"]}),
        private_hosts=f"{trusted.removeprefix('http://')},{plain.removeprefix('http://')}",
    )
    with enforcing(DatasetGuard(policy, "t", lambda _: None)):
        assert len(load_examples(f"{plain}/train.jsonl")) == 4  # the guarded client works
        with pytest.raises(DatasetError, match="refused"):
            load_examples(f"{trusted}/train.jsonl")
    assert trusted_hits and target_hits == []


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12::1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "non-public"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classes_by_the_resolvers_decision(address: str, problem: str | None) -> None:
    from opsd_engine.access import AccessDenied, AccessPolicy, address_problem

    found = address_problem(address)
    assert (found is None) if problem is None else (problem in found), found
    # a public-looking name resolving there is judged by its addresses (no lookup, no traffic)
    policy = AccessPolicy.parse(json.dumps({"*": ["https://data.example.com/"]}))

    def resolver(host: str, port: int) -> list[str]:  # what getaddrinfo would answer
        assert (host, port) == ("data.example.com", 443)
        return ["93.184.216.34", address]

    url = "https://data.example.com/train.jsonl"
    if problem is None:
        assert policy.check_dataset_uri(url, "t", resolve=resolver) == "http"
    else:
        with pytest.raises(AccessDenied, match=problem):
            policy.check_dataset_uri(url, "t", resolve=resolver)


# --------------------------------------------------------------------------- base_model policy
def test_base_models_follow_their_allow_list(strict: Any, settings: Any, tmp_path: Path) -> None:
    client, store = strict
    key, _ = _keys(store)
    file_id = _upload(client, key, _jsonl(ROWS)).json()["id"]
    for name, status in [
        ("Qwen/Qwen3-4B", 201),
        ("/etc", 422),
        ("~/.cache/huggingface", 422),
        ("../models/x", 422),
        ("a/b/c", 422),
        ("org/..", 422),
    ]:
        body = {"base_model": name, "dataset_uri": file_id}
        response = client.post("/jobs", json=body, headers=auth(key))
        assert response.status_code == status, (name, response.text)
        if status == 422:
            assert response.json()["error"]["param"] == "base_model"
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    policy = json.dumps({"*": ["Qwen/*", str(models)]})
    app = _app(settings, base_model_policy=policy, dataset_uri_policy='{"*": ["/"]}')
    with TestClient(app, raise_server_exceptions=False) as other:
        key = app.state.store.create_api_key("models")
        for name, status in [
            ("Qwen/Qwen3-4B", 201),
            ("meta-llama/Llama-3-8B", 422),
            (str(models / "tiny"), 201),
            (f"{models}/../models2", 422),
        ]:
            body = {"base_model": name, "dataset_uri": "/data/x.jsonl"}
            assert other.post("/jobs", json=body, headers=auth(key)).status_code == status, name


# ------------------------------------------------------------------------ 3-5. bounds and 500s
@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"optim": {"batch_size": 10**30}}, "optim.batch_size"),
        ({"optim": {"grad_accum": 10**6}}, "optim.grad_accum"),
        ({"optim": {"max_steps": 2147483648}}, "optim.max_steps"),
        ({"optim": {"epochs": 1e9}}, "optim.epochs"),
        ({"max_new_tokens": 131072}, "max_new_tokens"),
        ({"lora": {"alpha": 1e30}}, "lora.alpha"),
        ({"loss": {"num_loss_tokens_to_skip": 10**9}}, "loss.num_loss_tokens_to_skip"),
        ({"generation": {"top_k": 10**12}}, "generation.top_k"),
        ({"dataset": {"limit": 10**12}}, "dataset.limit"),
        ({"eval": {"n": 257}}, "eval.n"),
        ({"eval": {"max_new_tokens": 131072}}, "eval.max_new_tokens"),
        ({"checkpoint_every": 10**12}, "checkpoint_every"),
        ({"metadata": {f"k{i}": i for i in range(65)}}, "metadata"),
        ({"metadata": {"deep": {"er": {"still": 1}}}}, "metadata.deep"),
        ({"metadata": {"big": "x" * 513}}, "metadata.big"),
        ({"metadata": {"n": 10**30}}, "metadata.n"),
        ({"runtime": {"attn_implementation": "x" * 200}}, "runtime.attn_implementation"),
        ({"lora": {"target_modules": ["q_proj"] * 65}}, "lora.target_modules"),
    ],
)
def test_every_number_and_size_is_bounded(client, tenant_keys, patch, param) -> None:
    body = {"base_model": "m", "dataset_uri": "/data/train.jsonl", **patch}
    response = client.post("/jobs", json=body, headers=auth(tenant_keys["a"]))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_the_openapi_document_states_the_bounds(client) -> None:
    schema = client.get("/openapi.json").json()
    defs = schema["components"]["schemas"]
    assert defs["OptimConfig"]["properties"]["batch_size"]["maximum"] == 1024
    assert defs["OptimConfig"]["properties"]["max_steps"]["anyOf"][0]["maximum"] == 1_000_000
    assert defs["JobSpec"]["properties"]["max_new_tokens"]["maximum"] == 32768
    assert defs["JobSpec"]["properties"]["metadata"]["maxProperties"] == 64
    assert defs["EvalRequest"]["properties"]["n"]["maximum"] == 256
    metrics = schema["paths"]["/jobs/{job_id}/metrics"]["get"]["parameters"]
    step_max = next(p for p in metrics if p["name"] == "step_max")
    assert step_max["schema"]["anyOf"][0]["maximum"] == 2**31 - 1
    assert schema["components"]["securitySchemes"]["APIKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["APIKey"]["description"],
    }
    assert schema["paths"]["/jobs"]["post"]["security"] == [{"APIKey": []}]


def _raw(client: TestClient, key: str, text: str, **headers: str) -> Any:
    return client.post(
        "/jobs",
        content=text.encode("utf-8", "surrogatepass"),
        headers={**auth(key), "Content-Type": "application/json", **headers},
    )


@pytest.mark.parametrize(
    ("extra", "headers", "param"),
    [
        ("", {"Idempotency-Key": ""}, "idempotency-key"),
        (', "metadata": {"x": NaN}', {}, "metadata.x"),
        (', "metadata": {"x": Infinity}', {}, "metadata.x"),
        (', "optim": {"weight_decay": NaN}', {}, "optim.weight_decay"),
        (', "lora": {"alpha": Infinity}', {}, "lora.alpha"),
        (', "loss": {"clip": -Infinity}', {}, "loss.clip"),
        (', "metadata": {"x": "\\ud800"}', {}, "metadata.x"),
        (', "metadata": {"\\ud800": 1}', {}, "metadata"),
        (', "optim": {"batch_size": 1' + "0" * 30 + "}", {}, "optim.batch_size"),
    ],
)
def test_inputs_that_passed_validation_no_longer_answer_500(
    client, tenant_keys, extra, headers, param
) -> None:
    key = tenant_keys["a"]
    text = '{"base_model": "m", "dataset_uri": "/d.jsonl"' + extra + "}"
    response = _raw(client, key, text, **headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].lower().startswith(param)
    again = client.get("/jobs", headers=auth(key))  # the connection and the tenant still work
    assert again.status_code == 200


@pytest.mark.parametrize(
    ("path", "params", "headers", "param"),
    [
        ("metrics", {"step_max": 2**31}, {}, "step_max"),
        ("metrics", {"step_min": 2**31}, {}, "step_min"),
        ("metrics", {"name": "\x00"}, {}, "name.0"),
        ("events", {"after_id": 2**63}, {}, "after_id"),
        ("events", {}, {"Last-Event-ID": str(2**63)}, "last-event-id"),
        ("events", {"stream": "true"}, {"Last-Event-ID": str(2**63)}, "last-event-id"),
        ("events", {}, {"Last-Event-ID": "x"}, "last-event-id"),
    ],
)
def test_query_and_header_values_out_of_range_are_422(
    client, tenant_keys, path, params, headers, param
) -> None:
    key = tenant_keys["a"]
    body = {"base_model": "m", "dataset_uri": "/d.jsonl"}
    job_id = client.post("/jobs", json=body, headers=auth(key)).json()["id"]
    response = client.get(f"/jobs/{job_id}/{path}", params=params, headers={**auth(key), **headers})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].lower() == param


def test_unbounded_metadata_no_longer_jams_the_tenants_listing(client, tenant_keys) -> None:
    key = tenant_keys["a"]
    deep: Any = 1
    for _ in range(255):
        deep = {"d": deep}
    body = {"base_model": "m", "dataset_uri": "/d.jsonl", "metadata": {"deep": deep}}
    assert client.post("/jobs", json=body, headers=auth(key)).status_code == 422
    assert client.get("/jobs", headers=auth(key)).status_code == 200


def test_system_errors_carry_a_code_and_an_id_only(settings) -> None:
    from tests.opsd_client.service import closed_port

    port = closed_port()
    down = f"postgresql+psycopg://postgres@127.0.0.1:{port}/opsd"
    app = _app(settings, database_url=down)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/jobs", headers=auth("opsd_abc_def"))
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "store_unavailable" and error["id"].startswith("err_")
    assert str(port) not in response.text and "127.0.0.1" not in response.text


def test_worker_system_errors_name_no_host_sql_or_port() -> None:
    import sqlalchemy as sa

    from worker.runner import classify_error, new_worker_id

    orig = Exception('connection to server at "10.0.0.5", port 5432 failed')
    for exc in (
        sa.exc.OperationalError("UPDATE jobs SET total_steps=%(t)s", {"t": 2**31}, orig),
        sa.exc.DataError("INSERT INTO metrics VALUES (%(v)s)", {"v": "NaN"}, orig),
        RuntimeError(f"worker {os.uname().nodename}:{os.getpid()} crashed"),
    ):
        error = classify_error(exc)
        assert error.category == "system" and "err_" in error.message
        for leak in ("10.0.0.5", "5432", "UPDATE", "INSERT", os.uname().nodename):
            assert leak not in error.message
    assert os.uname().nodename not in new_worker_id()


# -------------------------------------------------------------------- 6. quotas and rate limits
def test_queued_jobs_per_tenant_are_bounded(settings) -> None:
    app = _app(settings, max_queued_jobs_per_tenant=3)
    with TestClient(app, raise_server_exceptions=False) as client:
        a, b = _keys(app.state.store)
        body = {"base_model": "m", "dataset_uri": "/d.jsonl"}
        for i in range(3):
            headers = {**auth(a), "Idempotency-Key": f"k{i}"}
            assert client.post("/jobs", json=body, headers=headers).status_code == 201
        over = client.post("/jobs", json=body, headers=auth(a))
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "quota_exceeded"
        assert int(over.headers["retry-after"]) > 0
        replay = client.post("/jobs", json=body, headers={**auth(a), "Idempotency-Key": "k0"})
        assert replay.status_code == 200  # a retry of an accepted job is not a new one
        assert client.post("/jobs", json=body, headers=auth(b)).status_code == 201
        first = client.get("/jobs", headers=auth(a)).json()["data"][0]["id"]
        assert client.post(f"/jobs/{first}/cancel", headers=auth(a)).status_code == 200
        assert client.post("/jobs", json=body, headers=auth(a)).status_code == 201


def test_requests_per_key_and_failed_authentications_are_rate_limited(settings) -> None:
    app = _app(settings, rate_limit="5/minute", failed_auth_limit="3/minute")
    with TestClient(app, raise_server_exceptions=False) as client:
        a, b = _keys(app.state.store)
        statuses = [client.get("/jobs", headers=auth(a)).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        limited = client.get("/jobs", headers=auth(a))
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 0 < int(limited.headers["retry-after"]) <= 60
        assert client.get("/jobs", headers=auth(b)).status_code == 200  # per key
        wrong = [
            client.get("/jobs", headers=auth(f"opsd_guess{i}_x")).status_code for i in range(3)
        ]
        assert wrong == [401, 401, 401]
        throttled = client.get("/jobs", headers=auth("opsd_guess9_x"))
        assert throttled.status_code == 429 and throttled.headers["retry-after"]
        assert client.get("/jobs", headers=auth(b)).status_code == 429  # the address, not the key


# -------------------------------------------------------------------------------- 9. keys
def test_admins_list_and_revoke_keys_effective_on_every_api_process(settings) -> None:
    first = _app(settings, key_revocation_check_seconds=0)
    second = _app(settings, key_revocation_check_seconds=0)  # another API process
    store = first.state.store
    admin = store.create_api_key("ops", admin=True)
    user = store.create_api_key("acme-keys")
    with (
        TestClient(first, raise_server_exceptions=False) as one,
        TestClient(second, raise_server_exceptions=False) as two,
    ):
        assert two.get("/jobs", headers=auth(user)).status_code == 200  # cached as valid there
        assert one.get("/keys", headers=auth(user)).status_code == 403
        keys = one.get("/keys", headers=auth(admin)).json()["data"]
        mine = next(k for k in keys if k["tenant"] == "acme-keys")
        assert mine["prefix"] == user.split("_")[1] and not mine["admin"]
        assert all("hash" not in json.dumps(k) and user not in json.dumps(k) for k in keys)
        assert one.delete(f"/keys/{mine['id']}", headers=auth(user)).status_code == 403
        revoked = one.delete(f"/keys/{mine['id']}", headers=auth(admin))
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        assert one.get("/jobs", headers=auth(user)).status_code == 401
        assert two.get("/jobs", headers=auth(user)).status_code == 401
        assert one.delete("/keys/key_nope", headers=auth(admin)).status_code == 404


def test_405_lists_every_method_of_the_path(client) -> None:
    for path, methods in [("/jobs", {"GET", "POST"}), ("/files/file-x", {"GET", "DELETE"})]:
        response = client.put(path)
        assert response.status_code == 405
        assert set(response.headers["allow"].split(", ")) == methods
