"""CUDA-only checks of the engine (skipped without a CUDA device; `benchmarks/gpu/check.sh` runs
them on a GPU machine): a bf16 OPSD run on the GPU, and seeded sampling on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_bf16_opsd_steps_train_the_adapter_and_keep_the_teacher(tiny_spec, tmp_path) -> None:
    from opsd_engine.trainers.opsd import OPSDTrainer

    spec = tiny_spec(
        optim={"max_steps": 2},
        runtime={"dtype": "bfloat16", "device": "cuda", "gradient_checkpointing": True},
    )
    trainer = OPSDTrainer(spec, tmp_path)
    assert trainer.policy.device.type == "cuda"
    lora = {
        n: p.detach().clone()
        for n, p in trainer.policy.peft_model.named_parameters()
        if "lora_B" in n
    }
    frozen = {
        n: p.detach().clone()
        for n, p in trainer.policy.peft_model.named_parameters()
        if "lora_" not in n
    }
    for _ in range(2):
        metrics = trainer.train_step()
        assert all(math.isfinite(v) for k, v in metrics.items() if k != "grad_norm"), metrics
    changed = [
        n
        for n, p in trainer.policy.peft_model.named_parameters()
        if n in lora and not torch.equal(p, lora[n])
    ]
    assert changed, "the optimizer steps moved LoRA B"
    for name, param in trainer.policy.peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name}: the base (teacher) weights moved"


def test_cuda_seeded_sampling_is_reproducible_and_keyed_by_seed(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from opsd_engine.modeling import load_tokenizer, stop_token_ids
    from opsd_engine.rollout import SamplingParams, TransformersRolloutBackend

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).cuda()
    backend = TransformersRolloutBackend(
        model,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(tokenizer, model),
        device=torch.device("cuda"),
    )
    prompts = [tokenizer(t)["input_ids"] for t in ("Problem: 1+2?", "Problem: 17 apples and 4?")]
    params = SamplingParams(max_new_tokens=24, temperature=1.2, top_p=0.9, num_generations=2)
    first = backend.generate(prompts, params, seeds=[1, 2])
    assert backend.generate(prompts, params, seeds=[1, 2]) == first
    assert backend.generate(prompts, params, seeds=[3, 4]) != first
    assert backend.max_rows(100, 24) >= 1
