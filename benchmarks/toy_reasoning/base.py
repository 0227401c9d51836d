"""The toy base model: a small Qwen3-architecture LM pretrained here, on the CPU, and cached.

The paper starts from a "sufficiently capable" instruct model: one that can use a reference
solution in its context (the teacher role) but is weaker without it (the student role). This
module makes such a base in a few minutes. The pretraining mix, a batch of one kind at a time:

* ``drill``: rows of single equations (``17+8=25. 9-4=5. ...``), the arithmetic facts that
  solution steps use;
* ``teacher``: the engine's teacher prompt (problem + reference solution + the paper's transition
  instruction) followed by the same worked solution, so the model learns to use a reference;
* ``student``: the engine's student prompt (problem only) followed by the worked solution, or, for
  a ``direct_fraction`` of them, by the bare answer ``\\boxed{N}`` (no work shown). Answering
  directly means doing the whole chain at once, which a model this small mostly gets wrong.

The resulting base works step by step and copies well with the reference in context, but without
it often jumps to a guessed answer and makes arithmetic slips: weak without the reference,
strong with it. `direct_fraction` and `steps` are the calibration knobs.

Prompts are built by the engine's own code (`opsd_engine.prompts`) with the toy's prompt config,
so the pretraining sequences are token-for-token what the trainers and the evaluation use. The
tokenizer is the offline tiny Qwen3 tokenizer (`opsd_engine.tiny`; one token per digit).
Deterministic for a seed whatever the caller's thread count and the machine's load: pretraining
always runs on one torch thread (a float32 reduction's order, and so its rounding, depends on how
many threads split it), and the model is cached by a hash of its configuration.

``family`` picks the task family (``task.FAMILIES``). For ``carries`` the student-format
sequences are all worked (``direct_fraction`` 0: the base always works the steps, and gets some
wrong), and a ``foreign_reference_share`` of the teacher-format sequences show the reference in
the foreign style (``Problem.foreign_solution``) and still continue in the base's own style, so
the base can read another model's traces but never writes them. ``cosine=False`` keeps the
learning rate constant after warmup, so a run of ``steps`` steps is the first ``steps`` steps of
any longer run (what the calibration of ``steps`` relies on).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from benchmarks.toy_reasoning.task import FAMILIES, Problem, drill_row, pretraining_problems
from opsd_engine.config import PromptConfig
from opsd_engine.prompts import build_prompt_pair
from opsd_engine.tiny import ENDOFTEXT, IM_END, build_tiny_tokenizer

__all__ = [
    "CAPACITY_BASE",
    "FAMILY_BASES",
    "TOY_PROMPTS",
    "BaseConfig",
    "build_base",
    "cache_key",
    "pretrain",
    "save_base",
]

#: The prompt config of every toy run: the paper's templates, no chat template (a base model).
TOY_PROMPTS = PromptConfig(chat_template="off")
TASK_VERSION = 4  # bump when the task or the pretraining recipe changes: invalidates caches


@dataclass(frozen=True)
class BaseConfig:
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    head_dim: int = 32
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    drill_share: float = 0.1
    teacher_share: float = 0.6  # the rest of the batches are student-format
    direct_fraction: float = 0.6  # of student-format sequences: bare answer, no work
    n_problems: int = 20_000  # pretraining problems (a pool disjoint from every task split)
    family: str = "chains"
    foreign_reference_share: float = 0.0  # of teacher-format sequences: reference in foreign style
    cosine: bool = True  # False: constant learning rate after warmup
    init_from: BaseConfig | None = None  # continue pretraining this (cached) base instead


#: Fields added after the first family's base was cached: left out of the key at these values,
#: so that base keeps its key.
_KEY_DEFAULTS = {
    "family": "chains",
    "foreign_reference_share": 0.0,
    "cosine": True,
    "init_from": None,
}


def cache_key(config: BaseConfig) -> str:
    fields = {k: v for k, v in asdict(config).items() if _KEY_DEFAULTS.get(k, object()) != v}
    payload = json.dumps({"task": TASK_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _model(config: BaseConfig, tokenizer: Any) -> Qwen3ForCausalLM:
    pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    heads = config.hidden_size // config.head_dim
    model_config = Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=config.hidden_size,
        intermediate_size=3 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Qwen3ForCausalLM(model_config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad
    )
    return model


class _Batches:
    """Deterministic pretraining batches, one kind per batch (little padding)."""

    def __init__(self, config: BaseConfig, problems: list[Problem], tokenizer: Any) -> None:
        self.config, self.problems, self.tokenizer = config, problems, tokenizer
        self.family = FAMILIES[config.family]
        self.rng = random.Random(config.seed)
        self.eos = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        self.position = 0

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sequence(self, kind: str) -> list[int]:
        if kind == "drill":
            return [*self._encode(drill_row(self.rng, family=self.family)), self.eos]
        problem = self.problems[self.position % len(self.problems)]
        self.position += 1
        foreign = (
            kind == "teacher"
            and self.config.foreign_reference_share > 0
            and self.rng.random() < self.config.foreign_reference_share
        )
        pair = build_prompt_pair(
            self.tokenizer,
            problem=problem.problem,
            solution=problem.foreign_solution if foreign else problem.solution,
            answer=problem.answer,
            prompts=TOY_PROMPTS,
        )
        if kind == "teacher":
            return [*pair.teacher_ids, *self._encode(problem.solution), self.eos]
        direct = self.config.direct_fraction > 0 and self.rng.random() < self.config.direct_fraction
        answer = problem.direct_solution if direct else problem.solution
        return [*pair.student_ids, *self._encode(answer), self.eos]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        draw = self.rng.random()
        config = self.config
        if draw < config.drill_share:
            kind = "drill"
        elif draw < config.drill_share + config.teacher_share:
            kind = "teacher"
        else:
            kind = "student"
        rows = [self._sequence(kind) for _ in range(config.batch_size)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask, ids.masked_fill(mask == 0, -100)


def pretrain(
    config: BaseConfig,
    *,
    progress: Callable[[str], None] = print,
    on_step: Callable[[int, Qwen3ForCausalLM], None] | None = None,
    init: Path | None = None,
) -> tuple[Qwen3ForCausalLM, Any]:
    """Pretrain the base from scratch on one torch thread; returns (model, tokenizer).

    The weights are bit-identical for a ``config`` whatever ``torch.get_num_threads()`` the
    caller set (it is restored afterwards) and however loaded the machine is. ``init``: the
    directory of the base ``config.init_from`` describes (see `build_base`), whose weights the
    pretraining starts from.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(config, progress, on_step, init)
    finally:
        torch.set_num_threads(threads)


