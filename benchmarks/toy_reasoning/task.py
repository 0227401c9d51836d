"""The synthetic reasoning tasks: multi-step integer arithmetic with worked reference solutions.

Two task families (``FAMILIES``):

* ``chains`` (the first family): digits added to / subtracted from a running total in 0..29.
  Every step is a fact the base knows; its weakness is behavioural (it often answers without
  working, ``base.py``), which any method fixes in a few steps.
* ``carries``: operands 1..19, running total in 0..99, so many steps carry or borrow. A base
  this small works every problem step by step but gets steps wrong (the tens digit is written
  before the units' carry is known): its errors are inside the steps. Its reference solutions are
  written in a *foreign* style (``Problem.foreign_solution``: results first, the operands of an
  addition swapped, ``;`` separators), as traces written by a different model would be; the
  control run uses the base's own style.

The description below is of the ``chains`` family; ``carries`` differs only in its numbers.

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
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FAMILIES",
    "Family",
    "Problem",
    "classify",
    "drill_row",
    "in_pretraining_pool",
    "make_problem",
    "make_splits",
    "pretraining_problems",
    "uses_foreign_style",
    "write_jsonl",
]

MIN_STEPS, MAX_STEPS = 2, 4


@dataclass(frozen=True)
class Family:
    """The numbers of one task family: start value, operands and running total ranges."""

    name: str
    min_steps: int
    max_steps: int
    start: tuple[int, int]  # first value, inclusive
    operand: tuple[int, int]  # each added/subtracted number, inclusive
    max_total: int  # every intermediate result is in 0..max_total


FAMILIES: dict[str, Family] = {
    "chains": Family("chains", MIN_STEPS, MAX_STEPS, (1, 19), (1, 9), 29),
    "carries": Family("carries", 2, 4, (10, 89), (1, 19), 99),
}


@dataclass(frozen=True)
class Problem:
    problem: str
    solution: str  # worked, one equation per operation, ending in \boxed{answer}
    answer: str

    @property
    def direct_solution(self) -> str:
        """The no-work style of the pretraining mix: only the final answer."""
        return f"\\boxed{{{self.answer}}}"

    @property
    def foreign_solution(self) -> str:
        """The same steps in a style the base never writes (another model's traces): each result
        first, the operands of an addition swapped, ``;`` separators, e.g.
        ``85 = 38 + 47; 71 = 85 - 14; so \\boxed{71}`` for ``47+38=85. 85-14=71. \\boxed{71}``."""
        steps = []
        for equation in self.solution.split(" \\boxed")[0].split(" "):
            left, result = equation.rstrip(".").split("=")
            op = "+" if "+" in left else "-"
            a, b = left.split(op)
            a, b = (b, a) if op == "+" else (a, b)
            steps.append(f"{result} = {a} {op} {b}")
        return "; ".join(steps) + f"; so \\boxed{{{self.answer}}}"

    def row(self, style: str = "worked") -> dict[str, str]:
        """The dataset row; ``style`` ``foreign`` puts `foreign_solution` in the solution field."""
        solution = self.foreign_solution if style == "foreign" else self.solution
        return {"problem": self.problem, "solution": solution, "answer": self.answer}


def make_problem(rng: random.Random, family: Family = FAMILIES["chains"]) -> Problem:
    """One random chain of the family's additions/subtractions (``chains``: 2-4 digits, every
    result in 0..29)."""
    total = rng.randint(*family.start)
    terms = [str(total)]
    equations = []
    for _ in range(rng.randint(family.min_steps, family.max_steps)):
        k = rng.randint(*family.operand)
        if total - k >= 0 and (total + k > family.max_total or rng.random() < 0.5):
            new, op = total - k, "-"
        else:
            new, op = total + k, "+"
        equations.append(f"{total}{op}{k}={new}.")
        terms.append(f"{op}{k}")
        total = new
    solution = " ".join(equations) + f" \\boxed{{{total}}}"
    return Problem(problem="".join(terms), solution=solution, answer=str(total))


def drill_row(rng: random.Random, n: int = 10, family: Family = FAMILIES["chains"]) -> str:
    """``n`` random single equations of the kind a solution step uses, e.g. ``17+8=25.``."""
    facts = []
    for _ in range(n):
        total, k = rng.randint(0, family.max_total), rng.randint(*family.operand)
        if total - k >= 0 and (total + k > family.max_total or rng.random() < 0.5):
            facts.append(f"{total}-{k}={total - k}.")
        else:
            facts.append(f"{total}+{k}={total + k}.")
    return " ".join(facts)


def in_pretraining_pool(problem: str) -> bool:
    """Problems are split once and for all by a hash of their text: 4/5 may be used to pretrain
    the base, 1/5 for training, validation and held-out evaluation, so the base never sees a
    problem the methods are trained or evaluated on, whatever the split sizes."""
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 5 != 0


def _distinct(
    rng: random.Random, count: int, *, pretraining: bool, family: Family
) -> list[Problem]:
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < count:
        problem = make_problem(rng, family)
        if problem.problem in seen or in_pretraining_pool(problem.problem) != pretraining:
            continue
        seen.add(problem.problem)
        out.append(problem)
    return out


def make_splits(
    *,
    seed: int,
    n_train: int,
    n_validation: int,
    n_heldout: int,
    family: Family = FAMILIES["chains"],
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Disjoint (train, validation, held-out) lists from the task pool, deterministic for
    ``seed``. Learning rates are tuned on validation; results are reported on held-out."""
    problems = _distinct(
        random.Random(seed),
        n_train + n_validation + n_heldout,
        pretraining=False,
        family=family,
    )
    return (
        problems[:n_train],
        problems[n_train : n_train + n_validation],
        problems[n_train + n_validation :],
    )


