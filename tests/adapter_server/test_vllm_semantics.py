"""What `opsd serve-adapters` must do as vLLM's stand-in beyond the contract suite (which runs
against a real vLLM too): keep the loaded adapters' trainable flags (issue #10, fault 8), take
unset sampling fields from the generation config as vLLM does, refuse what it does not
implement instead of ignoring it, and vLLM's stop-string search rule."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapter_server.app import _sampling, create_app
from adapter_server.engine import AdapterEngine, _check_stop_strings
from adapter_server.protocol import CompletionRequest

BASE = "qwen3-base"


@pytest.fixture(scope="module")
def engine(qwen3_base_model_dir: Path) -> AdapterEngine:
    return AdapterEngine(str(qwen3_base_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def client(engine: AdapterEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, allow_runtime_lora=True)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def adapter(qwen3_base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random LoRA adapter for the model, saved by peft."""
    import torch

    from opsd_engine.checkpoint import save_adapter
    from opsd_engine.modeling import load_policy
    from tests.conftest import make_tiny_spec

    spec = make_tiny_spec(qwen3_base_model_dir, Path("unused.jsonl"))
    policy = load_policy(spec, device=torch.device("cpu"))
    with torch.no_grad():
        for name, parameter in policy.peft_model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.01)
    return save_adapter(policy.peft_model, tmp_path_factory.mktemp("adapter") / "a")


def test_serving_never_changes_requires_grad(
    client: TestClient, engine: AdapterEngine, adapter: Path
) -> None:
    for name in ("keep-1", "keep-2"):
        load = client.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter)}
        )
        assert load.status_code == 200, load.text
    peft_model = engine._peft
    before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert not any(before.values())  # loaded for inference: nothing trainable
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    for model in (BASE, "keep-1", "keep-2", BASE):  # base requests used disable_adapter()
        assert client.post("/v1/completions", json={**body, "model": model}).status_code == 200
        after = {n: p.requires_grad for n, p in peft_model.named_parameters()}
        assert after == before, f"a {model} request changed requires_grad"
    for name in ("keep-1", "keep-2"):
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": name}).is_success


def test_reported_rank_is_the_largest_of_any_module(
    engine: AdapterEngine, adapter: Path, tmp_path: Path
) -> None:
    patterned = tmp_path / "patterned"
    shutil.copytree(adapter, patterned)
    config = json.loads((patterned / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 12}
    (patterned / "adapter_config.json").write_text(json.dumps(config))
    assert engine._check_config(patterned, str(patterned)) == 12
    config["rank_pattern"] = {"q_proj": 300}
    (patterned / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="LoRA rank 300 is greater than max_lora_rank 256"):
        engine._check_config(patterned, str(patterned))
    for change, message in (
        ({"r": 0}, "must be a positive integer"),
        ({"rank_pattern": {"q_proj": "big"}}, "rank_pattern must map"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": True}, "lora_bias"),
    ):
        (patterned / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(Exception, match=message):
            engine._check_config(patterned, str(patterned))


def test_unset_sampling_fields_come_from_the_generation_config(
    qwen3_base_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "qwen3-like"
    shutil.copytree(qwen3_base_model_dir, model)
    generation = json.loads((model / "generation_config.json").read_text())
    generation.update(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=5)
    (model / "generation_config.json").write_text(json.dumps(generation))
    engine = AdapterEngine(str(model), device="cpu", dtype="float32")
    unset = _sampling(engine, CompletionRequest(model="m", prompt="x"), 10)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.max_tokens) == (0.6, 0.95, 20, 5)
    given = CompletionRequest(model="m", prompt="x", temperature=1.0, top_p=1.0, top_k=-1)
    sampling = _sampling(engine, given, 3)
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (
        1.0,
        1.0,
        0,
        3,
    )
    # a default this server cannot apply is refused, not ignored; sending the neutral value works
    generation["repetition_penalty"] = 1.05
    (model / "generation_config.json").write_text(json.dumps(generation))
    strict = AdapterEngine(str(model), device="cpu", dtype="float32")
    with TestClient(create_app(strict)) as http:
        body = {"model": "qwen3-like", "prompt": [5, 6], "max_tokens": 2}
        refused = http.post("/v1/completions", json=body)
        assert (
            refused.status_code == 400 and refused.json()["error"]["param"] == "repetition_penalty"
        )
        assert "generation config" in refused.json()["error"]["message"]
        neutral = http.post("/v1/completions", json={**body, "repetition_penalty": 1.0})
        assert neutral.status_code == 200, neutral.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("ignore_eos", True),
        ("min_tokens", 2),
        ("min_p", 0.1),
        ("repetition_penalty", 1.2),
        ("logit_bias", {"5": 1.0}),
        ("bad_words", ["x"]),
        ("allowed_token_ids", [5]),
        ("stream", True),
        ("echo", True),
        ("logprobs", 1),
    ],
)
def test_fields_this_server_does_not_implement_are_refused(
    client: TestClient, field: str, value: Any
) -> None:
    body = {"model": BASE, "prompt": [5, 6], "max_tokens": 2, field: value}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_request_checks_as_vllm(client: TestClient, engine: AdapterEngine) -> None:
    body = {"model": BASE, "prompt": [5, 6], "max_tokens": 2}
    bad_id = client.post("/v1/completions", json={**body, "stop_token_ids": [engine.vocab_size]})
    assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "stop_token_ids"
    empty = client.post("/v1/completions", json={**body, "stop": ["a", ""]})
    assert empty.status_code == 400 and "empty string" in empty.json()["error"]["message"]


def test_check_stop_strings_follows_vllm() -> None:
    # only the new characters (and strings straddling them) are searched
    assert _check_stop_strings("abcXYZ", 3, ["XY"], False) == ("XY", 3)
    assert _check_stop_strings("abXYcd", 2, ["XY"], False) is None  # seen before: not new
    assert _check_stop_strings("abcX", 1, ["cX"], False) == ("cX", 2)  # straddles
    # list order decides between two strings in the same new text, not their position
    assert _check_stop_strings("aXbY", 4, ["Y", "X"], False) == ("Y", 3)
    # with include_stop_str_in_output the text is cut after the string (-1: nothing to cut)
    assert _check_stop_strings("aXbc", 3, ["X"], True) == ("X", 2)
    assert _check_stop_strings("abX", 1, ["X"], True) == ("X", -1)
