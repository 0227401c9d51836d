"""OPSD per-token losses on full logits: the reference (naive) path.

This module owns the loss math of On-Policy Self-Distillation (paper Section 3.2) as pure tensor
functions on ``[..., T, V]`` logits:

* :func:`token_divergence`: per-position ``D(p_T || p_S)`` for the generalized Jensen-Shannon
  divergence ``JSD_beta`` (Eq. 7), forward KL ``KL(p_T || p_S)`` and reverse KL ``KL(p_S || p_T)``;
* :func:`token_divergence_terms`: the per-vocabulary-entry terms whose sum over the vocabulary is
  that divergence (what the OPSD authors' ``jsd_token_clip`` clamps, see
  :func:`rollout_loss_from_logits`);
* :func:`token_entropy`: per-position entropy;
* :func:`sampled_token_advantage_loss`: the sampled-token policy-gradient objective (Eq. 9);
* :func:`rollout_loss_from_logits`: the masked, step-normalized rollout loss plus its statistics,
  returned as a :class:`RolloutLoss`.

Everything is computed in float32 (float64 when an input is float64) whatever the input dtype, in
log space (``logsumexp`` / ``logaddexp``), so underflowing probabilities never produce
``log(0)``. Logits must be finite. Gradients flow to the student logits only: the teacher's
logits are detached inside every function.

This full-logits path materializes several ``[B, T, V]`` tensors and is meant as the readable
reference; :mod:`opsd_engine.chunked_loss` computes the same quantities from hidden states without
ever building a ``[T, V]`` tensor, and is tested against this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

Divergence = Literal["jsd", "forward_kl", "reverse_kl"]
LossKind = Literal["jsd", "forward_kl", "reverse_kl", "sampled_token"]

DIVERGENCES: tuple[str, ...] = get_args(Divergence)
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)

__all__ = [
    "DIVERGENCES",
    "LOSS_KINDS",
    "Divergence",
    "LossKind",
    "RolloutLoss",
    "compute_dtype",
    "masked_mean",
    "rollout_loss_from_logits",
    "sampled_token_advantage_loss",
    "token_divergence",
    "token_divergence_terms",
    "token_entropy",
    "validate_loss_args",
]


@dataclass
class RolloutLoss:
    """The rollout loss of one micro-batch and its statistics (all sums over valid positions).

    Sums rather than means are returned so that the caller can add them over micro-batches and
    data-parallel ranks before dividing by the step's valid-token count.
    """

    loss: Tensor
    """Scalar with grad: sum over valid positions of the per-token loss / normalizer."""
    divergence_sum: Tensor
    """Detached fp32 scalar: sum of the per-token divergence (unclipped). For ``sampled_token``
    it is the sampled-token reverse-KL estimate ``log p_S(y_n) - log p_T(y_n)``."""
    student_entropy_sum: Tensor
    """Detached fp32 scalar: sum of the student's entropy (at the loss temperature)."""
    teacher_entropy_sum: Tensor
    """Detached fp32 scalar: sum of the teacher's entropy (at the loss temperature)."""
    clipped_tokens: Tensor
    """Detached count of valid positions where the clip was active."""
    valid_tokens: Tensor
    """Detached count of valid positions."""
    vocab_clipped_entries: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    """Detached count of (valid position, vocabulary entry) pairs where ``vocab_clip`` was active
    (0 when it is off)."""
    vocab_clipped_tokens: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    """Detached count of valid positions with at least one vocabulary entry clipped."""


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the loss math runs in: float32, or float64 when any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def validate_loss_args(
    loss: str,
    beta: float,
    temperature: float,
    clip: float | None,
    normalizer: float | Tensor,
    vocab_clip: float | None = None,
) -> None:
    """Raise ``ValueError`` for arguments outside their domain (shared with the chunked path)."""
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
    _validate_beta_temperature(beta, temperature)
    if clip is not None and not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a positive finite number or None, got {clip}")
    if vocab_clip is not None:
        if not (vocab_clip > 0 and math.isfinite(vocab_clip)):
            raise ValueError(
                f"vocab_clip must be a positive finite number or None, got {vocab_clip}"
            )
        if loss == "sampled_token":
            raise ValueError("vocab_clip applies to the divergences, not to sampled_token")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
    elif not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (valid tokens in the step), got {normalizer}")