def pretraining_problems(
    count: int, *, seed: int, family: Family = FAMILIES["chains"]
) -> list[Problem]:
    """``count`` distinct problems from the pretraining pool (never in any task split)."""
    return _distinct(random.Random(seed), count, pretraining=True, family=family)


def write_jsonl(problems: list[Problem], path: Path, style: str = "worked") -> Path:
    """The problems as a dataset file, reference solutions in ``style`` (``worked``/``foreign``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row(style)) + "\n" for p in problems))
    return path


_WORKED = re.compile(r"^\s*((?:\d+[+-]\d+=\d+\.\s*)+)\\boxed\{(\d+)\}\s*$")
_EQUATION = re.compile(r"(\d+)([+-])(\d+)=(\d+)\.")

#: What `classify` returns, in the order results.md lists them.
KINDS = ("correct", "arithmetic_error", "misapplied_step", "copy_error", "not_worked")


def classify(problem: str, completion: str) -> str:
    """What kind of answer ``completion`` is to ``problem`` (one of `KINDS`).

    ``correct``: the boxed answer is right. Otherwise, for a completion in the worked style
    (equations ``a+b=c.`` then ``\\boxed{N}``, nothing else): ``arithmetic_error`` if some
    equation's result is wrong (a wrong intermediate result), ``misapplied_step`` if every
    equation is right but they do not follow the problem (a skipped, repeated or misread
    operation, a step not starting from the previous result), ``copy_error`` if the steps are right
    and the boxed answer is not their last result. ``not_worked``: any other form (a bare answer,
    another notation, a truncated solution).
    """
    match = _WORKED.match(completion)
    terms = re.findall(r"[+-]?\d+", problem)
    answer = str(sum(int(t) for t in terms))
    if match is None:
        boxed = re.search(r"\\boxed\{(\d+)\}", completion)
        return "correct" if boxed and boxed.group(1) == answer else "not_worked"
    if match.group(2) == answer:
        return "correct"
    equations = _EQUATION.findall(match.group(1))
    if any(
        (int(a) + int(b) if op == "+" else int(a) - int(b)) != int(c) for a, op, b, c in equations
    ):
        return "arithmetic_error"
    expected = [int(terms[0])] + [int(t) for t in terms[1:]]
    total, follows = expected[0], len(equations) == len(expected) - 1
    for (a, op, b, c), k in zip(equations, expected[1:], strict=False):
        follows = follows and int(a) == total and int(f"{op}{b}") == k
        total = int(c)
    return "copy_error" if follows else "misapplied_step"


_FOREIGN = re.compile(r"\d+ = \d+ [+-] \d+;")


def uses_foreign_style(completion: str) -> bool:
    """Whether ``completion`` writes a step in the foreign notation (``85 = 38 + 47;``)."""
    return _FOREIGN.search(completion) is not None
