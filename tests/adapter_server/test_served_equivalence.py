"""Served and in-process generation stop on exactly the same tokens (issue #10, fault 1), on the
tiny model in the Qwen3 *-Base layout: EOS ``<|endoftext|>`` everywhere, turns ending with
``<|im_end|>``. vLLM (and `opsd serve-adapters`, which follows it) stops only on EOS, the
generation config's EOS and the request's ``stop_token_ids``; the engine also stops at the
chat template's end of turn. So every request must carry the engine's stop set, and then:

* training rollouts (``ServedRolloutBackend`` over HTTP) equal local sampling, token for token,
  greedy, with the same stop points;
* evals over HTTP (``worker.evals``) sample what the in-process eval samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter_server.app import create_app
from adapter_server.engine import AdapterEngine
from opsd_engine.modeling import load_policy
from opsd_engine.prompts import encode_prompt, render_student_text
from opsd_engine.rollout import (
    PolicyView,
    SamplingParams,
    ServedRolloutBackend,
    TransformersRolloutBackend,
)
from opsd_engine.tiny import tiny_examples
from tests.conftest import make_tiny_spec
from tests.evals.helpers import serve_in_thread
from worker.inference_client import InferenceClient, sampling_body

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def server_url(qwen3_base_model_dir: Path) -> Iterator[str]:
    engine = AdapterEngine(str(qwen3_base_model_dir), device="cpu", dtype="float32")
    with serve_in_thread(create_app(engine, allow_runtime_lora=True)) as url:
        yield url


@pytest.fixture(scope="module")
def policy(qwen3_base_model_dir: Path, tiny_dataset: Path) -> Any:
    spec = make_tiny_spec(qwen3_base_model_dir, tiny_dataset)
    policy = load_policy(spec, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from the base model
        for name, parameter in policy.peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return policy


def test_engine_stop_set_of_the_base_layout(policy: Any) -> None:
    tokenizer = policy.tokenizer
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == endoftext  # the Qwen3 *-Base layout
    assert policy.causal_lm.generation_config.eos_token_id == endoftext
    assert policy.stop_token_ids == [endoftext, tokenizer.convert_tokens_to_ids(IM_END)]


def test_served_rollouts_equal_in_process_rollouts_in_the_base_layout(
    server_url: str, policy: Any, tmp_path: Path
) -> None:
    tokenizer, prompts_config = policy.tokenizer, make_tiny_spec(Path("m"), Path("d")).prompts
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    view = PolicyView(
        model=policy.peft_model,
        current_step=lambda: 0,
        pad_id=int(tokenizer.pad_token_id),
        stop_ids=policy.stop_token_ids,
        device=torch.device("cpu"),
        batch_size=1,
    )
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    local_backend = TransformersRolloutBackend(
        policy.peft_model, pad_id=view.pad_id, stop_ids=view.stop_ids, device=view.device
    )
    local, served = [], []
    with InferenceClient(server_url) as client:
        recorder = _Recorder(client)
        backend = ServedRolloutBackend(recorder, view, adapter_dir=tmp_path, run_name="eq")
        try:
            for row in tiny_examples(12, seed=3):
                for thinking in (False, None):
                    prompt = encode_prompt(
                        tokenizer,
                        render_student_text(row["problem"], prompts_config),
                        prompts_config,
                        thinking=thinking,
                    )
                    # one prompt per call: no padding, so the numbers are the same everywhere
                    local += local_backend.generate([prompt], params)
                    served += backend.generate([prompt], params)
        finally:
            backend.close()
    assert served == local  # same token ids, same stop points (finished flags)
    # ...and the server itself stopped there: it sampled nothing past the engine's stop set
    # (its raw choices, before the backend's own cut_at_stop, are the local rollouts)
    raw = [choice for row in recorder.results for choice in row]
    assert [c.token_ids for c in raw] == [r.token_ids for r in local]
    assert [c.finish_reason == "stop" for c in raw] == [r.finished for r in local]
    turn_ends = [r for r in local if r.finished and r.token_ids[-1] == im_end]
    assert turn_ends, "no rollout ended its turn: the test would not show the stop set"
    assert all(len(r.token_ids) < 48 for r in turn_ends)


class _Recorder:
    """The real client; keeps what the server returned to each completions call."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client
        self.results: list[Any] = []

    def ensure_adapter(self, name: str, path: str) -> bool:
        return self.client.ensure_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.client.unload_adapter(name)

    def completions(self, **kwargs: Any) -> Any:
        result = self.client.completions(**kwargs)
        self.results.extend(result)
        return result