def _pretrain(
    config: BaseConfig,
    progress: Callable[[str], None],
    on_step: Callable[[int, Qwen3ForCausalLM], None] | None = None,
    init: Path | None = None,
) -> tuple[Qwen3ForCausalLM, Any]:
    tokenizer = build_tiny_tokenizer()
    model = _model(config, tokenizer)
    if config.init_from is not None:
        if init is None:
            raise ValueError("config.init_from needs the directory of that base (init)")
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(
            load_file(str(init / "model.safetensors")), strict=False
        )
        if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
            raise ValueError(f"{init} does not match the config: {missing} {unexpected}")
        model.tie_weights()
    family = FAMILIES[config.family]
    problems = pretraining_problems(config.n_problems, seed=config.seed, family=family)
    batches = _Batches(config, problems, tokenizer)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=0.01
    )

    def schedule(step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup_steps)
        if not config.cosine:
            return warm
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start = time.perf_counter()
    window: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for step in range(1, config.steps + 1):
            ids, mask, labels = batches.next()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.item())
            if step % 100 == 0 or step == config.steps:
                progress(
                    f"  pretrain step {step}/{config.steps}  loss "
                    f"{sum(window) / len(window):.3f}  {time.perf_counter() - start:.0f}s"
                )
                window = []
            if on_step is not None:  # e.g. calibration: evaluate at some steps (model.eval()!)
                on_step(step, model)
                model.train()
    model.eval()
    return model, tokenizer


def build_base(
    cache_dir: Path, config: BaseConfig, *, progress: Callable[[str], None] = print
) -> tuple[Path, bool]:
    """The cached base model directory for ``config`` (pretrained now if missing).

    Returns ``(path, cached)``. The directory is written to a temporary sibling and renamed into
    place when complete, with ``pretrain.json`` (config and wall time) beside the weights.
    """
    final = cache_dir / f"base-{cache_key(config)}"
    if (final / "pretrain.json").is_file():
        return final, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    init = None
    if config.init_from is not None:
        init, _ = build_base(cache_dir, config.init_from, progress=progress)
    started = time.perf_counter()
    model, tokenizer = pretrain(config, progress=progress, init=init)
    return save_base(cache_dir, config, model, tokenizer, time.perf_counter() - started), False


def save_base(
    cache_dir: Path, config: BaseConfig, model: Qwen3ForCausalLM, tokenizer: Any, seconds: float
) -> Path:
    """Write ``model`` as the cached base of ``config`` (what `build_base` loads); returns its
    directory. `calibrate.py` uses it for the model at step ``s`` of a constant-rate run, which
    is bit for bit the model ``replace(config, steps=s)`` pretrains (tested)."""
    final = cache_dir / f"base-{cache_key(config)}"
    tmp = cache_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:6]}"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {"config": asdict(config), "task_version": TASK_VERSION, "pretrain_seconds": seconds}
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
    from opsd_engine.checkpoint import normalize_modes

    normalize_modes(tmp)  # safetensors leaves model.safetensors 0600
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


#: The base of each task family (the ``carries`` pretraining length calibrated with
#: ``calibrate.py`` so the base is in the issue's accuracy band; see results.md), and the
#: capacity-study base: the same mix, from scratch, in a one-layer model (a single layer cannot
#: form the two-layer circuits that copy from context, so its privileged gap is small).
FAMILY_BASES: dict[str, BaseConfig] = {
    "chains": BaseConfig(),
    "carries": BaseConfig(
        init_from=BaseConfig(),  # the chains base: it already reads a reference in context
        steps=900,  # calibrate.py: student 37%, teacher 81% (foreign refs) on validation
        drill_share=0.1,
        teacher_share=0.7,
        direct_fraction=0.0,
        family="carries",
        foreign_reference_share=0.6,
        cosine=False,
    ),
}
CAPACITY_BASE = replace(
    FAMILY_BASES["carries"], init_from=None, num_layers=1, hidden_size=64, head_dim=32, steps=1000
)
