"""The adapter server on the tiny model: vLLM's runtime-LoRA protocol (load/list/unload, immutable
names, the env-var switch), completions and chat completions with n samples, and generation with
a trained adapter that matches peft's own and differs from the base model's."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from adapter_server.app import create_app, runtime_lora_updating_allowed
from adapter_server.engine import AdapterEngine
from tests.evals.helpers import trained_adapter

BASE = "model"  # the served name of the tiny model: its directory's name


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> AdapterEngine:
    assert tiny_model_dir.name == BASE
    return AdapterEngine(str(tiny_model_dir), device="cpu", dtype="float32", max_loras=3)


@pytest.fixture(scope="module")
def client(engine: AdapterEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, allow_runtime_lora=True)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def adapter_dir(
    tiny_model_dir: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return trained_adapter(tiny_model_dir, tiny_dataset, tmp_path_factory.mktemp("adapter"))


def _ids(client: TestClient) -> list[str]:
    response = client.get("/v1/models")
    assert response.status_code == 200
    return [card["id"] for card in response.json()["data"]]


def _load(client: TestClient, name: str, path: Path | str) -> Any:
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    return error


def test_load_list_unload_and_immutable_names(client: TestClient, adapter_dir: Path) -> None:
    assert _ids(client)[0] == BASE
    loaded = _load(client, "job-a-step3", adapter_dir)
    assert loaded.status_code == 200
    assert loaded.text == "Success: LoRA adapter 'job-a-step3' added successfully."
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["job-a-step3"]["parent"] == BASE
    assert cards["job-a-step3"]["root"] == str(adapter_dir)
    assert cards[BASE]["parent"] is None

    again = _error(_load(client, "job-a-step3", adapter_dir), 400)
    assert "already been loaded" in again["message"]
    assert "base model" in _error(_load(client, BASE, adapter_dir), 400)["message"]
    assert "No adapter found" in _error(_load(client, "x", "/no/such/dir"), 404)["message"]
    _error(client.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)

    removed = client.post("/v1/unload_lora_adapter", json={"lora_name": "job-a-step3"})
    assert removed.status_code == 200 and "removed successfully" in removed.text
    assert "job-a-step3" not in _ids(client)
    _error(client.post("/v1/unload_lora_adapter", json={"lora_name": "job-a-step3"}), 404)
    gone = client.post("/v1/completions", json={"model": "job-a-step3", "prompt": "x"})
    assert _error(gone, 404)["param"] == "model"


def test_runtime_loading_needs_the_vllm_environment_variable(
    engine: AdapterEngine, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
    assert runtime_lora_updating_allowed({env: "True"})
    assert runtime_lora_updating_allowed({env: "1"})
    assert not runtime_lora_updating_allowed({env: "0"})
    assert not runtime_lora_updating_allowed({})
    monkeypatch.delenv(env, raising=False)
    with TestClient(create_app(engine)) as refusing:
        error = _error(_load(refusing, "nope", adapter_dir), 404)
        assert env in error["message"]
        _error(refusing.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404)
        assert "nope" not in _ids(refusing)
    monkeypatch.setenv(env, "true")
    with TestClient(create_app(engine)) as allowing:
        assert _load(allowing, "env-ok", adapter_dir).status_code == 200
        assert allowing.post("/v1/unload_lora_adapter", json={"lora_name": "env-ok"}).is_success


def test_completions_with_n_samples_per_prompt(client: TestClient, engine: AdapterEngine) -> None:
    prompts = [engine.encode_text("Problem: Ann has 3 pens."), [5, 6, 7]]
    body = {"model": BASE, "prompt": prompts, "n": 3, "max_tokens": 6, "temperature": 1.0}
    response = client.post("/v1/completions", json={**body, "seed": 11})
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "text_completion" and out["model"] == BASE
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(prompts[0]) + 3
    assert 0 < usage["completion_tokens"] <= 6 * 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    same = client.post("/v1/completions", json={**body, "seed": 11}).json()
    assert [c["text"] for c in same["choices"]] == [c["text"] for c in out["choices"]]

    single = client.post(
        "/v1/completions",
        json={"model": BASE, "prompt": "Problem: 2 + 2?", "max_tokens": 4, "top_k": -1},
    ).json()
    assert len(single["choices"]) == 1 and single["choices"][0]["index"] == 0

    text = client.post(
        "/v1/completions",
        json={"model": BASE, "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0},
    ).json()["choices"][0]["text"]
    if len(text) > 2:
        stop = text[1:3]
        cut = client.post(
            "/v1/completions",
            json={
                "model": BASE,
                "prompt": [1, 2, 3],
                "max_tokens": 8,
                "temperature": 0,
                "stop": [stop],
            },
        ).json()["choices"][0]
        assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"


def test_request_errors_use_the_openai_error_shape(
    client: TestClient, engine: AdapterEngine
) -> None:
    too_long = {"model": BASE, "prompt": [1, 2], "max_tokens": engine.max_model_len}
    assert (
        "maximum context length"
        in _error(client.post("/v1/completions", json=too_long), 400)["message"]
    )
    assert _error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    bad_n = _error(client.post("/v1/completions", json={"model": BASE, "prompt": "x", "n": 0}), 400)
    assert bad_n["param"] == "n"
    stream = {"model": BASE, "prompt": "x", "stream": True}
    assert _error(client.post("/v1/completions", json=stream), 400)["param"] == "stream"
    bad_ids = {"model": BASE, "prompt": [10**9]}
    assert _error(client.post("/v1/completions", json=bad_ids), 400)["param"] == "prompt"
    _error(client.get("/v1/no-such-route"), 404)


def test_chat_completions_with_n_and_thinking_switch(client: TestClient) -> None:
    def chat(thinking: bool) -> dict[str, Any]:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": BASE,
                "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                "n": 2,
                "max_tokens": 5,
                "seed": 3,
                "chat_template_kwargs": {"enable_thinking": thinking},
            },
        )
        assert response.status_code == 200, response.text
        return response.json()

    thinking, direct = chat(True), chat(False)
    assert thinking["object"] == "chat.completion"
    assert [c["index"] for c in thinking["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" for c in thinking["choices"])
    # enable_thinking=False pre-fills an empty think block in the prompt, as Qwen3's template does
    assert direct["usage"]["prompt_tokens"] > thinking["usage"]["prompt_tokens"]


def test_trained_adapter_generates_like_peft_and_unlike_the_base(
    client: TestClient, engine: AdapterEngine, adapter_dir: Path, tiny_model_dir: Path
) -> None:
    from peft import PeftModel

    from opsd_engine.modeling import load_base_model
    from opsd_engine.rollout import SamplingParams, TransformersRolloutBackend

    assert _load(client, "trained", adapter_dir).status_code == 200
    assert "trained" in _ids(client)
    prompts = [engine.encode_text(f"Problem: Ben has {k} apples and buys 2 more.") for k in (2, 5)]
    body = {"prompt": prompts, "max_tokens": 10, "temperature": 0, "return_token_ids": True}
    tuned = client.post("/v1/completions", json={**body, "model": "trained"}).json()["choices"]
    base = client.post("/v1/completions", json={**body, "model": BASE}).json()["choices"]
    assert [c["token_ids"] for c in tuned] != [c["token_ids"] for c in base]

    reference = PeftModel.from_pretrained(
        load_base_model(str(tiny_model_dir), dtype=torch.float32), str(adapter_dir)
    )
    backend = TransformersRolloutBackend(
        reference,
        pad_id=engine.tokenizer.pad_token_id,
        stop_ids=engine.stop_ids,
        device=engine.device,
    )
    expected = backend.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert [c["token_ids"] for c in tuned] == [r.token_ids for r in expected]
    # the base model is still the base model once an adapter is loaded
    with reference.disable_adapter():
        plain = backend.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert [c["token_ids"] for c in base] == [r.token_ids for r in plain]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "trained"}).is_success


def test_least_recently_used_adapter_is_evicted_and_fsspec_paths_load(
    client: TestClient, engine: AdapterEngine, adapter_dir: Path, tmp_path: Path
) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in adapter_dir.iterdir():
        memory.pipe(f"/adapters/lru/{path.name}", path.read_bytes())
    copy = tmp_path / "copy"
    shutil.copytree(adapter_dir, copy)
    for name in ("lru-1", "lru-2", "lru-3"):
        assert _load(client, name, copy).status_code == 200
    client.post("/v1/completions", json={"model": "lru-1", "prompt": "x", "max_tokens": 1})
    assert _load(client, "lru-4", "memory://adapters/lru").status_code == 200  # max_loras=3
    assert [i for i in _ids(client) if i.startswith("lru-")] == ["lru-1", "lru-3", "lru-4"]
    out = client.post("/v1/completions", json={"model": "lru-4", "prompt": "x", "max_tokens": 2})
    assert out.status_code == 200
    for name in ("lru-1", "lru-3", "lru-4"):
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": name}).is_success
    assert _ids(client) == [BASE]


def test_serve_adapters_command_is_mounted() -> None:
    from typer.testing import CliRunner

    from opsd_cli import app

    result = CliRunner().invoke(app, ["serve-adapters", "--help"])
    assert result.exit_code == 0
    assert "--base-model" in result.output and "--max-loras" in result.output
