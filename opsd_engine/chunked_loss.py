"""OPSD rollout loss from final hidden states, one chunk of positions at a time (the default path).

This module owns the memory-efficient twin of
:func:`opsd_engine.losses.rollout_loss_from_logits`. :func:`rollout_loss_from_hidden` takes
the student's and the teacher's final hidden states at the rollout positions plus the frozen
output projection (``lm_head``) and returns the same :class:`~opsd_engine.losses.RolloutLoss`
(loss, divergence and entropy sums, clip and token counts) for every loss kind (``jsd`` for any
beta, ``forward_kl``, ``reverse_kl``, ``sampled_token``), without ever building a ``[T, V]``
tensor. :func:`auto_chunk_size` picks the chunk length from the memory available.

How: only the valid (masked-in) positions are gathered, then :class:`_ChunkedRolloutLoss` walks
them ``chunk_size`` at a time. Per chunk it projects the student and teacher hidden states to
float32 logits with one matmul (``[2 * chunk, V]``), computes the per-token loss, the statistics
and the exact analytic gradient of the loss with respect to the student logits, and immediately
maps that gradient back to the student hidden states (``dlogits @ W``). The backward pass then
only scales the stored ``[N_valid, H]`` gradient by the incoming one. Peak memory is five
``[chunk, V]`` float32 buffers (reused across chunks) plus ``O(N_valid * H)``, independent of
``T * V``. Each position costs the naive path's three vector-matrix products with the output
projection (fewer than schemes that recompute the logits in backward), in two passes over the
weight per chunk.

The output projection is a frozen constant here: it is detached inside, so it never receives a
gradient from this loss, even when it is tied to (and shares ``requires_grad=True`` with) the
input embeddings. OPSD trains LoRA adapters, which never touch ``lm_head``.

Precision: all softmax/divergence math is float32 (float64 when an input is float64). When the
weight is float32 the logits are an exact float32 matmul. When it is bf16/fp16 the logits are
still accumulated and kept in float32 (never rounded to bf16): on CUDA with a torch that has
``mm(..., out_dtype=float32)`` directly, elsewhere by casting vocabulary tiles of the weight to
float32. The hidden-state gradient is returned in the student hidden states' dtype.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from opsd_engine.losses import LossKind, RolloutLoss, compute_dtype, validate_loss_args

__all__ = ["auto_chunk_size", "rollout_loss_from_hidden"]

# Float [chunk, V] buffers alive at once per chunk: student and teacher logits (turned into
# log-probabilities in place), their probabilities and one scratch buffer.
_BUFFERS_PER_ROW = 5
# Upper bound on the bytes of those buffers, per device type: past this, larger chunks no longer
# speed anything up, they only hold memory the model could use.
_DEFAULT_MAX_BYTES = {"cpu": 512 * 2**20, "cuda": 1024 * 2**20}
_FALLBACK_MAX_BYTES = 512 * 2**20
# Vocabulary tile of a low-precision weight that is upcast at once (bytes of the float copy).
_WEIGHT_TILE_BYTES = 64 * 2**20


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or ``None`` when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            return int(psutil.virtual_memory().available)
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def auto_chunk_size(
    vocab_size: int,
    hidden_size: int,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    memory_fraction: float = 0.25,
    max_bytes: int | None = None,
    max_chunk: int = 4096,
) -> int:
    """Number of positions per chunk for :func:`rollout_loss_from_hidden`.

    The chunk's working set (``5`` float ``[chunk, vocab_size]`` buffers plus a few
    ``[chunk, hidden_size]`` rows) is kept under ``memory_fraction`` of the memory available on
    ``device`` right now, and under ``max_bytes`` (default 512 MiB on CPU, 1 GiB on CUDA: enough
    for full matmul efficiency). The result is at least 1, a multiple of 8 when 8 or more, and at
    most ``max_chunk``.

    Args:
        vocab_size: rows of the output projection.
        hidden_size: width of the hidden states.
        device: where the loss runs.
        dtype: dtype of the loss math (float32, or float64 for float64 inputs).
        memory_fraction: share of the currently available memory the buffers may use.
        max_bytes: cap on the buffers' bytes (overrides the per-device default).
        max_chunk: cap on the result.
    """
    if vocab_size <= 0 or hidden_size <= 0:
        raise ValueError(f"vocab_size and hidden_size must be > 0, got {vocab_size}, {hidden_size}")
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = (_BUFFERS_PER_ROW * vocab_size + 4 * hidden_size) * itemsize
    budget = _DEFAULT_MAX_BYTES.get(device.type, _FALLBACK_MAX_BYTES)
    if max_bytes is not None:
        budget = max_bytes
    available = _available_memory(device)
    if available is not None:
        budget = min(budget, int(available * memory_fraction))
    rows = max(1, min(max_chunk, budget // per_row))
    return rows - rows % 8 if rows >= 8 else rows


@functools.cache
def _cuda_mm_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32)`` works for ``dtype`` inputs on this device."""
    try:
        a = torch.ones((2, 2), device=device, dtype=dtype)
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def _fast_low_precision(weight: Tensor, dtype: torch.dtype) -> bool:
    return (
        weight.device.type == "cuda"
        and dtype == torch.float32
        and weight.dtype in (torch.bfloat16, torch.float16)
        and _cuda_mm_out_dtype_ok(weight.device, weight.dtype)
    )