def test_requests_carry_the_stop_set_and_neutral_generation_defaults() -> None:
    body = sampling_body("m", 2, 8, 0.7, 0.9, 0, None, (151643, 151645))
    assert body["stop_token_ids"] == [151643, 151645] and body["n"] == 2
    assert (body["repetition_penalty"], body["min_p"], body["top_k"]) == (1.0, 0.0, -1)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.0, 0.0)
    assert body["skip_special_tokens"] is True and body["include_stop_str_in_output"] is False
    assert sampling_body("m", 4, 8, 0.0, 1.0, 0, 3, [1])["n"] == 1  # greedy
    with pytest.raises(ValueError, match="stop_token_ids"):
        sampling_body("m", 1, 1, 1.0, 1.0, 0, None, ())
    with InferenceClient("http://127.0.0.1:9") as client, pytest.raises(TypeError):
        client.completions(  # type: ignore[call-arg]
            model="m", prompts=[[1]], n=1, max_tokens=1, temperature=1.0, top_p=1.0
        )


def test_greedy_requests_ask_for_one_sample_and_repeat_it(server_url: str) -> None:
    with InferenceClient(server_url) as client:
        rows = client.completions(
            model="qwen3-base",
            prompts=[[5, 6, 7], [8, 9]],
            n=3,
            max_tokens=5,
            temperature=0.0,
            top_p=0.95,
            stop_token_ids=[507],
        )
    assert [len(row) for row in rows] == [3, 3]
    assert all(row[0] == row[1] == row[2] for row in rows)  # vLLM refuses n > 1 when greedy


def test_evals_over_http_sample_what_in_process_evals_sample(
    server_url: str, policy: Any, qwen3_base_model_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The same eval (greedy, a job's adapter, the Qwen3 template with thinking off and on) run
    in process and over HTTP: the same completion lengths, so the same stop points, and the same
    texts (up to an unfinished UTF-8 character at the very end, which vLLM's incremental
    detokenizer leaves out and ``tokenizer.decode`` shows as U+FFFD)."""
    import json

    from jobstore import Store
    from jobstore.migrate import upgrade
    from opsd_engine.checkpoint import save_adapter
    from opsd_engine.config import spec_to_dict
    from opsd_service.settings import ServiceSettings
    from tests.service_fixtures import sqlite_url
    from worker.evals import run_eval

    adapter = save_adapter(policy.peft_model, tmp_path / "adapter")
    url = sqlite_url(tmp_path / "opsd.db")
    upgrade(url)
    store = Store(url)
    try:
        tenant = store.get_or_create_tenant("acme")
        spec = spec_to_dict(make_tiny_spec(qwen3_base_model_dir, tiny_dataset))
        job, _ = store.create_job(tenant.id, spec=spec)
        store.claim_job(job.id, "trainer", lease_seconds=60)
        store.update_progress(job.id, "trainer", step=3, total_steps=3)
        assert store.finish_job(job.id, "trainer", adapter_uri=str(adapter))
        bench = tmp_path / "bench.jsonl"
        rows = [{"problem": r["problem"], "answer": r["answer"]} for r in tiny_examples(12, seed=3)]
        bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results: dict[tuple[bool | None, str], Any] = {}
        for thinking in (False, None):
            config = {
                "dataset_uri": str(bench),
                "n": 2,
                "max_new_tokens": 48,
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": 0,
                "thinking": thinking,
                "include_base": False,
                "checkpoint_step": None,
            }
            for backend, inference_url in (("in_process", None), ("http", server_url)):
                record = store.create_eval(tenant.id, job.id, config=config)
                settings = ServiceSettings(
                    home=tmp_path / "home",
                    database_url=url,
                    artifacts_uri=str(tmp_path / "artifacts"),
                    inference_url=inference_url,
                )
                assert run_eval(record.id, store=store, settings=settings, worker_id="w") == (
                    "succeeded"
                )
                done = store.get_eval(record.id).results
                assert done["backend"] == backend
                results[(thinking, backend)] = [
                    (s["num_tokens"], s["text"].rstrip("\ufffd"))
                    for row in done["adapter"]["problems"]
                    for s in row["samples"]
                ]
    finally:
        store.close()
    for thinking in (False, None):
        assert results[(thinking, "http")] == results[(thinking, "in_process")]
    lengths = [n for key, samples in results.items() for n, _ in samples]
    assert min(lengths) < 48, "no sample ended its turn: the test would not show the stop set"
