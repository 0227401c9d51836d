"""Tests for opsd_engine.chunked_loss: the OPSD loss from hidden states, chunk by chunk.

The reference is opsd_engine.losses.rollout_loss_from_logits on the full logits
``hidden @ W.T + b``: values, statistics and hidden-state gradients must agree for every loss
kind, with masks, uneven final chunks, temperatures, clipping, biases, tied embeddings, bf16 and
float64 inputs; and no op of the chunked path may produce a ``[T, V]``-sized tensor.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from opsd_engine.chunked_loss import auto_chunk_size, rollout_loss_from_hidden
from opsd_engine.losses import RolloutLoss, rollout_loss_from_logits

LOSS_CASES = [
    ("jsd", 0.0),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 1.0),
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("sampled_token", 0.5),
]
STATS = ("divergence_sum", "student_entropy_sum", "teacher_entropy_sum")


def _inputs(
    *,
    batch: int,
    length: int,
    hidden: int,
    vocab: int,
    dtype: torch.dtype,
    seed: int,
    bias: bool = False,
    valid: float = 0.75,
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    # Logit spread ~ 3 so the softmaxes are peaked but not degenerate.
    weight = randn(vocab, hidden) * (3.0 / math.sqrt(hidden))
    student = randn(batch, length, hidden)
    teacher = student + 0.7 * randn(batch, length, hidden)
    mask = torch.rand(batch, length, generator=generator) < valid
    mask[0, 0] = True
    return {
        "student_hidden": student.to(dtype),
        "teacher_hidden": teacher.to(dtype),
        "output_weight": weight.to(dtype),
        "output_bias": (randn(vocab) * 0.5).to(dtype) if bias else None,
        "sampled_ids": torch.randint(0, vocab, (batch, length), generator=generator),
        "mask": mask,
    }


def _naive(
    inputs: dict[str, Any], upcast: torch.dtype | None = None, **kwargs: Any
) -> tuple[RolloutLoss, torch.Tensor]:
    """Reference: full logits then rollout_loss_from_logits; returns (result, student grad)."""
    student = inputs["student_hidden"].detach().clone()
    teacher = inputs["teacher_hidden"]
    weight, bias = inputs["output_weight"], inputs["output_bias"]
    if upcast is not None:
        student, teacher, weight = student.to(upcast), teacher.to(upcast), weight.to(upcast)
        bias = bias.to(upcast) if bias is not None else None
    student.requires_grad_(True)
    student_logits = student @ weight.T
    teacher_logits = teacher @ weight.T
    if bias is not None:
        student_logits = student_logits + bias
        teacher_logits = teacher_logits + bias
    result = rollout_loss_from_logits(
        student_logits, teacher_logits, inputs["sampled_ids"], inputs["mask"], **kwargs
    )
    result.loss.backward()
    assert student.grad is not None
    return result, student.grad


def _chunked(inputs: dict[str, Any], **kwargs: Any) -> tuple[RolloutLoss, torch.Tensor]:
    student = inputs["student_hidden"].detach().clone().requires_grad_(True)
    result = rollout_loss_from_hidden(
        student,
        inputs["teacher_hidden"],
        inputs["output_weight"],
        inputs["output_bias"],
        inputs["sampled_ids"],
        inputs["mask"],
        **kwargs,
    )
    result.loss.backward()
    assert student.grad is not None
    return result, student.grad


def _assert_same(
    got: RolloutLoss, expected: RolloutLoss, *, rtol: float, atol: float = 0.0
) -> None:
    for field in ("loss", *STATS):
        torch.testing.assert_close(
            getattr(got, field).double(), getattr(expected, field).double(), rtol=rtol, atol=atol
        )
    assert int(got.clipped_tokens) == int(expected.clipped_tokens)
    assert int(got.valid_tokens) == int(expected.valid_tokens)


def _assert_grad_close(got: torch.Tensor, expected: torch.Tensor, *, rtol: float) -> None:
    """Elementwise rtol, with an absolute floor of rtol times the gradient's scale."""
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------
# Exactness against the naive path


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize(("loss", "beta"), LOSS_CASES)
def test_float64_matches_naive_with_masks_and_uneven_chunks(
    loss: str, beta: float, temperature: float, clip: bool
) -> None:
    inputs = _inputs(batch=3, length=9, hidden=12, vocab=37, dtype=torch.float64, seed=1, bias=True)
    valid = int(inputs["mask"].sum())
    assert valid % 7 != 0  # the last chunk is partial
    kwargs: dict[str, Any] = {"loss": loss, "beta": beta, "temperature": temperature}
    if clip:  # half the mean per-token divergence: some tokens are clipped, some not
        unclipped, _ = _naive(inputs, normalizer=1, **kwargs)
        kwargs["clip"] = 0.5 * abs(float(unclipped.divergence_sum)) / valid
    expected, expected_grad = _naive(inputs, normalizer=valid + 3, **kwargs)
    got, grad = _chunked(inputs, normalizer=valid + 3, chunk_size=7, **kwargs)
    _assert_same(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)
    assert (grad[~inputs["mask"]] == 0).all()
    if clip:
        assert 0 < int(got.clipped_tokens) < valid


