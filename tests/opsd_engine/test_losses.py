"""Tests for opsd_engine.losses: the full-logits reference path of the OPSD loss.

Hand-computed cases, float64 brute-force references (explicit sums of p * log(p / q) in Python
floats), gradient routing (student only), masking, step-level normalization, clipping and the
sampled-token objective.
"""

from __future__ import annotations

import math

import pytest
import torch

from opsd_engine.losses import (
    masked_mean,
    rollout_loss_from_logits,
    sampled_token_advantage_loss,
    token_divergence,
    token_entropy,
)

DIVERGENCE_CASES = [
    ("jsd", 0.0),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 1.0),
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
]
LOSS_KINDS = ["jsd", "forward_kl", "reverse_kl", "sampled_token"]


# ---------------------------------------------------------------------------------------------
# Brute-force float64 references (plain Python floats, one position at a time)


def _softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def _log_softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_total = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_total for x in scaled]


def _kl(log_p: list[float], log_q: list[float]) -> float:
    """sum_v p_v log(p_v / q_v), written with log-probabilities so underflow cannot divide by 0."""
    return sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))


def _log_mix(log_p: list[float], log_q: list[float], beta: float) -> list[float]:
    """log(beta p + (1 - beta) q), elementwise, without underflow."""
    out = []
    for lp, lq in zip(log_p, log_q, strict=True):
        a, b = lp + math.log(beta), lq + math.log(1 - beta)
        top = max(a, b)
        out.append(top + math.log(math.exp(a - top) + math.exp(b - top)))
    return out


def _brute_divergence(
    student: list[float], teacher: list[float], kind: str, beta: float, temperature: float
) -> float:
    log_s = _log_softmax(student, temperature)
    log_t = _log_softmax(teacher, temperature)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def _brute_entropy(row: list[float], temperature: float) -> float:
    return -sum(p * math.log(p) for p in _softmax(row, temperature) if p > 0)


def _random_logits(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 2.0).to(dtype)


# ---------------------------------------------------------------------------------------------
# token_divergence


def test_hand_computed_two_token_vocabulary() -> None:
    # p_S = (0.5, 0.5), p_T = (0.9, 0.1); values worked out by hand:
    # KL(T||S) = 0.9 ln 1.8 + 0.1 ln 0.2                       = 0.368064...
    # KL(S||T) = 0.5 ln(5/9) + 0.5 ln 5                        = 0.510826...
    # m = (0.7, 0.3): JSD_0.5 = 0.5 [0.9 ln(9/7) + 0.1 ln(1/3)] + 0.5 [0.5 ln(5/7) + 0.5 ln(5/3)]
    #                                                           = 0.101749...
    student = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    teacher = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    expected = {"forward_kl": 0.3680642071684971, "reverse_kl": 0.5108256237659907}
    for kind, value in expected.items():
        got = token_divergence(student, teacher, divergence=kind)  # type: ignore[arg-type]
        assert got.shape == (1,)
        assert got.item() == pytest.approx(value, rel=1e-12)
    jsd = token_divergence(student, teacher, divergence="jsd", beta=0.5)
    assert jsd.item() == pytest.approx(0.10174922507919676, rel=1e-12)
    # beta = 0 and 1 are the normalized limits: forward and reverse KL.
    assert token_divergence(student, teacher, beta=0.0).item() == pytest.approx(
        0.368064207168, 1e-9
    )
    assert token_divergence(student, teacher, beta=1.0).item() == pytest.approx(
        0.510825623766, 1e-9
    )


