"""Student rollouts: left-padded batched sampling returns the right token ids, seeded per rollout
so that a rollout does not depend on the batch it was sampled in."""

from __future__ import annotations

import pytest
import torch

from opsd_engine.events import StepCancelled
from opsd_engine.modeling import load_tokenizer, stop_token_ids
from opsd_engine.rollout import (
    SamplingParams,
    TransformersRolloutBackend,
    cut_at_stop,
    derive_seed,
    rollout_seed,
    sample_next_tokens,
)


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


def _prompts(tokenizer) -> list[list[int]]:
    texts = [
        "Problem: 1+2?\nAnswer:",
        "Problem: a far longer question about 12 oranges shared among 3 friends?\nAnswer:",
        "Problem: 9-4?",
        "Problem: how many legs do 5 spiders and 2 cats have together?\nAnswer:",
    ]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=24, temperature=0.0),
        SamplingParams(max_new_tokens=24, temperature=1.2),
        SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.8, top_k=40, num_generations=2),
    ],
    ids=["greedy", "sampled", "top-p-top-k-groups"],
)
def test_seeded_rollouts_do_not_depend_on_the_batch(backend, params) -> None:
    """The same prompt and seed give the same rollout alone, in a batch, in another order and
    when the backend splits the call for memory (one row per call)."""
    rollout_backend, tokenizer = backend
    prompts = _prompts(tokenizer)
    seeds = [rollout_seed(7, 0, i) for i in range(len(prompts))]
    together = rollout_backend.generate(prompts, params, seeds=seeds)
    if params.temperature > 0:  # (greedy runs every row to the end here)
        assert len({len(r.token_ids) for r in together}) > 1, "want rows that leave early"
    n = params.num_generations
    for index, prompt in enumerate(prompts):
        alone = rollout_backend.generate([prompt], params, seeds=[seeds[index]])
        assert [r.token_ids for r in alone] == [
            r.token_ids for r in together[index * n : (index + 1) * n]
        ]
    order = [2, 0, 3, 1]
    shuffled = rollout_backend.generate(
        [prompts[i] for i in order], params, seeds=[seeds[i] for i in order]
    )
    for position, index in enumerate(order):
        assert [r.token_ids for r in shuffled[position * n : (position + 1) * n]] == [
            r.token_ids for r in together[index * n : (index + 1) * n]
        ]
    one_row = TransformersRolloutBackend(
        rollout_backend.model,
        pad_id=rollout_backend.pad_id,
        stop_ids=rollout_backend.stop_ids,
        device=rollout_backend.device,
        memory_budget_bytes=1,  # max_rows() == 1: one prompt per call
    )
    assert one_row.max_rows(50, 24) == 1
    assert one_row.generate(prompts, params, seeds=seeds) == together


def test_seeds_key_the_rollouts(backend) -> None:
    rollout_backend, tokenizer = backend
    prompt = _prompts(tokenizer)[0]
    params = SamplingParams(max_new_tokens=16, temperature=1.2, num_generations=3)
    first = rollout_backend.generate([prompt], params, seeds=[rollout_seed(0, 0, 5)])
    again = rollout_backend.generate([prompt], params, seeds=[rollout_seed(0, 0, 5)])
    other_epoch = rollout_backend.generate([prompt], params, seeds=[rollout_seed(0, 1, 5)])
    assert first == again
    assert len({tuple(r.token_ids) for r in first}) == 3, "each generation has its own stream"
    assert [r.token_ids for r in other_epoch] != [r.token_ids for r in first]
    # the key is (seed, epoch, example); blake2b, so it is stable across processes and versions
    assert rollout_seed(0, 0, 5) == derive_seed(0x4F505344, 0, 0, 5)
    assert len({rollout_seed(s, e, i) for s in (0, 1) for e in (0, 1) for i in (0, 1)}) == 8


def test_sampling_draws_from_the_filtered_distribution() -> None:
    """Exact inverse-CDF draws: frequencies match temperature / top-k / top-p probabilities and
    filtered-out tokens are never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    count = 40_000
    uniforms = torch.rand(count, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cases = [
        (SamplingParams(1, temperature=1.0), torch.softmax(logits[0], -1)),
        (SamplingParams(1, temperature=2.0), torch.softmax(logits[0] / 2, -1)),
        (SamplingParams(1, temperature=1.0, top_k=2), torch.softmax(logits[0, :2], -1)),
        # softmax = [.55, .20, .12, .07, .03]: top_p 0.7 keeps the first two (0.55 < 0.7)
        (SamplingParams(1, temperature=1.0, top_p=0.7), torch.softmax(logits[0, :2], -1)),
    ]
    for params, expected in cases:
        tokens = sample_next_tokens(logits.expand(count, -1), uniforms, params)
        frequencies = torch.bincount(tokens, minlength=5).double() / count
        wanted = torch.zeros(5, dtype=torch.float64)
        wanted[: len(expected)] = expected.double()
        assert (frequencies[wanted == 0] == 0).all(), params
        torch.testing.assert_close(frequencies, wanted, atol=0.01, rtol=0)
    greedy = sample_next_tokens(logits, uniforms[:1], SamplingParams(1, temperature=0.0))
    assert greedy.tolist() == [0]
    # u just below 1 never runs past the last token of positive probability
    edge = torch.tensor([1.0 - 2**-53], dtype=torch.float64)
    assert sample_next_tokens(logits, edge, SamplingParams(1, top_k=2)).tolist() == [1]


def test_a_stop_while_sampling_raises_and_restores_the_mode(backend) -> None:
    rollout_backend, tokenizer = backend
    model = rollout_backend.model.train()
    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return True

    params = SamplingParams(max_new_tokens=64, temperature=1.2)
    with pytest.raises(StepCancelled):
        rollout_backend.generate(
            _prompts(tokenizer), params, seeds=[1, 2, 3, 4], should_stop=should_stop
        )
    assert polls == [1], "polled every few decode steps, stopped at the first True"
    assert model.training
    model.eval()


def test_folded_lora_computes_the_same_function_and_leaves_the_weights(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from opsd_engine.config import LoraConfig
    from opsd_engine.modeling import attach_lora
    from opsd_engine.rollout import folded_lora

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the adapter changes the function
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 9, 30, 41, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        with folded_lora(model) as folded:
            got = model(input_ids=ids).logits
        with model.disable_adapter(), folded_lora(model) as folded_disabled:
            got_disabled = model(input_ids=ids).logits
    assert folded == 14 and folded_disabled == 0  # 2 layers x 7 projections; none when off
    assert (expected - base_logits).abs().max() > 1e-3, "the adapter must matter here"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_disabled, base_logits, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all("forward" not in vars(m) for m in model.modules()), "forwards restored"
    with torch.no_grad(), folded_lora(model, max_bytes=0) as none_fit:
        assert none_fit == 0