def _validate_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def _log_probs(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """``log_softmax(logits / temperature)`` in ``dtype`` over the last dim.

    Written as ``x - logsumexp(x)``: at a 151,936-token vocabulary the CPU float32
    ``F.log_softmax`` kernel is off by ~3e-5 in the log-probabilities (its sum of exponentials
    is accumulated less carefully), ten times more than this, which biased fp32 divergences by
    ~1e-5 relative.
    """
    scaled = logits.to(dtype)
    if temperature != 1.0:
        scaled = scaled / temperature
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def _checked_log_probs(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str,
    beta: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """(log p_S, log p_T) at the loss temperature after the arguments' checks (the teacher's
    detached); ValueError names a bad divergence, beta, temperature or mismatched shapes."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    _validate_beta_temperature(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    dtype = compute_dtype(student_logits, teacher_logits)
    log_p_s = _log_probs(student_logits, temperature, dtype)
    log_p_t = _log_probs(teacher_logits.detach(), temperature, dtype)
    return log_p_s, log_p_t


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last dim, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position divergence ``D(p_T || p_S)`` between next-token distributions.

    Args:
        student_logits: ``[..., T, V]`` student logits (any float dtype; gradients flow here).
        teacher_logits: ``[..., T, V]`` teacher logits (detached inside: never gets a gradient).
        divergence: ``"jsd"``: generalized Jensen-Shannon
            ``JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)`` with
            ``m = beta * p_T + (1 - beta) * p_S`` (paper Eq. 7). At the ends, where ``JSD_beta``
            itself vanishes, the normalized limits are used, as in GKD / TRL:
            ``beta == 0`` gives ``lim JSD_beta / beta = KL(p_T || p_S)`` (forward KL) and
            ``beta == 1`` gives ``lim JSD_beta / (1 - beta) = KL(p_S || p_T)`` (reverse KL).
            So the value is continuous in ``beta`` on ``(0, 1)`` but not at the ends.
            ``"forward_kl"``: ``KL(p_T || p_S)``. ``"reverse_kl"``: ``KL(p_S || p_T)``.
        beta: JSD weight in ``[0, 1]`` (ignored by the KL divergences).
        temperature: loss temperature (> 0): both logits are divided by it before the softmax.
            The result is not multiplied by ``temperature ** 2``.

    Returns:
        ``[..., T]`` float32 divergences (float64 if an input is float64).
    """
    log_p_s, log_p_t = _checked_log_probs(
        student_logits, teacher_logits, divergence=divergence, beta=beta, temperature=temperature
    )

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl_from_log_probs(log_p_t, log_p_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl_from_log_probs(log_p_s, log_p_t)
    # log m = logsumexp(log(beta) + log p_T, log(1 - beta) + log p_S), never log(0).
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    kl_teacher = _kl_from_log_probs(log_p_t, log_m)
    kl_student = _kl_from_log_probs(log_p_s, log_m)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def token_divergence_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-vocabulary-entry terms ``[..., T, V]`` whose sum over ``V`` is :func:`token_divergence`.

    With ``p_T``, ``p_S`` the softmaxes and ``m = beta p_T + (1 - beta) p_S``, entry ``v`` is
    ``p_T,v (log p_T,v - log p_S,v)`` for forward KL (``jsd`` with ``beta == 0``),
    ``p_S,v (log p_S,v - log p_T,v)`` for reverse KL (``jsd`` with ``beta == 1``), and
    ``beta p_T,v (log p_T,v - log m_v) + (1 - beta) p_S,v (log p_S,v - log m_v)`` otherwise: the
    elementwise ``F.kl_div(..., reduction="none", log_target=True)`` tensors of the OPSD authors'
    ``generalized_jsd_loss``. Single terms can be negative (only their sum is a divergence).
    Arguments, dtype and gradient flow as in :func:`token_divergence`.
    """
    log_p_s, log_p_t = _checked_log_probs(
        student_logits, teacher_logits, divergence=divergence, beta=beta, temperature=temperature
    )
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return log_p_t.exp() * (log_p_t - log_p_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return log_p_s.exp() * (log_p_s - log_p_t)
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    return beta * log_p_t.exp() * (log_p_t - log_m) + (1.0 - beta) * log_p_s.exp() * (
        log_p_s - log_m
    )


def token_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Per-position entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)``.

    ``logits`` is ``[..., T, V]``; returns ``[..., T]`` in float32 (float64 for float64 input).
    """
    _validate_beta_temperature(0.0, temperature)
    log_p = _log_probs(logits, temperature, compute_dtype(logits))
    return -(log_p.exp() * log_p).sum(dim=-1)


def _sampled_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(log p_S(y_n), log p_T(y_n))``, each ``[..., T]``; only the first carries a gradient."""
    _validate_beta_temperature(0.0, temperature)
    if sampled_ids.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"sampled_ids shape {tuple(sampled_ids.shape)} does not match logits "
            f"{tuple(student_logits.shape)}"
        )
    dtype = compute_dtype(student_logits, teacher_logits)
    index = sampled_ids.long().unsqueeze(-1)
    log_p_s = _log_probs(student_logits, temperature, dtype).gather(-1, index).squeeze(-1)
    log_p_t = _log_probs(teacher_logits.detach(), temperature, dtype).gather(-1, index).squeeze(-1)
    return log_p_s, log_p_t


def sampled_token_advantage_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    *,
    temperature: float = 1.0,
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled-token policy-gradient loss (paper Eq. 9), per position.

    ``A_n = log p_T(y_n) - log p_S(y_n)`` is a constant (detached), clamped to ``[-clip, clip]``
    when ``clip`` is set; the per-position loss is ``-A_n * log p_S(y_n)``, whose gradient is
    ``-A_n * grad log p_S(y_n)``.

    Args:
        student_logits: ``[..., T, V]``; position ``t`` predicts ``sampled_ids[..., t]``.
        teacher_logits: ``[..., T, V]`` (detached inside).
        sampled_ids: ``[..., T]`` integer token ids.
        temperature: loss temperature applied to both logits.
        clip: optional bound on ``|A_n|``.

    Returns:
        ``(per_position_loss, advantage)``, both ``[..., T]`` float32; ``advantage`` is detached
        and already clamped.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    log_p_s, log_p_t = _sampled_log_probs(student_logits, teacher_logits, sampled_ids, temperature)
    advantage = (log_p_t - log_p_s).detach()
    if clip is not None:
        advantage = advantage.clamp(-clip, clip)
    return -advantage * log_p_s, advantage


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (0 when none are).

    Masked-out entries are excluded with ``torch.where``, so garbage there never propagates.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / mask.sum().clamp_min(1).to(values.dtype)


def rollout_loss_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    mask: Tensor,
    *,
    loss: LossKind = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    vocab_clip: float | None = None,
    normalizer: float | Tensor,
) -> RolloutLoss:
    """Masked OPSD loss of one micro-batch from full logits (the reference path).

    Args:
        student_logits: ``[B, T, V]``; position ``t`` is the distribution that predicted
            ``sampled_ids[:, t]`` (the caller has already shifted/aligned them).
        teacher_logits: ``[B, T, V]`` aligned the same way (detached inside).
        sampled_ids: ``[B, T]`` long, the student's sampled rollout tokens.
        mask: ``[B, T]`` bool, true at valid rollout positions. Masked-out positions (prompt,
            padding, post-EOS, skipped first tokens) contribute nothing to the loss, the gradient
            or the statistics, whatever finite values their logits hold.
        loss: a divergence (``"jsd"``, ``"forward_kl"``, ``"reverse_kl"``, see
            :func:`token_divergence`) or ``"sampled_token"`` (see
            :func:`sampled_token_advantage_loss`).
        beta: JSD weight in ``[0, 1]``.
        temperature: loss temperature (> 0), applied to both logits.
        clip: optional per-token cap. For divergences the per-token loss is
            ``min(div, clip)``, so a clipped token contributes no gradient; for
            ``sampled_token`` the advantage is clamped to ``[-clip, clip]``. Applied after
            ``vocab_clip`` when both are set.
        vocab_clip: optional per-vocabulary-entry cap, as the OPSD authors' code defines its
            ``jsd_token_clip`` (default 0.05 in their current recipe): every term of
            :func:`token_divergence_terms` is clamped from above before the sum over the
            vocabulary, ``terms.clamp(max=vocab_clip).sum(-1)``; a clamped entry passes no
            gradient. Divergences only (``ValueError`` for ``sampled_token``). Because single
            terms can be negative and only the positive ones are capped, the clipped per-token
            loss, and so the step's loss, **can be negative** (the authors' issue #2); the
            reported ``divergence_sum`` stays the unclipped divergence.
        normalizer: number of valid tokens in the whole optimizer step, i.e. summed over every
            gradient-accumulation micro-batch and every data-parallel rank. The masked sum of
            per-token losses is divided by it and nothing else, so the accumulated gradient of a
            step is the gradient of the mean over all its tokens, however they were split.
            Normalizing each micro-batch by its own count would weight tokens of short
            micro-batches more (the design forbids it).

    Returns:
        A :class:`RolloutLoss`; only ``loss`` carries a gradient (to ``student_logits``).
    """
    validate_loss_args(loss, beta, temperature, clip, normalizer, vocab_clip)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:-1] or sampled_ids.shape != mask.shape:
        raise ValueError(
            f"mask {tuple(mask.shape)} and sampled_ids {tuple(sampled_ids.shape)} must both be "
            f"the logits' leading shape {tuple(student_logits.shape[:-1])}"
        )
    mask = mask.bool()
    teacher_logits = teacher_logits.detach()

    if loss == "sampled_token":
        log_p_s, log_p_t = _sampled_log_probs(
            student_logits, teacher_logits, sampled_ids, temperature
        )
        raw_advantage = (log_p_t - log_p_s).detach()
        divergence = -raw_advantage
        advantage = raw_advantage if clip is None else raw_advantage.clamp(-clip, clip)
        per_token = -advantage * log_p_s
        clipped = raw_advantage.abs() > clip if clip is not None else None
    elif vocab_clip is not None:
        terms = token_divergence_terms(
            student_logits, teacher_logits, divergence=loss, beta=beta, temperature=temperature
        )
        divergence = terms.sum(dim=-1)
        entry_clipped = terms.detach() > vocab_clip
        per_token = terms.clamp(max=vocab_clip).sum(dim=-1)
    else:
        divergence = token_divergence(
            student_logits, teacher_logits, divergence=loss, beta=beta, temperature=temperature
        )
        per_token = divergence
    if loss != "sampled_token":
        clipped = None
        if clip is not None:
            clipped = per_token.detach() > clip
            # min(loss, clip) with no gradient through clipped tokens.
            per_token = torch.where(clipped, torch.full_like(per_token, clip), per_token)

    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.detach().to(device=per_token.device, dtype=per_token.dtype)
    step_loss = torch.where(mask, per_token, zero).sum() / normalizer

    with torch.no_grad():
        student_entropy = token_entropy(student_logits.detach(), temperature=temperature)
        teacher_entropy = token_entropy(teacher_logits, temperature=temperature)
        clipped_tokens = (
            (clipped & mask).sum() if clipped is not None else mask.new_zeros((), dtype=torch.long)
        )
        result = RolloutLoss(
            loss=step_loss,
            divergence_sum=torch.where(mask, divergence.detach(), zero).sum(),
            student_entropy_sum=torch.where(mask, student_entropy, zero).sum(),
            teacher_entropy_sum=torch.where(mask, teacher_entropy, zero).sum(),
            clipped_tokens=clipped_tokens,
            valid_tokens=mask.sum(),
        )
        if loss != "sampled_token" and vocab_clip is not None:
            entry_clipped &= mask.unsqueeze(-1)
            result.vocab_clipped_entries = entry_clipped.sum()
            result.vocab_clipped_tokens = entry_clipped.any(dim=-1).sum()
        return result