def test_three_token_vocabulary_with_temperature_by_hand() -> None:
    # Logits (ln 1, ln 2, ln 3) at temperature 2 are probabilities proportional to sqrt(1, 2, 3).
    student = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    teacher = torch.log(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    # p_S = (1, sqrt 2, sqrt 3) / z and p_T its reverse, z = 1 + sqrt 2 + sqrt 3; the middle term
    # vanishes, so KL(p_T || p_S) = (sqrt 3 - 1) / z * ln(sqrt 3) = 0.0969836...
    # (not multiplied by temperature ** 2).
    z = 1 + math.sqrt(2.0) + math.sqrt(3.0)
    expected = (math.sqrt(3.0) - 1) / z * 0.5 * math.log(3.0)
    got = token_divergence(student, teacher, divergence="forward_kl", temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() == pytest.approx(0.0969836871660740, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize(("kind", "beta"), DIVERGENCE_CASES)
def test_token_divergence_matches_float64_brute_force(
    kind: str, beta: float, temperature: float
) -> None:
    student = _random_logits(2, 4, 6, seed=1)
    teacher = _random_logits(2, 4, 6, seed=2)
    got = token_divergence(
        student,
        teacher,
        divergence=kind,  # type: ignore[arg-type]
        beta=beta,
        temperature=temperature,
    )
    assert got.shape == (2, 4)
    assert got.dtype == torch.float64
    for b in range(2):
        for t in range(4):
            expected = _brute_divergence(
                student[b, t].tolist(), teacher[b, t].tolist(), kind, beta, temperature
            )
            assert got[b, t].item() == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_jsd_is_continuous_inside_and_normalized_at_the_ends() -> None:
    student = _random_logits(3, 7, seed=3)
    teacher = _random_logits(3, 7, seed=4)
    forward = token_divergence(student, teacher, divergence="forward_kl")
    reverse = token_divergence(student, teacher, divergence="reverse_kl")
    eps = 1e-6
    near_zero = token_divergence(student, teacher, beta=eps) / eps
    near_one = token_divergence(student, teacher, beta=1 - eps) / eps
    torch.testing.assert_close(near_zero, forward, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(near_one, reverse, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(token_divergence(student, teacher, beta=0.0), forward)
    torch.testing.assert_close(token_divergence(student, teacher, beta=1.0), reverse)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_of_disjoint_supports_is_the_bernoulli_entropy(beta: float) -> None:
    # Far-apart logits make p_T and p_S (numerically) disjoint: every probability off the
    # support underflows, yet nothing is NaN and JSD_beta = -beta ln beta - (1-beta) ln(1-beta).
    for dtype in (torch.float32, torch.bfloat16):
        student = torch.tensor([[0.0, -1000.0, -1000.0, -1000.0]], dtype=dtype)
        teacher = torch.tensor([[-1000.0, 0.0, 0.0, -1000.0]], dtype=dtype)
        got = token_divergence(student, teacher, beta=beta)
        expected = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCE_CASES)
def test_extreme_logits_give_finite_values_and_gradients(kind: str, beta: float) -> None:
    student = (
        torch.randn(3, 50, generator=torch.Generator().manual_seed(5)) * 300
    ).requires_grad_()
    teacher = torch.randn(3, 50, generator=torch.Generator().manual_seed(6)) * 300
    div = token_divergence(student, teacher, divergence=kind, beta=beta)  # type: ignore[arg-type]
    div.sum().backward()
    assert torch.isfinite(div).all()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    expected = [
        _brute_divergence(s.tolist(), t.tolist(), kind, beta, 1.0)
        for s, t in zip(student.detach().double(), teacher.double(), strict=True)
    ]
    torch.testing.assert_close(
        div.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCE_CASES)
def test_fp32_is_accurate_at_qwen_vocabulary_size(kind: str, beta: float) -> None:
    # At V = 151,936 a carelessly accumulated softmax normalizer (e.g. the CPU fp32
    # F.log_softmax kernel) shifts every log-probability by ~3e-5 and these by ~2e-5 relative.
    generator = torch.Generator().manual_seed(30)
    student = torch.randn(6, 151_936, generator=generator) * 4
    teacher = student + torch.randn(6, 151_936, generator=generator) * 1.5
    got = token_divergence(student, teacher, divergence=kind, beta=beta)  # type: ignore[arg-type]
    truth = token_divergence(student.double(), teacher.double(), divergence=kind, beta=beta)  # type: ignore[arg-type]
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCE_CASES)
def test_bf16_inputs_are_computed_in_fp32(kind: str, beta: float) -> None:
    student = _random_logits(2, 3, 11, seed=7, dtype=torch.bfloat16).requires_grad_()
    teacher = _random_logits(2, 3, 11, seed=8, dtype=torch.bfloat16)
    got = token_divergence(student, teacher, divergence=kind, beta=beta)  # type: ignore[arg-type]
    assert got.dtype == torch.float32
    reference = token_divergence(
        student.detach().double(),
        teacher.double(),
        divergence=kind,  # type: ignore[arg-type]
        beta=beta,
    )
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert student.grad is not None and student.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCE_CASES)
def test_gradient_flows_to_the_student_only(kind: str, beta: float) -> None:
    student = _random_logits(2, 3, 5, seed=9).requires_grad_()
    teacher = _random_logits(2, 3, 5, seed=10).requires_grad_()
    div = token_divergence(student, teacher, divergence=kind, beta=beta)  # type: ignore[arg-type]
    div.sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # The student gradient is the true derivative (finite differences, float64).
    assert torch.autograd.gradcheck(
        lambda s: token_divergence(s, teacher, divergence=kind, beta=beta),  # type: ignore[arg-type]
        (student.detach().clone().requires_grad_(),),
    )


def test_token_divergence_rejects_bad_arguments() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(logits, logits, beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(logits, logits, beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        token_divergence(logits, logits, divergence="tvd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes"):
        token_divergence(logits, torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------
# token_entropy, masked_mean


def test_token_entropy() -> None:
    uniform = torch.zeros(2, 3, 17, dtype=torch.bfloat16)
    entropy = token_entropy(uniform)
    assert entropy.dtype == torch.float32 and entropy.shape == (2, 3)
    torch.testing.assert_close(entropy, torch.full((2, 3), math.log(17)))
    logits = _random_logits(4, 6, seed=11)
    for temperature in (1.0, 0.7, 2.0):
        got = token_entropy(logits, temperature=temperature)
        expected = [_brute_entropy(row.tolist(), temperature) for row in logits]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_masked_mean_ignores_masked_garbage() -> None:
    values = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    mask = torch.tensor([True, True, False, True])
    assert masked_mean(values, mask).item() == pytest.approx(7.0 / 3.0)
    assert masked_mean(values, torch.zeros(4, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------------------------
# sampled-token objective


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_token_loss_matches_brute_force(temperature: float) -> None:
    student = _random_logits(2, 3, 6, seed=12)
    teacher = _random_logits(2, 3, 6, seed=13)
    ids = torch.tensor([[0, 5, 2], [3, 3, 1]])
    loss, advantage = sampled_token_advantage_loss(student, teacher, ids, temperature=temperature)
    for b in range(2):
        for t in range(3):
            y = int(ids[b, t])
            log_p_s = _log_softmax(student[b, t].tolist(), temperature)[y]
            log_p_t = _log_softmax(teacher[b, t].tolist(), temperature)[y]
            assert advantage[b, t].item() == pytest.approx(log_p_t - log_p_s, rel=1e-12)
            assert loss[b, t].item() == pytest.approx(-(log_p_t - log_p_s) * log_p_s, rel=1e-12)


def test_sampled_token_gradient_is_minus_advantage_times_grad_log_prob() -> None:
    student = _random_logits(2, 4, 7, seed=14).requires_grad_()
    teacher = _random_logits(2, 4, 7, seed=15).requires_grad_()
    ids = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(0))
    loss, advantage = sampled_token_advantage_loss(student, teacher, ids)
    assert not advantage.requires_grad
    loss.sum().backward()
    assert teacher.grad is None
    # Reference: -A_n * d log p_S(y_n) / d logits, with A_n a constant.
    probe = student.detach().clone().requires_grad_()
    log_p = torch.log_softmax(probe, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (-(advantage * log_p)).sum().backward()
    torch.testing.assert_close(student.grad, probe.grad)
    # It is not the gradient of -A * log p_S with A depending on the student.
    naive = student.detach().clone().requires_grad_()
    log_p_naive = torch.log_softmax(naive, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    log_p_teacher = (
        torch.log_softmax(teacher.detach(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    )
    (-((log_p_teacher - log_p_naive) * log_p_naive)).sum().backward()
    assert not torch.allclose(student.grad, naive.grad)


def test_sampled_token_clip_clamps_the_advantage() -> None:
    student = _random_logits(2, 5, 9, seed=16) * 3
    teacher = _random_logits(2, 5, 9, seed=17) * 3
    ids = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(1))
    _, raw = sampled_token_advantage_loss(student, teacher, ids)
    loss, clipped = sampled_token_advantage_loss(student, teacher, ids, clip=0.5)
    assert (raw.abs() > 0.5).any()
    torch.testing.assert_close(clipped, raw.clamp(-0.5, 0.5))
    log_p = torch.log_softmax(student, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(loss, -clipped * log_p)


# ---------------------------------------------------------------------------------------------
# rollout_loss_from_logits


def _rollout_inputs(seed: int, batch: int = 2, length: int = 6, vocab: int = 8) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 2
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.rand(batch, length, generator=generator) > 0.35
    mask[0, 0] = True
    return student, teacher, ids, mask


@pytest.mark.parametrize(("kind", "beta"), [*DIVERGENCE_CASES, ("sampled_token", 0.5)])
def test_rollout_loss_values_and_stats_match_brute_force(kind: str, beta: float) -> None:
    student, teacher, ids, mask = _rollout_inputs(seed=20)
    result = rollout_loss_from_logits(
        student,
        teacher,
        ids,
        mask,
        loss=kind,
        beta=beta,
        temperature=0.7,
        normalizer=13,  # type: ignore[arg-type]
    )
    loss_sum = div_sum = ent_s = ent_t = 0.0
    for b, t in mask.nonzero().tolist():
        s_row, t_row = student[b, t].tolist(), teacher[b, t].tolist()
        if kind == "sampled_token":
            y = int(ids[b, t])
            log_p_s = _log_softmax(s_row, 0.7)[y]
            log_p_t = _log_softmax(t_row, 0.7)[y]
            loss_sum += -(log_p_t - log_p_s) * log_p_s
            div_sum += log_p_s - log_p_t
        else:
            div = _brute_divergence(s_row, t_row, kind, beta, 0.7)
            loss_sum += div
            div_sum += div
        ent_s += _brute_entropy(s_row, 0.7)
        ent_t += _brute_entropy(t_row, 0.7)
    assert result.loss.item() == pytest.approx(loss_sum / 13, rel=1e-10)
    assert result.divergence_sum.item() == pytest.approx(div_sum, rel=1e-10)
    assert result.student_entropy_sum.item() == pytest.approx(ent_s, rel=1e-10)
    assert result.teacher_entropy_sum.item() == pytest.approx(ent_t, rel=1e-10)
    assert int(result.valid_tokens) == int(mask.sum())
    assert int(result.clipped_tokens) == 0
    for stat in (result.divergence_sum, result.student_entropy_sum, result.clipped_tokens):
        assert not stat.requires_grad


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_masked_positions_contribute_nothing(kind: str) -> None:
    student, teacher, ids, mask = _rollout_inputs(seed=21)
    student.requires_grad_()
    teacher.requires_grad_()
    result = rollout_loss_from_logits(student, teacher, ids, mask, loss=kind, normalizer=5)  # type: ignore[arg-type]
    result.loss.backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert (student.grad[~mask] == 0).all()
    assert (student.grad[mask].abs().sum(-1) > 0).all()
    # Finite garbage at masked positions changes nothing.
    garbage = torch.randn(
        student.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    student2 = torch.where(mask.unsqueeze(-1), student.detach(), garbage * 1e4).requires_grad_()
    teacher2 = torch.where(mask.unsqueeze(-1), teacher.detach(), -garbage * 1e4)
    other_ids = torch.where(mask, ids, (ids + 3) % student.shape[-1])
    result2 = rollout_loss_from_logits(student2, teacher2, other_ids, mask, loss=kind, normalizer=5)  # type: ignore[arg-type]
    result2.loss.backward()
    for field in ("loss", "divergence_sum", "student_entropy_sum", "teacher_entropy_sum"):
        torch.testing.assert_close(getattr(result2, field), getattr(result, field))
    torch.testing.assert_close(student2.grad, student.grad)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_step_normalizer_makes_micro_batches_add_up(kind: str) -> None:
    # Two micro-batches normalized by the step's total valid tokens give the same gradient as one
    # batch holding both (per-micro-batch means would not: the batches have different counts).
    student, teacher, ids, mask = _rollout_inputs(seed=22, batch=4)
    mask[2:, 3:] = False  # the second micro-batch has fewer valid tokens
    total = int(mask.sum())
    whole = student.clone().requires_grad_()
    rollout_loss_from_logits(whole, teacher, ids, mask, loss=kind, normalizer=total).loss.backward()  # type: ignore[arg-type]
    parts = student.clone().requires_grad_()
    losses = []
    for rows in (slice(0, 2), slice(2, 4)):
        result = rollout_loss_from_logits(
            parts[rows],
            teacher[rows],
            ids[rows],
            mask[rows],
            loss=kind,
            normalizer=torch.tensor(total),  # type: ignore[arg-type]
        )
        result.loss.backward()
        losses.append(result.loss.detach())
    torch.testing.assert_close(parts.grad, whole.grad)
    whole_loss = rollout_loss_from_logits(
        student, teacher, ids, mask, loss=kind, normalizer=total
    ).loss  # type: ignore[arg-type]
    torch.testing.assert_close(sum(losses), whole_loss)
    # The normalizer is a plain divisor.
    halved = rollout_loss_from_logits(student, teacher, ids, mask, loss=kind, normalizer=2 * total)  # type: ignore[arg-type]
    torch.testing.assert_close(halved.loss * 2, whole_loss)


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCE_CASES)
def test_divergence_clip_caps_each_token_and_stops_its_gradient(kind: str, beta: float) -> None:
    student, teacher, ids, mask = _rollout_inputs(seed=23)
    div = token_divergence(student, teacher, divergence=kind, beta=beta)  # type: ignore[arg-type]
    clip = float(div[mask].median())
    clipped = (div > clip) & mask
    assert clipped.any() and (mask & ~clipped).any()
    capped = student.clone().requires_grad_()
    result = rollout_loss_from_logits(
        capped,
        teacher,
        ids,
        mask,
        loss=kind,
        beta=beta,
        clip=clip,
        normalizer=10,  # type: ignore[arg-type]
    )
    result.loss.backward()
    expected = (
        torch.where(mask, torch.minimum(div, torch.tensor(clip, dtype=div.dtype)), 0).sum() / 10
    )
    torch.testing.assert_close(result.loss, expected)
    assert int(result.clipped_tokens) == int(clipped.sum())
    torch.testing.assert_close(result.divergence_sum, div[mask].sum())  # stats are unclipped
    assert (capped.grad[clipped] == 0).all()
    free = student.clone().requires_grad_()
    rollout_loss_from_logits(
        free, teacher, ids, mask, loss=kind, beta=beta, normalizer=10
    ).loss.backward()  # type: ignore[arg-type]
    kept = mask & ~clipped
    torch.testing.assert_close(capped.grad[kept], free.grad[kept])


def test_sampled_token_rollout_clip_counts_and_stats() -> None:
    student, teacher, ids, mask = _rollout_inputs(seed=24)
    _, raw = sampled_token_advantage_loss(student, teacher, ids)
    result = rollout_loss_from_logits(
        student, teacher, ids, mask, loss="sampled_token", clip=0.5, normalizer=7
    )
    per_token, _ = sampled_token_advantage_loss(student, teacher, ids, clip=0.5)
    assert int(result.clipped_tokens) == int(((raw.abs() > 0.5) & mask).sum()) > 0
    torch.testing.assert_close(result.loss, per_token[mask].sum() / 7)
    torch.testing.assert_close(result.divergence_sum, -raw[mask].sum())


def test_rollout_loss_bf16_inputs() -> None:
    student, teacher, ids, mask = _rollout_inputs(seed=25)
    bf_student = student.bfloat16().requires_grad_()
    result = rollout_loss_from_logits(bf_student, teacher.bfloat16(), ids, mask, normalizer=9)
    reference = rollout_loss_from_logits(
        bf_student.detach().double(), teacher.bfloat16().double(), ids, mask, normalizer=9
    )
    assert result.loss.dtype == torch.float32
    torch.testing.assert_close(result.loss.double(), reference.loss, rtol=1e-5, atol=1e-7)
    result.loss.backward()
    assert bf_student.grad is not None and bf_student.grad.dtype == torch.bfloat16


def test_rollout_loss_rejects_bad_arguments() -> None:
    student, teacher, ids, mask = _rollout_inputs(seed=26)
    with pytest.raises(ValueError, match="normalizer"):
        rollout_loss_from_logits(student, teacher, ids, mask, normalizer=0)
    with pytest.raises(ValueError, match="clip"):
        rollout_loss_from_logits(student, teacher, ids, mask, clip=-1.0, normalizer=1)
    with pytest.raises(ValueError, match="loss"):
        rollout_loss_from_logits(student, teacher, ids, mask, loss="mse", normalizer=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        rollout_loss_from_logits(student, teacher, ids, mask[:, :-1], normalizer=1)
