"""Training rollouts sampled by a real inference server (our adapter server over HTTP): the same
token ids as local sampling, the server always samples from the weights of the current step, old
versions are unloaded and deleted, and the worker picks the server only when it should."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from adapter_server.app import create_app
from adapter_server.engine import AdapterEngine
from opsd_engine.checkpoint import step_dir_name
from opsd_engine.modeling import load_policy
from opsd_engine.rollout import (
    PolicyView,
    SamplingParams,
    ServedRolloutBackend,
    TransformersRolloutBackend,
)
from opsd_engine.trainers import run_training
from opsd_service.settings import ServiceSettings
from tests.evals.helpers import serve_in_thread
from worker.inference_client import InferenceClient, InferenceError
from worker.served_rollouts import ServedRollouts, served_rollouts


@pytest.fixture(scope="module")
def server_url(tiny_model_dir: Path) -> Iterator[str]:
    engine = AdapterEngine(str(tiny_model_dir), device="cpu", dtype="float32")
    with serve_in_thread(create_app(engine, allow_runtime_lora=True)) as url:
        yield url


def _adapter_names(client: InferenceClient) -> set[str]:
    return {str(card["id"]) for card in client.models() if card.get("parent")}


def test_served_rollouts_equal_local_sampling_of_the_same_weights(
    server_url: str, tiny_spec: Any, tmp_path: Path
) -> None:
    spec = tiny_spec()
    policy = load_policy(spec, device=torch.device("cpu"))
    with torch.no_grad():  # a policy that differs from the base model
        for name, parameter in policy.peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    view = PolicyView(
        model=policy.peft_model,
        current_step=lambda: 0,
        pad_id=int(policy.tokenizer.pad_token_id),
        stop_ids=policy.stop_token_ids,
        device=torch.device("cpu"),
        batch_size=4,
    )
    prompts = [[5, 17, 42, 9, 3], [8, 8, 30, 2, 11]]  # equal lengths: no padding anywhere
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, num_generations=1)
    local = TransformersRolloutBackend(
        policy.peft_model, pad_id=view.pad_id, stop_ids=view.stop_ids, device=view.device
    ).generate(prompts, greedy)
    with InferenceClient(server_url) as client:
        served = ServedRolloutBackend(client, view, adapter_dir=tmp_path, run_name="same")
        try:
            assert served.generate(prompts, greedy) == local
            assert "same-step0" in _adapter_names(client)
        finally:
            served.close()
        assert "same-step0" not in _adapter_names(client)
    assert not (tmp_path / "same-step0").exists()


class _RecordingServer:
    """The real client, plus a copy of the weights each time an adapter is loaded."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client
        self.loaded: list[tuple[str, dict[str, torch.Tensor], set[str]]] = []

    def ensure_adapter(self, name: str, path: str) -> bool:
        loaded = self.client.ensure_adapter(name, path)
        weights = load_file(str(Path(path) / "adapter_model.safetensors"))
        self.loaded.append((name, weights, _adapter_names(self.client)))
        return loaded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.parametrize("method", ["opsd", "grpo"])
def test_each_step_samples_from_the_weights_of_the_step_before(
    method: str, server_url: str, tiny_spec: Any, tmp_path: Path
) -> None:
    spec = tiny_spec(method=method, checkpoint_every=1, optim={"max_steps": 3})
    client = InferenceClient(server_url)
    recorder = _RecordingServer(client)
    adapters = tmp_path / "rollout-adapters"

    def factory(view: PolicyView) -> ServedRolloutBackend:
        factory.backend = ServedRolloutBackend(  # type: ignore[attr-defined]
            recorder, view, adapter_dir=adapters, run_name="run1"
        )
        return factory.backend  # type: ignore[attr-defined]

    result = run_training(spec, tmp_path / "run", rollout_backend=factory)
    assert result.status == "succeeded"
    assert [name for name, _, _ in recorder.loaded] == ["run1-step0", "run1-step1", "run1-step2"]
    previous: set[str] = set()
    for name, _, listed in recorder.loaded:  # older versions are gone from the server
        assert {n for n in listed if n.startswith("run1-")} == previous | {name}
        previous = {name}
    for step, (_, weights, _) in enumerate(recorder.loaded[1:], start=1):
        checkpoint = tmp_path / "run" / "checkpoints" / step_dir_name(step) / "adapter"
        saved = load_file(str(checkpoint / "adapter_model.safetensors"))
        assert saved.keys() == weights.keys()
        assert all(torch.equal(saved[k], weights[k]) for k in saved)
    if method == "opsd":  # (GRPO's 0/1 rewards are all equal on this tiny model: no update)
        first = recorder.loaded[0][1]
        assert any(not torch.equal(first[k], recorder.loaded[-1][1][k]) for k in first)

    factory.backend.close()  # type: ignore[attr-defined]
    assert not {n for n in _adapter_names(client) if n.startswith("run1-")}
    assert list(adapters.iterdir()) == []
    client.close()


def test_the_worker_uses_the_server_only_when_it_serves_the_jobs_model(
    server_url: str, tiny_spec: Any, tmp_path: Path
) -> None:
    spec = tiny_spec()
    other = tiny_spec(base_model=str(tmp_path / "another-model"))

    def settings(mode: str, url: str | None = server_url) -> ServiceSettings:
        return ServiceSettings(home=tmp_path, inference_url=url, training_rollouts=mode)

    chosen = served_rollouts(spec, settings("auto"), "job_1")
    assert isinstance(chosen, ServedRollouts) and chosen.run_name.startswith("job_1-rollout-")
    assert chosen.adapter_dir == str(tmp_path / "artifacts" / "rollout-adapters")
    chosen.close()
    assert served_rollouts(other, settings("auto"), "job_1") is None  # another base model
    assert served_rollouts(spec, settings("local"), "job_1") is None
    assert served_rollouts(spec, settings("auto", None), "job_1") is None
    assert served_rollouts(tiny_spec(method="sft"), settings("server"), "job_1") is None
    with pytest.raises(InferenceError, match="not the job's base model"):
        served_rollouts(other, settings("server"), "job_1")
    with pytest.raises(InferenceError, match="cannot reach"):
        served_rollouts(spec, settings("server", "http://127.0.0.1:9"), "job_1")
    with pytest.raises(ValueError, match="needs inference_url"):
        settings("server", None)
