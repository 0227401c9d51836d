"""Student rollouts: left-padded batched sampling returns the right token ids."""

from __future__ import annotations

import pytest
import torch

from opsd_engine.modeling import load_tokenizer, stop_token_ids
from opsd_engine.rollout import SamplingParams, TransformersRolloutBackend, cut_at_stop


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return TransformersRolloutBackend(
        model,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(tokenizer, model),
        device=torch.device("cpu"),
        batch_size=8,
    ), tokenizer


def test_cut_at_stop_keeps_the_stop_token() -> None:
    assert cut_at_stop([4, 5, 9, 0, 0], {9}) == ([4, 5, 9], True)
    assert cut_at_stop([4, 5, 6], {9}) == ([4, 5, 6], False)
    assert cut_at_stop([9, 9], {9}) == ([9], True)


def test_batched_greedy_rollouts_equal_unbatched(backend) -> None:
    """Left padding with the right mask/positions: padding must not change what is generated."""
    rollout_backend, tokenizer = backend
    prompts = [
        tokenizer("Problem: 1+2?\nAnswer:")["input_ids"],
        tokenizer(
            "Problem: a far longer question about 12 oranges shared among 3 friends?\nAnswer:"
        )["input_ids"],
    ]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched = rollout_backend.generate(prompts, greedy)
    for index, prompt in enumerate(prompts):
        alone = rollout_backend.generate([prompt], greedy)[0]
        assert batched[index].token_ids == alone.token_ids
        assert batched[index].prompt_index == index


def test_sampling_groups_generations_by_prompt_and_respects_lengths(backend) -> None:
    rollout_backend, tokenizer = backend
    stop = set(rollout_backend.stop_ids)
    prompts = [tokenizer("Problem: 3*3?")["input_ids"], tokenizer("Problem: 5-1?")["input_ids"]]
    torch.manual_seed(0)
    rollouts = rollout_backend.generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=1.2, num_generations=3)
    )
    assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
    for rollout in rollouts:
        assert 1 <= len(rollout.token_ids) <= 8
        if rollout.finished:
            assert rollout.token_ids[-1] in stop
            assert not stop & set(rollout.token_ids[:-1])
        else:
            assert len(rollout.token_ids) == 8 and not stop & set(rollout.token_ids)


def test_sampling_is_reproducible_for_a_seed(backend) -> None:
    rollout_backend, tokenizer = backend
    prompts = [tokenizer("Problem: 7+8?")["input_ids"]]
    params = SamplingParams(max_new_tokens=8, temperature=1.2, top_p=0.95, top_k=20)
    torch.manual_seed(123)
    first = rollout_backend.generate(prompts, params)
    torch.manual_seed(123)
    second = rollout_backend.generate(prompts, params)
    assert first == second
