"""The toy replication's task families, deterministic base pretraining and claim statistics."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import pytest
import torch

from benchmarks.toy_reasoning.base import FAMILY_BASES, BaseConfig, cache_key, pretrain
from benchmarks.toy_reasoning.run import gap_threshold, paired_interval, verdict
from benchmarks.toy_reasoning.task import (
    FAMILIES,
    classify,
    in_pretraining_pool,
    make_problem,
    make_splits,
    uses_foreign_style,
)


def test_carries_problems_are_worked_and_foreign_styled_consistently() -> None:
    rng = random.Random(3)
    family = FAMILIES["carries"]
    for _ in range(200):
        problem = make_problem(rng, family)
        assert classify(problem.problem, problem.solution) == "correct"
        assert classify(problem.problem, problem.foreign_solution) == "correct"
        assert uses_foreign_style(problem.foreign_solution)
        assert not uses_foreign_style(problem.solution)
        values = [
            int(v)
            for v in problem.solution.replace("=", " ").replace(".", " ").split()[:-1]
            if v.lstrip("+-").isdigit()
        ]
        assert all(0 <= v <= family.max_total for v in values)
    first = make_problem(random.Random(0), family)
    assert first.foreign_solution.endswith(f"; so \\boxed{{{first.answer}}}")


def test_classify_tells_step_errors_from_format() -> None:
    problem = "47+38-14"  # 47+38=85. 85-14=71.
    assert classify(problem, "47+38=85. 85-14=72. \\boxed{72}") == "arithmetic_error"
    assert classify(problem, "47+38=85. 85-13=72. \\boxed{72}") == "misapplied_step"
    assert classify(problem, "47+38=85. \\boxed{85}") == "misapplied_step"  # a skipped step
    assert classify(problem, "47+38=85. 85-14=71. \\boxed{70}") == "copy_error"
    assert classify(problem, "\\boxed{70}") == "not_worked"
    assert classify(problem, "\\boxed{71}") == "correct"
    assert classify(problem, "85 = 38 + 47; 71 = 85 - 14; so \\boxed{71}") == "correct"


def test_family_splits_are_disjoint_and_outside_the_pretraining_pool() -> None:
    train, validation, heldout = make_splits(
        seed=0, n_train=64, n_validation=16, n_heldout=16, family=FAMILIES["carries"]
    )
    texts = [p.problem for p in (*train, *validation, *heldout)]
    assert len(set(texts)) == len(texts)
    assert not any(in_pretraining_pool(t) for t in texts)


def test_first_family_keeps_its_cache_key_and_the_second_differs() -> None:
    # the key of the first family's base does not include the fields added for the second
    assert cache_key(FAMILY_BASES["chains"]) == cache_key(BaseConfig())
    assert cache_key(FAMILY_BASES["carries"]) != cache_key(BaseConfig())


@pytest.mark.parametrize("family", ["chains", "carries"])
def test_pretraining_is_identical_whatever_the_thread_count(family: str) -> None:
    config = replace(
        FAMILY_BASES[family],
        init_from=None,
        steps=3,
        batch_size=4,
        n_problems=40,
        hidden_size=64,
        warmup_steps=2,
    )
    threads = torch.get_num_threads()
    weights = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model, _ = pretrain(config, progress=lambda _: None)
            weights.append({k: v.clone() for k, v in model.state_dict().items()})
            assert torch.get_num_threads() == n  # restored for the caller
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    other, _ = pretrain(replace(config, seed=1), progress=lambda _: None)
    assert any(not torch.equal(v, weights[0][k]) for k, v in other.state_dict().items())


def test_a_constant_rate_run_passes_through_every_shorter_run() -> None:
    """What calibrate.py relies on to cache the base at step s of a longer run."""
    config = replace(
        FAMILY_BASES["carries"],
        init_from=None,
        steps=4,
        batch_size=4,
        n_problems=40,
        hidden_size=64,
        warmup_steps=2,
    )
    assert config.cosine is False
    seen: dict[str, torch.Tensor] = {}

    def on_step(step: int, model: torch.nn.Module) -> None:
        if step == 2:
            seen.update({k: v.clone() for k, v in model.state_dict().items()})

    pretrain(config, progress=lambda _: None, on_step=on_step)
    short, _ = pretrain(replace(config, steps=2), progress=lambda _: None)
    for name, value in short.state_dict().items():
        assert torch.equal(value, seen[name]), name


def test_paired_interval_is_the_t_interval_and_verdicts_follow_it() -> None:
    differences = [1.0, 2.0, 3.0]
    mean, low, high = paired_interval(differences)
    half = 4.303 * statistics.stdev(differences) / 3**0.5
    assert mean == 2.0
    assert low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)
    assert verdict(0.5, 3.0, +1) == "supported"
    assert verdict(0.5, 3.0, -1) == "contradicted"
    assert verdict(-0.5, 3.0, +1) == "not resolved at this scale"
    with pytest.raises(ValueError):
        paired_interval([1.0])


def test_gap_threshold_lies_between_unhelped_and_helped_bases() -> None:
    def row(gap: float, helped: bool) -> dict[str, object]:
        return {"privileged_gap": gap, "opsd_helped": helped}

    value, how = gap_threshold([row(0.6, True), row(0.4, True), row(0.1, False)])
    assert value == pytest.approx(0.25) and "between 10 and 40" in how
    assert gap_threshold([row(0.6, True), row(0.1, True)])[0] is None
    assert gap_threshold([row(0.3, True), row(0.5, False)])[0] is None  # overlapping