def _weight_tile_rows(weight: Tensor, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, _WEIGHT_TILE_BYTES // (weight.shape[1] * itemsize))


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """``out = hidden @ weight.T + bias`` with ``out`` (``[n, V]``) float32/float64.

    The product is accumulated and stored in ``out.dtype`` whatever the weight's dtype.
    """
    dtype = out.dtype
    if weight.dtype == dtype:
        h = hidden.to(dtype)
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias.to(dtype), h, weight.t(), out=out)
        return
    if _fast_low_precision(weight, dtype):
        torch.mm(hidden.to(weight.dtype), weight.t(), out_dtype=dtype, out=out)
        if bias is not None:
            out.add_(bias.to(dtype))
        return
    h = hidden.to(dtype)
    tile = _weight_tile_rows(weight, dtype)
    for start in range(0, weight.shape[0], tile):
        end = min(start + tile, weight.shape[0])
        w = weight[start:end].to(dtype)
        if bias is None:
            torch.mm(h, w.t(), out=out[:, start:end])
        else:
            torch.addmm(bias[start:end].to(dtype), h, w.t(), out=out[:, start:end])


def _back_project(grad_logits: Tensor, weight: Tensor, out: Tensor) -> None:
    """``out = grad_logits @ weight`` (``[n, V] @ [V, H]``) accumulated in ``out.dtype``."""
    dtype = out.dtype
    if weight.dtype == dtype:
        torch.mm(grad_logits, weight, out=out)
        return
    if _fast_low_precision(weight, dtype):
        torch.mm(grad_logits.to(weight.dtype), weight, out_dtype=dtype, out=out)
        return
    out.zero_()
    tile = _weight_tile_rows(weight, dtype)
    for start in range(0, weight.shape[0], tile):
        end = min(start + tile, weight.shape[0])
        out.addmm_(grad_logits[:, start:end], weight[start:end].to(dtype))


def _log_softmax_(logits: Tensor, probs: Tensor) -> None:
    """In place: ``logits`` becomes ``log_softmax(logits)`` and ``probs`` its ``exp``.

    One ``exp`` pass gives both (the exponentials of the shifted logits are normalized into
    ``probs``); no ``log`` of a probability is ever taken.
    """
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    torch.exp(logits, out=probs)
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    logits.sub_(total.log_())


