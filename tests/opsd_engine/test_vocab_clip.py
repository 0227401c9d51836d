"""Tests for the per-vocabulary-entry clip (``vocab_clip``) in both loss paths.

The reference is a float64 re-statement of the OPSD authors' ``generalized_jsd_loss`` with
``token_clip`` (their ``jsd_token_clip``): the elementwise ``F.kl_div(..., reduction="none",
log_target=True)`` terms are clamped from above, summed over the vocabulary, then averaged over
the valid tokens. Both :func:`rollout_loss_from_logits` (naive) and
:func:`rollout_loss_from_hidden` (chunked) must match it in value and student gradient, for
``jsd`` at beta 0, 1 and in between and the two explicit KL names, and count the clipped entries.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from opsd_engine.chunked_loss import rollout_loss_from_hidden
from opsd_engine.losses import rollout_loss_from_logits, token_divergence, token_divergence_terms

CASES = [
    ("jsd", 0.0),
    ("jsd", 0.3),
    ("jsd", 0.5),
    ("jsd", 1.0),
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
]


def _authors_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """The authors' elementwise ``jsd`` tensor ``[..., V]`` before clamping, in float64."""
    s = F.log_softmax(student_logits.double() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True)
    b = torch.tensor(beta, dtype=torch.float64)
    mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(mix, t, reduction="none", log_target=True)
    kl_student = F.kl_div(mix, s, reduction="none", log_target=True)
    return b * kl_teacher + (1 - b) * kl_student


def _beta_of(kind: str, beta: float) -> float:
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)


