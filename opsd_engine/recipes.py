"""Recipe presets: named, sourced sets of job-spec defaults (`recipe:` in the spec).

This module owns the presets' values and sources, how a preset is laid under a spec document
(:func:`apply_recipe`: every field the document sets explicitly wins) and which of user, preset
or built-in default set each value (:func:`value_sources`, for `opsd spec show`). It is pure data
and plain dicts (no pydantic, no torch), imported by :mod:`opsd_engine.config`.

* ``paper-v1``: the paper's first version (Zhao et al. 2026, "Self-Distilled Reasoner: On-Policy
  Self-Distillation for Large Language Models", Sections 4.1 and 8.1, Tables 5-6): JSD with beta
  0.5, 2,048-token rollouts at temperature 1.2, AdamW lr 2e-5 with 10% warmup and cosine decay,
  LoRA r64/alpha128, teacher = initial policy. These are also the spec's built-in defaults; the
  preset pins them so that a job says which recipe it follows.
* ``official-2026-04``: the authors' repository's published recipe as of April 2026 (github.com/
  siyan-zhao/OPSD, the answer to its issue #17 and its run scripts: ``--beta 0
  --jsd_token_clip 0.05 --learning_rate 5e-6 --max_grad_norm 0.1 --max_completion_length 1024
  --temperature 1.1 --top_p 0.95 --top_k 20 --lora_r 64 --lora_alpha 128 --fixed_teacher``,
  student thinking off): forward KL (``jsd`` at beta 0, as their flag), the per-vocabulary clip
  at 0.05, lr 5e-6, gradient-norm clip 0.1, 1,024-token rollouts sampled at temperature 1.1 /
  top-p 0.95 / top-k 20, student (and so teacher) thinking off, LoRA r64/alpha128, teacher = the
  base model with the adapter disabled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["RECIPES", "Recipe", "RecipeName", "apply_recipe", "value_sources"]

RecipeName = Literal["paper-v1", "official-2026-04"]


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    values: dict[str, Any]
    """Nested like the spec: top-level fields and groups (`{"optim": {"learning_rate": ...}}`)."""


RECIPES: dict[str, Recipe] = {
    "paper-v1": Recipe(
        name="paper-v1",
        source="OPSD paper v1 (arXiv 2601.18734v1), Sections 4.1 and 8.1, Tables 5-6",
        values={
            "divergence": "jsd",
            "beta": 0.5,
            "max_new_tokens": 2048,
            "teacher": "initial",
            "generation": {"temperature": 1.2, "top_p": 1.0, "top_k": 0},
            "lora": {"r": 64, "alpha": 128.0},
            "optim": {
                "learning_rate": 2e-5,
                "warmup_ratio": 0.1,
                "lr_schedule": "cosine",
                "max_grad_norm": 1.0,
            },
        },
    ),
    "official-2026-04": Recipe(
        name="official-2026-04",
        source="github.com/siyan-zhao/OPSD, recipe published in the answer to issue #17 "
        "(April 2026) and its run scripts",
        values={
            "divergence": "jsd",
            "beta": 0.0,
            "max_new_tokens": 1024,
            "teacher": "initial",
            "generation": {"temperature": 1.1, "top_p": 0.95, "top_k": 20},
            "lora": {"r": 64, "alpha": 128.0},
            "optim": {"learning_rate": 5e-6, "max_grad_norm": 0.1},
            "loss": {"vocab_clip": 0.05},
            "prompts": {"student_thinking": False},
        },
    ),
}


def apply_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its recipe's values filled in wherever ``data`` does not set them.

    Returns ``data`` unchanged when it names no recipe or an unknown one (validation then names
    the ``recipe`` field). A group given as something other than a mapping is left as given, so
    that validation reports it. Never mutates ``data``.
    """
    recipe = RECIPES.get(data.get("recipe")) if isinstance(data.get("recipe"), str) else None
    if recipe is None:
        return data
    merged = dict(data)
    for key, value in recipe.values.items():
        if isinstance(value, dict):
            given = merged.get(key)
            if given is None:
                merged[key] = copy.deepcopy(value)
            elif isinstance(given, dict):
                merged[key] = {**value, **given}
        elif key not in merged:
            merged[key] = value
    return merged


def _leaves(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in document.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "metadata":
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def value_sources(raw: dict[str, Any], resolved: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Every leaf of ``resolved`` (the validated spec's dump) with who set it.

    ``raw`` is the document as the user wrote it. Sources: ``"user"`` (set in ``raw``),
    ``"recipe <name>"`` (filled from the preset) or ``"default"`` (the spec's built-in default,
    or derived from another field, e.g. ``prompts.teacher_thinking`` following the student's).
    Keys are dotted paths (``optim.learning_rate``), in the dump's order.
    """
    given = _leaves(raw)
    name = raw.get("recipe")
    recipe = RECIPES.get(name) if isinstance(name, str) else None
    preset = _leaves(recipe.values) if recipe is not None else {}
    sources: dict[str, tuple[Any, str]] = {}
    for path, value in _leaves(resolved).items():
        if path in given:
            source = "user"
        elif path in preset:
            source = f"recipe {name}"
        else:
            source = "default"
        sources[path] = (value, source)
    return sources