class _ChunkStats:
    """Running sums of one forward pass (0-d tensors in the loss dtype)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        def zero() -> Tensor:
            return torch.zeros((), device=device, dtype=dtype)

        self.loss = zero()
        self.divergence = zero()
        self.student_entropy = zero()
        self.teacher_entropy = zero()
        self.clipped = torch.zeros((), device=device, dtype=torch.long)
        self.vocab_clipped_entries = torch.zeros((), device=device, dtype=torch.long)
        self.vocab_clipped_tokens = torch.zeros((), device=device, dtype=torch.long)


def _chunk_loss(
    ls: Tensor,
    lt: Tensor,
    ps: Tensor,
    pt: Tensor,
    scratch: Tensor,
    ids: Tensor,
    *,
    loss: str,
    beta: float,
    temperature: float,
    clip: float | None,
    stats: _ChunkStats,
    vocab_clip: float | None = None,
) -> Tensor:
    """Loss, statistics and ``d(sum of per-token losses) / d(student logits)`` for one chunk.

    ``ls``/``lt`` hold the (temperature-scaled) student/teacher logits of ``n`` positions and
    ``ps``/``pt``/``scratch`` are free buffers of the same ``[n, V]`` shape; all of them are
    overwritten. Adds the chunk's sums to ``stats`` and returns the gradient with respect to the
    unscaled logits, as a view of one of the buffers.

    With ``vocab_clip`` (divergences only) the per-token loss is the sum over the vocabulary of
    the per-entry terms ``t_v`` clamped at ``vocab_clip`` (see
    :func:`opsd_engine.losses.token_divergence_terms`). Every such term has a student-logit
    gradient of the form ``d t_v / d z_k = g_v (delta_vk - p_S,k)``, with ``g_v = -p_T,v``
    (forward KL), ``p_S,v (log p_S,v - log p_T,v + 1)`` (reverse KL) or
    ``(1 - beta) p_S,v (log p_S,v - log m_v)`` (JSD); so with ``u_v = [t_v <= vocab_clip]`` the
    gradient is ``g u - p_S * sum_v(g_v u_v)``. One extra boolean ``[n, V]`` tensor marks the
    clipped entries (a quarter of a float buffer).
    """
    _log_softmax_(ls, ps)
    _log_softmax_(lt, pt)
    stats.student_entropy -= torch.mul(ps, ls, out=scratch).sum()
    stats.teacher_entropy -= torch.mul(pt, lt, out=scratch).sum()

    keep: Tensor | None = None  # rows whose loss is not clipped (divergences only)
    if loss == "sampled_token":
        index = ids.unsqueeze(1)
        log_p_s = ls.gather(1, index).squeeze(1)
        advantage = lt.gather(1, index).squeeze(1) - log_p_s
        stats.divergence -= advantage.sum()
        if clip is not None:
            stats.clipped += (advantage.abs() > clip).sum()
            advantage = advantage.clamp(-clip, clip)
        stats.loss -= (advantage * log_p_s).sum()
        # d(-A * log p_S(y)) / dz = A * (p_S - onehot(y))
        grad = ps.mul_(advantage.unsqueeze(1))
        grad.scatter_add_(1, index, -advantage.unsqueeze(1))
    elif vocab_clip is not None:
        per_row, grad = _vocab_clipped_chunk(
            ls, lt, ps, pt, scratch, loss=loss, beta=beta, vocab_clip=vocab_clip, stats=stats
        )
    else:
        if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
            # KL(p_T || p_S); gradient p_S - p_T.
            divergence = lt.sub_(ls).mul_(pt).sum(dim=-1)
            grad = ps.sub_(pt)
        elif loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
            # KL(p_S || p_T); gradient p_S * (log p_S - log p_T - KL).
            terms = torch.mul(ls.sub_(lt), ps, out=scratch)
            divergence = terms.sum(dim=-1)
            grad = terms.addcmul_(ps, divergence.unsqueeze(1), value=-1.0)
        else:
            # JSD_beta; m = beta p_T + (1 - beta) p_S, log m from probabilities: where m
            # underflows both p_T and p_S are below the smallest normal float, so their terms
            # (and gradients) are zero to working precision either way.
            log_m = torch.mul(pt, beta, out=scratch).add_(ps, alpha=1.0 - beta)
            log_m.clamp_min_(torch.finfo(log_m.dtype).tiny).log_()
            kl_teacher = lt.sub_(log_m).mul_(pt).sum(dim=-1)
            terms = ls.sub_(log_m).mul_(ps)
            kl_student = terms.sum(dim=-1)
            divergence = beta * kl_teacher + (1.0 - beta) * kl_student
            # d JSD / dz = (1 - beta) p_S * (log p_S - log m - KL(p_S || m))
            grad = terms.addcmul_(ps, kl_student.unsqueeze(1), value=-1.0).mul_(1.0 - beta)
        stats.divergence += divergence.sum()
        per_row = divergence
    if loss != "sampled_token":
        if clip is None:
            stats.loss += per_row.sum()
        else:
            clipped = per_row > clip
            stats.clipped += clipped.sum()
            stats.loss += torch.where(clipped, clip, per_row).sum()
            keep = (~clipped).to(grad.dtype)

    scale = 1.0 / temperature
    if keep is not None:
        grad.mul_((keep * scale).unsqueeze(1))
    elif scale != 1.0:
        grad.mul_(scale)
    return grad


def _vocab_clipped_chunk(
    ls: Tensor,
    lt: Tensor,
    ps: Tensor,
    pt: Tensor,
    scratch: Tensor,
    *,
    loss: str,
    beta: float,
    vocab_clip: float,
    stats: _ChunkStats,
) -> tuple[Tensor, Tensor]:
    """Per-row loss ``sum_v min(t_v, vocab_clip)`` ``[n]`` and its student-logit gradient.

    ``ls``/``lt`` are log-probabilities and ``ps``/``pt`` probabilities (``[n, V]``, from
    :func:`_log_softmax_`); every buffer may be overwritten. Adds the unclipped divergence and the
    clip counts to ``stats``. See :func:`_chunk_loss` for the gradient's form.
    """
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        terms = lt.sub_(ls).mul_(pt)  # p_T (log p_T - log p_S)
        clipped = terms > vocab_clip
        g = torch.neg(pt, out=scratch).masked_fill_(clipped, 0.0)  # g_v u_v = -p_T,v u_v
    elif loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        terms = torch.mul(ls.sub_(lt), ps, out=scratch)  # p_S (log p_S - log p_T)
        clipped = terms > vocab_clip
        g = ls.add_(1.0).mul_(ps).masked_fill_(clipped, 0.0)  # p_S (log p_S - log p_T + 1) u
    else:
        log_m = torch.mul(pt, beta, out=scratch).add_(ps, alpha=1.0 - beta)
        log_m.clamp_min_(torch.finfo(log_m.dtype).tiny).log_()
        teacher_terms = lt.sub_(log_m).mul_(pt)  # p_T (log p_T - log m)
        student_terms = ls.sub_(log_m).mul_(ps)  # p_S (log p_S - log m)
        terms = torch.mul(teacher_terms, beta, out=scratch).add_(student_terms, alpha=1.0 - beta)
        clipped = terms > vocab_clip
        g = student_terms.masked_fill_(clipped, 0.0).mul_(1.0 - beta)
    stats.divergence += terms.sum()
    stats.vocab_clipped_entries += torch.count_nonzero(clipped)  # no int64 copy of the mask
    stats.vocab_clipped_tokens += clipped.any(dim=-1).sum()
    per_row = terms.clamp_(max=vocab_clip).sum(dim=-1)
    grad = g.addcmul_(ps, g.sum(dim=-1, keepdim=True), value=-1.0)
    return per_row, grad


class _ChunkedRolloutLoss(torch.autograd.Function):
    """Sum of per-token losses over ``N`` valid positions, gradient to the student hidden only.

    Inputs: ``student_hidden [..., H]``, ``teacher_hidden [..., H]`` (detached), ``positions
    [N, ndim - 1]`` (coordinates of the valid positions), ``weight [V, H]`` and ``bias [V] | None``
    (detached),
    ``sampled_ids [N]`` (of the valid positions). Outputs, all 0-d: the loss sum (the only
    differentiable output), divergence sum, student and teacher entropy sums, clipped count.
    Valid rows are gathered one chunk at a time (no ``[N, H]`` copies); the hidden-state gradient
    is computed during the forward pass, chunk by chunk, and scattered back in ``backward``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        positions: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        sampled_ids: Tensor,
        loss: str,
        beta: float,
        temperature: float,
        clip: float | None,
        chunk_size: int,
        vocab_clip: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        dtype = compute_dtype(student_hidden, teacher_hidden, weight)
        device = student_hidden.device
        n_valid = positions.shape[0]
        vocab = weight.shape[0]
        want_grad = bool(ctx.needs_input_grad[0])  # type: ignore[attr-defined]
        rows = min(chunk_size, n_valid)
        # Student rows then teacher rows of a chunk share one buffer, so that both are projected
        # by a single matmul: one pass over the weight instead of two.
        pair_logits = torch.empty((2 * rows, vocab), device=device, dtype=dtype)
        ps, pt, scratch = (torch.empty((rows, vocab), device=device, dtype=dtype) for _ in range(3))
        matmul_dtype = weight.dtype if _fast_low_precision(weight, dtype) else dtype
        grad_hidden = (
            torch.empty((n_valid, student_hidden.shape[-1]), device=device, dtype=dtype)
            if want_grad
            else None
        )
        stats = _ChunkStats(device, dtype)
        # Autocast would round the projections to bf16; the loss math must stay in float32.
        no_autocast = (
            torch.autocast(device.type, enabled=False)
            if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            for start in range(0, n_valid, chunk_size):
                end = min(start + chunk_size, n_valid)
                n = end - start
                pair = pair_logits[: 2 * n]
                where = tuple(positions[start:end].unbind(1))
                hidden_pair = torch.cat(
                    (student_hidden[where].to(matmul_dtype), teacher_hidden[where].to(matmul_dtype))
                )
                _project(hidden_pair, weight, bias, pair)
                if temperature != 1.0:
                    pair.div_(temperature)
                grad_logits = _chunk_loss(
                    pair[:n],
                    pair[n:],
                    ps[:n],
                    pt[:n],
                    scratch[:n],
                    sampled_ids[start:end],
                    loss=loss,
                    beta=beta,
                    temperature=temperature,
                    clip=clip,
                    stats=stats,
                    vocab_clip=vocab_clip,
                )
                if grad_hidden is not None:
                    _back_project(grad_logits, weight, grad_hidden[start:end])
        ctx.save_for_backward(grad_hidden, positions)
        ctx.hidden_shape = student_hidden.shape  # type: ignore[attr-defined]
        ctx.hidden_dtype = student_hidden.dtype  # type: ignore[attr-defined]
        outputs = (
            stats.loss,
            stats.divergence,
            stats.student_entropy,
            stats.teacher_entropy,
            stats.clipped,
            stats.vocab_clipped_entries,
            stats.vocab_clipped_tokens,
        )
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_loss: Tensor, *_unused: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, positions = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = None
        if grad_hidden is not None:
            rows = (grad_hidden * grad_loss.to(grad_hidden.dtype)).to(ctx.hidden_dtype)  # type: ignore[attr-defined]
            grad = rows.new_zeros(ctx.hidden_shape)  # type: ignore[attr-defined]
            grad.index_put_(tuple(positions.unbind(1)), rows)
        return grad, None, None, None, None, None, None, None, None, None, None, None


def rollout_loss_from_hidden(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    output_weight: Tensor,
    output_bias: Tensor | None,
    sampled_ids: Tensor,
    mask: Tensor,
    *,
    loss: LossKind = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    vocab_clip: float | None = None,
    normalizer: float | Tensor,
    chunk_size: int | None = None,
) -> RolloutLoss:
    """Masked OPSD loss of one micro-batch from final hidden states, without ``[T, V]`` logits.

    Same semantics and result as :func:`opsd_engine.losses.rollout_loss_from_logits` applied to
    ``student_hidden @ output_weight.T + output_bias`` and the teacher's equivalent (see there
    for ``loss``, ``beta``, ``temperature``, ``clip``, ``vocab_clip`` (the authors' per-vocabulary
    clip; the clipped loss can be negative) and the step-level ``normalizer``: the
    number of valid tokens in the whole optimizer step, across gradient-accumulation
    micro-batches and data-parallel ranks, never a per-micro-batch count).

    Args:
        student_hidden: ``[B, T, H]`` student final hidden states (after the final norm); position
            ``t`` is the state whose projection predicted ``sampled_ids[:, t]``. Gets the gradient.
        teacher_hidden: ``[B, T, H]`` teacher final hidden states aligned the same way, typically
            computed once per step under ``no_grad`` and kept in the model's dtype (detached
            here).
        output_weight: ``[V, H]`` output projection (``lm_head.weight``), frozen: it is detached,
            so it gets no gradient from this loss even if it is tied to the input embeddings and
            has ``requires_grad=True``.
        output_bias: ``[V]`` or ``None`` (also frozen).
        sampled_ids: ``[B, T]`` sampled token ids (used by ``sampled_token``).
        mask: ``[B, T]`` bool, true at valid rollout positions. Only those positions are gathered
            and computed, so whatever masked-out hidden states hold (even NaN) is ignored.
        loss, beta, temperature, clip, vocab_clip, normalizer: as in
            ``rollout_loss_from_logits``.
        chunk_size: positions per chunk; default :func:`auto_chunk_size` for this device.

    Returns:
        A :class:`~opsd_engine.losses.RolloutLoss`; only ``loss`` carries a gradient (to
        ``student_hidden``, in its dtype).
    """
    validate_loss_args(loss, beta, temperature, clip, normalizer, vocab_clip)
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student/teacher hidden shapes differ: {tuple(student_hidden.shape)} vs "
            f"{tuple(teacher_hidden.shape)}"
        )
    hidden_size = student_hidden.shape[-1]
    if output_weight.dim() != 2 or output_weight.shape[1] != hidden_size:
        raise ValueError(
            f"output_weight must be [V, {hidden_size}], got {tuple(output_weight.shape)}"
        )
    vocab = output_weight.shape[0]
    if output_bias is not None and output_bias.shape != (vocab,):
        raise ValueError(f"output_bias must be [{vocab}], got {tuple(output_bias.shape)}")
    if mask.shape != student_hidden.shape[:-1] or sampled_ids.shape != mask.shape:
        raise ValueError(
            f"mask {tuple(mask.shape)} and sampled_ids {tuple(sampled_ids.shape)} must both be "
            f"the hidden states' leading shape {tuple(student_hidden.shape[:-1])}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    dtype = compute_dtype(student_hidden, teacher_hidden, output_weight)
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab, hidden_size, student_hidden.device, dtype=dtype)

    valid = mask.bool()
    positions = valid.nonzero()  # [N, ndim - 1]: the valid positions, in row-major order
    ids = sampled_ids[valid].long()
    bias = output_bias.detach() if output_bias is not None else None

    (
        loss_sum,
        divergence_sum,
        student_entropy,
        teacher_entropy,
        clipped,
        vocab_entries,
        vocab_tokens,
    ) = _ChunkedRolloutLoss.apply(
        student_hidden,
        teacher_hidden.detach(),
        positions,
        output_weight.detach(),
        bias,
        ids,
        loss,
        beta,
        temperature,
        clip,
        chunk_size,
        vocab_clip,
    )
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.detach().to(device=loss_sum.device, dtype=loss_sum.dtype)
    return RolloutLoss(
        loss=loss_sum / normalizer,
        divergence_sum=divergence_sum,
        student_entropy_sum=student_entropy,
        teacher_entropy_sum=teacher_entropy,
        clipped_tokens=clipped,
        valid_tokens=valid.sum(),
        vocab_clipped_entries=vocab_entries,
        vocab_clipped_tokens=vocab_tokens,
    )
