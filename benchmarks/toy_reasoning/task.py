"""The synthetic reasoning task: multi-step integer arithmetic with worked reference solutions.

A problem is a chain such as ``13-1-9+5``: a start value of 1..19, then 2-4 additions or
subtractions of a digit, every intermediate result in 0..29. Its reference solution works it one
operation at a time, ``13-1=12. 12-9=3. 3+5=8. \\boxed{8}``, and its answer is ``8``. Each step
is a small fact (carries and borrows included) that a small transformer learns well, and a chain
of them is right only if every step is.

The base model's pretraining data (see ``base.py``) also uses a *direct* solution style,
``\\boxed{8}`` with no work shown: a model that answers that way must do the whole chain at once
and is mostly wrong. Problems, splits and styles are deterministic for a
seed; pretraining, train, validation and held-out problems never overlap.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Problem",
    "drill_row",
    "in_pretraining_pool",
    "make_problem",
    "make_splits",
    "pretraining_problems",
    "write_jsonl",
]

MIN_STEPS, MAX_STEPS = 2, 4


@dataclass(frozen=True)
class Problem:
    problem: str
    solution: str  # worked, one equation per operation, ending in \boxed{answer}
    answer: str

    @property
    def direct_solution(self) -> str:
        """The no-work style of the pretraining mix: only the final answer."""
        return f"\\boxed{{{self.answer}}}"

    def row(self) -> dict[str, str]:
        return {"problem": self.problem, "solution": self.solution, "answer": self.answer}


def make_problem(rng: random.Random) -> Problem:
    """One random chain of 2-4 additions/subtractions of a digit, every result in 0..29."""
    total = rng.randint(1, 19)
    terms = [str(total)]
    equations = []
    for _ in range(rng.randint(MIN_STEPS, MAX_STEPS)):
        k = rng.randint(1, 9)
        if total - k >= 0 and (total + k > 29 or rng.random() < 0.5):
            new, op = total - k, "-"
        else:
            new, op = total + k, "+"
        equations.append(f"{total}{op}{k}={new}.")
        terms.append(f"{op}{k}")
        total = new
    solution = " ".join(equations) + f" \\boxed{{{total}}}"
    return Problem(problem="".join(terms), solution=solution, answer=str(total))


def drill_row(rng: random.Random, n: int = 10) -> str:
    """``n`` random single equations of the kind a solution step uses, e.g. ``17+8=25.``."""
    facts = []
    for _ in range(n):
        total, k = rng.randint(0, 29), rng.randint(1, 9)
        if total - k >= 0 and (total + k > 29 or rng.random() < 0.5):
            facts.append(f"{total}-{k}={total - k}.")
        else:
            facts.append(f"{total}+{k}={total + k}.")
    return " ".join(facts)


def in_pretraining_pool(problem: str) -> bool:
    """Problems are split once and for all by a hash of their text: 4/5 may be used to pretrain
    the base, 1/5 for training, validation and held-out evaluation, so the base never sees a
    problem the methods are trained or evaluated on, whatever the split sizes."""
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 5 != 0


def _distinct(rng: random.Random, count: int, *, pretraining: bool) -> list[Problem]:
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < count:
        problem = make_problem(rng)
        if problem.problem in seen or in_pretraining_pool(problem.problem) != pretraining:
            continue
        seen.add(problem.problem)
        out.append(problem)
    return out


def make_splits(
    *, seed: int, n_train: int, n_validation: int, n_heldout: int
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Disjoint (train, validation, held-out) lists from the task pool, deterministic for
    ``seed``. Learning rates are tuned on validation; results are reported on held-out."""
    problems = _distinct(random.Random(seed), n_train + n_validation + n_heldout, pretraining=False)
    return (
        problems[:n_train],
        problems[n_train : n_train + n_validation],
        problems[n_train + n_validation :],
    )


def pretraining_problems(count: int, *, seed: int) -> list[Problem]:
    """``count`` distinct problems from the pretraining pool (never in any task split)."""
    return _distinct(random.Random(seed), count, pretraining=True)


def write_jsonl(problems: list[Problem], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row()) + "\n" for p in problems))
    return path