def test_twenty_valid_positions_in_chunks_of_seven() -> None:
    inputs = _inputs(batch=2, length=14, hidden=8, vocab=29, dtype=torch.float64, seed=2)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[0, 2:12] = True
    mask[1, 4:14] = True
    inputs["mask"] = mask
    assert int(mask.sum()) == 20
    for chunk_size in (1, 7, 20, 1000):
        got, grad = _chunked(inputs, normalizer=20, chunk_size=chunk_size)
        expected, expected_grad = _naive(inputs, normalizer=20)
        _assert_same(got, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13)


def test_non_contiguous_hidden_slices_and_other_leading_shapes() -> None:
    # The trainer passes the rollout slice of [B, L, H] hidden states: a non-contiguous view.
    inputs = _inputs(batch=3, length=8, hidden=10, vocab=33, dtype=torch.float64, seed=17)
    expected, expected_grad = _naive(inputs, normalizer=11)
    full = torch.randn(3, 13, 10, dtype=torch.float64).requires_grad_(True)
    with torch.no_grad():
        full[:, 2:10] = inputs["student_hidden"]
    student = full[:, 2:10]
    assert not student.is_contiguous()
    teacher_full = torch.zeros(3, 11, 10, dtype=torch.float64)
    teacher_full[:, 3:] = inputs["teacher_hidden"]
    got = rollout_loss_from_hidden(
        student,
        teacher_full[:, 3:],
        inputs["output_weight"],
        None,
        inputs["sampled_ids"],
        inputs["mask"],
        normalizer=11,
        chunk_size=4,
    )
    got.loss.backward()
    _assert_same(got, expected, rtol=1e-10, atol=1e-12)
    assert full.grad is not None
    torch.testing.assert_close(full.grad[:, 2:10], expected_grad, rtol=1e-9, atol=1e-13)
    assert (full.grad[:, :2] == 0).all() and (full.grad[:, 10:] == 0).all()
    # One sequence without a batch dimension: [T, H] hidden, [T] mask.
    per_position = ("student_hidden", "teacher_hidden", "sampled_ids", "mask")
    flat, flat_grad = _chunked(
        {**inputs, **{key: inputs[key][0] for key in per_position}}, normalizer=11, chunk_size=3
    )
    single, single_grad = _naive(
        {**inputs, **{key: inputs[key][:1] for key in per_position}}, normalizer=11
    )
    _assert_same(flat, single, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grad, single_grad[0], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize(("loss", "beta"), LOSS_CASES[:-1])
def test_gradient_matches_finite_differences(loss: str, beta: float) -> None:
    # (Not for sampled_token: its gradient treats the advantage as a constant, so it is
    # deliberately not the derivative of the loss value.)
    inputs = _inputs(batch=2, length=5, hidden=6, vocab=11, dtype=torch.float64, seed=3, bias=True)

    def loss_of(student: torch.Tensor) -> torch.Tensor:
        return rollout_loss_from_hidden(
            student,
            inputs["teacher_hidden"],
            inputs["output_weight"],
            inputs["output_bias"],
            inputs["sampled_ids"],
            inputs["mask"],
            loss=loss,  # type: ignore[arg-type]
            beta=beta,
            temperature=0.8,
            normalizer=4,
            chunk_size=3,
        ).loss

    student = inputs["student_hidden"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (student,))


@pytest.mark.parametrize(("loss", "beta"), [("jsd", 0.5), ("jsd", 0.1), *LOSS_CASES[5:]])
def test_fp32_realistic_shapes_match_naive(loss: str, beta: float) -> None:
    inputs = _inputs(batch=2, length=64, hidden=256, vocab=32_000, dtype=torch.float32, seed=4)
    valid = int(inputs["mask"].sum())
    kwargs = {"loss": loss, "beta": beta, "normalizer": valid}
    expected, expected_grad = _naive(inputs, **kwargs)
    got, grad = _chunked(inputs, chunk_size=24, **kwargs)
    _assert_same(got, expected, rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad, expected_grad, rtol=1e-5)
    # Both fp32 paths are within fp32 noise of the float64 truth.
    truth, truth_grad = _naive(inputs, upcast=torch.float64, **kwargs)
    _assert_same(got, truth, rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad.double(), truth_grad, rtol=1e-5)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        # On CUDA the projection takes the mm(..., out_dtype=float32) path instead of fp32 tiles.
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
@pytest.mark.parametrize(
    ("loss", "beta"), [("jsd", 0.5), ("reverse_kl", 0.5), ("sampled_token", 0.5)]
)
def test_bf16_hidden_and_weight(loss: str, beta: float, device: str) -> None:
    inputs = _inputs(
        batch=2, length=16, hidden=64, vocab=3_001, dtype=torch.bfloat16, seed=5, bias=True
    )
    inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
    kwargs = {"loss": loss, "beta": beta, "normalizer": 20}
    got, grad = _chunked(inputs, chunk_size=5, **kwargs)
    assert grad.dtype == torch.bfloat16
    assert got.loss.dtype == torch.float32
    # The logits are never rounded to bf16: same values as fp32 math on the upcast inputs.
    expected, expected_grad = _naive(inputs, upcast=torch.float64, **kwargs)
    _assert_same(got, expected, rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad.double(), expected_grad, rtol=1e-2)


def test_autocast_does_not_round_the_projection() -> None:
    inputs = _inputs(batch=2, length=10, hidden=32, vocab=501, dtype=torch.float32, seed=6)
    plain, plain_grad = _chunked(inputs, normalizer=12, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, under_grad = _chunked(inputs, normalizer=12, chunk_size=4)
    _assert_same(under, plain, rtol=1e-6)
    torch.testing.assert_close(under_grad, plain_grad)


# ---------------------------------------------------------------------------------------------
# Frozen, tied output projection


def test_tied_embedding_weight_gets_no_gradient() -> None:
    torch.manual_seed(7)
    embedding = nn.Embedding(50, 16)
    encoder = nn.Linear(16, 16)
    assert embedding.weight.requires_grad
    token_ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        teacher_hidden = encoder(embedding(token_ids)) + 0.1
    student_hidden = encoder(embedding(token_ids).detach())  # loss only reaches W via lm_head
    mask = torch.ones(2, 8, dtype=torch.bool)
    result = rollout_loss_from_hidden(
        student_hidden, teacher_hidden, embedding.weight, None, token_ids, mask, normalizer=16
    )
    result.loss.backward()
    assert embedding.weight.grad is None
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def _tiny_tied_causal_lm() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(8)
    model = LlamaForCausalLM(config).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("loss", ["jsd", "sampled_token"])
def test_tied_transformers_model_matches_naive_with_frozen_head(loss: str) -> None:
    model = _tiny_tied_causal_lm()
    generator = torch.Generator().manual_seed(9)
    input_ids = torch.randint(0, 97, (2, 12), generator=generator)
    teacher_ids = torch.randint(0, 97, (2, 12), generator=generator)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        teacher_hidden = model.model(input_ids=teacher_ids).last_hidden_state
    weight = model.lm_head.weight

    def grads() -> dict[str, torch.Tensor]:
        out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    hidden = model.model(input_ids=input_ids).last_hidden_state
    ours = rollout_loss_from_hidden(
        hidden,
        teacher_hidden,
        weight,
        None,
        input_ids,
        mask,
        loss=loss,
        normalizer=21,
        chunk_size=5,  # type: ignore[arg-type]
    )
    ours.loss.backward()
    ours_grads = grads()

    hidden = model.model(input_ids=input_ids).last_hidden_state
    frozen = weight.detach()
    reference = rollout_loss_from_logits(
        hidden @ frozen.T,
        teacher_hidden @ frozen.T,
        input_ids,
        mask,
        loss=loss,
        normalizer=21,  # type: ignore[arg-type]
    )
    reference.loss.backward()
    reference_grads = grads()

    _assert_same(ours, reference, rtol=1e-10, atol=1e-12)
    assert ours_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # The tied weight's gradient is the input-embedding path's only: with the head trainable
    # (the naive path without detach) it would differ.
    hidden = model.model(input_ids=input_ids).last_hidden_state
    rollout_loss_from_logits(
        hidden @ weight.T,
        teacher_hidden @ weight.T,
        input_ids,
        mask,
        loss=loss,
        normalizer=21,  # type: ignore[arg-type]
    ).loss.backward()
    trainable_head = grads()["model.embed_tokens.weight"]
    assert not torch.allclose(trainable_head, ours_grads["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------
# Masks, normalization, no-grad, empty steps


def test_masked_positions_are_never_computed() -> None:
    inputs = _inputs(batch=2, length=10, hidden=8, vocab=23, dtype=torch.float64, seed=10)
    expected, expected_grad = _chunked(inputs, normalizer=9, chunk_size=4)
    poisoned = dict(inputs)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    poisoned["student_hidden"] = torch.where(
        inputs["mask"].unsqueeze(-1), inputs["student_hidden"], nan
    )
    poisoned["teacher_hidden"] = torch.where(
        inputs["mask"].unsqueeze(-1), inputs["teacher_hidden"], nan
    )
    got, grad = _chunked(poisoned, normalizer=9, chunk_size=4)
    _assert_same(got, expected, rtol=0)
    assert (grad[~inputs["mask"]] == 0).all()
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["jsd", "sampled_token"])
def test_micro_batches_with_a_step_normalizer_add_up(loss: str) -> None:
    inputs = _inputs(batch=4, length=8, hidden=8, vocab=31, dtype=torch.float64, seed=11)
    inputs["mask"][2:, 4:] = False
    total = torch.tensor(int(inputs["mask"].sum()))
    _, whole_grad = _chunked(inputs, loss=loss, normalizer=total, chunk_size=5)
    student = inputs["student_hidden"].clone().requires_grad_(True)
    for rows in (slice(0, 2), slice(2, 4)):
        rollout_loss_from_hidden(
            student[rows],
            inputs["teacher_hidden"][rows],
            inputs["output_weight"],
            None,
            inputs["sampled_ids"][rows],
            inputs["mask"][rows],
            loss=loss,  # type: ignore[arg-type]
            normalizer=total,
            chunk_size=5,
        ).loss.backward()
    torch.testing.assert_close(student.grad, whole_grad)


def test_empty_mask_gives_zero_loss_and_zero_gradient() -> None:
    inputs = _inputs(batch=2, length=5, hidden=8, vocab=13, dtype=torch.float32, seed=12)
    inputs["mask"] = torch.zeros(2, 5, dtype=torch.bool)
    got, grad = _chunked(inputs, normalizer=1)
    assert got.loss.item() == 0.0 and int(got.valid_tokens) == 0
    assert (grad == 0).all()


def test_no_grad_returns_values_without_gradient() -> None:
    inputs = _inputs(batch=2, length=6, hidden=8, vocab=19, dtype=torch.float64, seed=13)
    expected, _ = _chunked(inputs, normalizer=5, chunk_size=4)
    student = inputs["student_hidden"].clone().requires_grad_(True)
    with torch.no_grad():
        got = rollout_loss_from_hidden(
            student,
            inputs["teacher_hidden"],
            inputs["output_weight"],
            None,
            inputs["sampled_ids"],
            inputs["mask"],
            normalizer=5,
            chunk_size=4,
        )
    assert not got.loss.requires_grad
    _assert_same(got, expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Memory: no [T, V] tensor, chunk size


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any new storage an op allocates.

    Views and ``out=`` results share an input's storage and are not allocations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = {
            leaf.untyped_storage().data_ptr()
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self.largest = max(self.largest, storage.nbytes() // value.element_size())
        return out


@pytest.mark.parametrize("loss", ["jsd", "forward_kl", "reverse_kl", "sampled_token"])
def test_no_tensor_grows_with_t_times_v(loss: str) -> None:
    length, vocab, chunk = 96, 1_000, 8
    inputs = _inputs(
        batch=1, length=length, hidden=16, vocab=vocab, dtype=torch.float32, seed=14, valid=1.0
    )
    student = inputs["student_hidden"].clone().requires_grad_(True)
    with _LargestOutput() as tracker:
        result = rollout_loss_from_hidden(
            student,
            inputs["teacher_hidden"],
            inputs["output_weight"],
            None,
            inputs["sampled_ids"],
            inputs["mask"],
            loss=loss,  # type: ignore[arg-type]
            normalizer=length,
            chunk_size=chunk,
        )
        result.loss.backward()
    # The largest allocation is the chunk's student + teacher logits, [2 * chunk, V].
    assert tracker.largest == 2 * chunk * vocab
    assert tracker.largest < length * vocab / 5


def test_auto_chunk_size_respects_the_budget() -> None:
    cpu = torch.device("cpu")
    vocab, hidden = 151_936, 2_560
    size = auto_chunk_size(vocab, hidden, cpu, max_bytes=256 * 2**20)
    assert size % 8 == 0 and size >= 8
    per_row = (5 * vocab + 4 * hidden) * 4
    assert per_row * size <= 256 * 2**20 < per_row * (size + 8)
    assert auto_chunk_size(vocab, hidden, cpu, max_bytes=1) == 1
    assert auto_chunk_size(100, 8, cpu, max_bytes=2**40, max_chunk=64) == 64
    assert (
        auto_chunk_size(vocab, hidden, cpu, dtype=torch.float64, max_bytes=256 * 2**20)
        <= size // 2 + 8
    )
    tiny_share = auto_chunk_size(vocab, hidden, cpu, memory_fraction=1e-6, max_bytes=2**40)
    assert tiny_share < auto_chunk_size(vocab, hidden, cpu, memory_fraction=0.5, max_bytes=2**40)
    with pytest.raises(ValueError):
        auto_chunk_size(0, hidden, cpu)


def test_default_chunk_size_runs() -> None:
    inputs = _inputs(batch=2, length=12, hidden=8, vocab=41, dtype=torch.float64, seed=15)
    expected, expected_grad = _naive(inputs, normalizer=10)
    got, grad = _chunked(inputs, normalizer=10)
    _assert_same(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad)


def test_rejects_bad_arguments() -> None:
    inputs = _inputs(batch=1, length=4, hidden=8, vocab=11, dtype=torch.float32, seed=16)
    bad_weight = dict(inputs, output_weight=torch.zeros(11, 7))
    with pytest.raises(ValueError, match="output_weight"):
        _chunked(bad_weight, normalizer=1)
    with pytest.raises(ValueError, match="output_bias"):
        _chunked(dict(inputs, output_bias=torch.zeros(10)), normalizer=1)
    with pytest.raises(ValueError, match="chunk_size"):
        _chunked(inputs, normalizer=1, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        _chunked(inputs, normalizer=1, beta=2.0)
    with pytest.raises(ValueError, match="mask"):
        _chunked(dict(inputs, mask=inputs["mask"][:, :2]), normalizer=1)