def _reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    vocab_clip: float,
    normalizer: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, student-logit gradient, elementwise clipped flags at valid positions)."""
    student = student_logits.detach().double().requires_grad_(True)
    terms = _authors_terms(student, teacher_logits.detach(), _beta_of(kind, beta), temperature)
    loss = terms.clamp(max=vocab_clip).sum(-1)[mask].sum() / normalizer
    loss.backward()
    assert student.grad is not None
    return loss.detach(), student.grad, (terms.detach() > vocab_clip) & mask.unsqueeze(-1)


def _inputs(seed: int, *, batch: int = 2, length: int = 9, hidden: int = 6, vocab: int = 40):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 1.2
    student = torch.randn(batch, length, hidden, generator=g, dtype=torch.float64)
    teacher = student + 0.8 * torch.randn(batch, length, hidden, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=g) < 0.7
    mask[0, 0] = True
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return student, teacher, weight, ids, mask


def _clip_between(terms: torch.Tensor, mask: torch.Tensor) -> float:
    """A clip level that is active on some but not all positive entries."""
    positive = terms[mask][terms[mask] > 0]
    return float(positive.quantile(0.97))


@pytest.mark.parametrize("temperature", [1.0, 1.5])
@pytest.mark.parametrize(("kind", "beta"), CASES)
def test_both_paths_match_the_authors_definition(
    kind: str, beta: float, temperature: float
) -> None:
    student_h, teacher_h, weight, ids, mask = _inputs(seed=3)
    student_logits, teacher_logits = student_h @ weight.T, teacher_h @ weight.T
    terms = _authors_terms(student_logits, teacher_logits, _beta_of(kind, beta), temperature)
    vocab_clip = _clip_between(terms, mask)
    args: dict[str, Any] = {
        "kind": kind,
        "beta": beta,
        "temperature": temperature,
        "vocab_clip": vocab_clip,
        "normalizer": 11.0,
    }
    ref_loss, ref_grad, ref_clipped = _reference(student_logits, teacher_logits, mask, **args)
    assert ref_clipped.any() and (~ref_clipped[mask]).any()
    common: dict[str, Any] = {
        "loss": kind,
        "beta": beta,
        "temperature": temperature,
        "vocab_clip": vocab_clip,
        "normalizer": 11.0,
    }

    # naive path, on logits
    logits = student_logits.clone().requires_grad_(True)
    naive = rollout_loss_from_logits(logits, teacher_logits, ids, mask, **common)
    naive.loss.backward()
    torch.testing.assert_close(naive.loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert int(naive.vocab_clipped_entries) == int(ref_clipped.sum())
    assert int(naive.vocab_clipped_tokens) == int(ref_clipped.any(-1).sum())
    # the reported divergence is the unclipped one
    unclipped = token_divergence(
        student_logits, teacher_logits, divergence=kind, beta=beta, temperature=temperature
    )
    torch.testing.assert_close(naive.divergence_sum, unclipped[mask].sum())

    # chunked path, on hidden states, with an uneven last chunk
    ref_hidden_grad = torch.einsum("btv,vh->bth", ref_grad, weight)
    hidden = student_h.clone().requires_grad_(True)
    chunked = rollout_loss_from_hidden(
        hidden, teacher_h, weight, None, ids, mask, chunk_size=4, **common
    )
    chunked.loss.backward()
    torch.testing.assert_close(chunked.loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert hidden.grad is not None
    torch.testing.assert_close(hidden.grad, ref_hidden_grad, rtol=1e-9, atol=1e-12)
    assert int(chunked.vocab_clipped_entries) == int(ref_clipped.sum())
    assert int(chunked.vocab_clipped_tokens) == int(ref_clipped.any(-1).sum())
    torch.testing.assert_close(chunked.divergence_sum, naive.divergence_sum)


@pytest.mark.parametrize(("kind", "beta"), [("jsd", 0.0), ("jsd", 0.5), ("reverse_kl", 0.5)])
def test_float32_chunked_matches_float64_reference(kind: str, beta: float) -> None:
    student_h, teacher_h, weight, ids, mask = _inputs(seed=5, length=17, vocab=300)
    student_logits, teacher_logits = student_h @ weight.T, teacher_h @ weight.T
    ref_loss, ref_grad, _ = _reference(
        student_logits,
        teacher_logits,
        mask,
        kind=kind,
        beta=beta,
        temperature=1.0,
        vocab_clip=0.05,
        normalizer=float(mask.sum()),
    )
    hidden = student_h.float().requires_grad_(True)
    result = rollout_loss_from_hidden(
        hidden,
        teacher_h.float(),
        weight.float(),
        None,
        ids,
        mask,
        loss=kind,  # type: ignore[arg-type]
        beta=beta,
        vocab_clip=0.05,
        normalizer=float(mask.sum()),
        chunk_size=8,
    )
    result.loss.backward()
    torch.testing.assert_close(result.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert hidden.grad is not None
    expected = torch.einsum("btv,vh->bth", ref_grad, weight)
    scale = float(expected.abs().max())
    torch.testing.assert_close(hidden.grad.double(), expected, rtol=1e-4, atol=1e-5 * scale)


def test_clipped_loss_can_be_negative() -> None:
    # Forward KL, p_T = (0.5, 0.5), p_S = (0.1, 0.9): the terms are 0.5 ln 5 = 0.80 (clipped to
    # 0.05) and 0.5 ln(5/9) = -0.29 (kept), so the clipped loss is -0.24 < 0 < KL = 0.51.
    teacher = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64).log()
    student = torch.tensor([[[0.1, 0.9]]], dtype=torch.float64).log()
    mask = torch.ones(1, 1, dtype=torch.bool)
    ids = torch.zeros(1, 1, dtype=torch.long)
    terms = token_divergence_terms(student, teacher, divergence="forward_kl")
    assert float(terms.sum()) > 0  # the divergence itself is positive
    expected = float(terms.clamp(max=0.05).sum())
    assert math.isclose(expected, 0.05 + 0.5 * math.log(5 / 9), rel_tol=1e-12)
    for result in (
        rollout_loss_from_logits(
            student, teacher, ids, mask, loss="forward_kl", vocab_clip=0.05, normalizer=1
        ),
        rollout_loss_from_hidden(
            student,
            teacher,
            torch.eye(2, dtype=torch.float64),
            None,
            ids,
            mask,
            loss="forward_kl",
            vocab_clip=0.05,
            normalizer=1,
        ),
    ):
        assert math.isclose(float(result.loss), expected, rel_tol=1e-12)
        assert int(result.vocab_clipped_entries) == 1
        assert int(result.vocab_clipped_tokens) == 1


def test_vocab_clip_then_token_clip_in_both_paths() -> None:
    student_h, teacher_h, weight, ids, mask = _inputs(seed=9)
    student_logits, teacher_logits = student_h @ weight.T, teacher_h @ weight.T
    terms = _authors_terms(student_logits, teacher_logits, 0.5, 1.0)
    vocab_clip = _clip_between(terms, mask)
    per_token = terms.clamp(max=vocab_clip).sum(-1)
    clip = float(per_token[mask].median())
    expected_clipped = (per_token > clip) & mask
    expected = torch.where(mask, per_token.clamp(max=clip), 0).sum() / 5
    naive = rollout_loss_from_logits(
        student_logits, teacher_logits, ids, mask, vocab_clip=vocab_clip, clip=clip, normalizer=5
    )
    hidden = student_h.clone().requires_grad_(True)
    chunked = rollout_loss_from_hidden(
        hidden,
        teacher_h,
        weight,
        None,
        ids,
        mask,
        vocab_clip=vocab_clip,
        clip=clip,
        normalizer=5,
        chunk_size=3,
    )
    chunked.loss.backward()
    for result in (naive, chunked):
        torch.testing.assert_close(result.loss, expected)
        assert int(result.clipped_tokens) == int(expected_clipped.sum()) > 0
    assert hidden.grad is not None
    assert (hidden.grad[expected_clipped] == 0).all()


def test_vocab_clip_rejects_bad_arguments() -> None:
    student_h, teacher_h, weight, ids, mask = _inputs(seed=1)
    logits = student_h @ weight.T
    with pytest.raises(ValueError, match="vocab_clip"):
        rollout_loss_from_logits(logits, logits, ids, mask, vocab_clip=0.0, normalizer=1)
    with pytest.raises(ValueError, match="sampled_token"):
        rollout_loss_from_hidden(
            student_h,
            teacher_h,
            weight,
            None,
            ids,
            mask,
            loss="sampled_token",
            vocab_clip=0.05,
            normalizer=1,
        )
