"""The job spec: one validated document for the CLI (`opsd train SPEC`), the SDK and `POST /jobs`.

Top-level fields and groups mirror the HTTP body in DESIGN.md field for field. Defaults are the
paper's (Sections 4.1 and 8.1): JSD with beta 0.5, teacher = initial policy, 1 rollout per problem
at temperature 1.2 and up to 2048 new tokens, LoRA r=64/alpha=128 on all projections, AdamW at
2e-5 with 10% warmup and cosine decay. Bad values fail at load time with the field's dotted path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema

from opsd_engine.recipes import RecipeName, apply_recipe, value_sources

Method = Literal["opsd", "sft", "grpo"]
DivergenceName = Literal["jsd", "forward_kl", "reverse_kl", "sampled_token"]
TeacherMode = Literal["initial", "current"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
AVAILABLE_METHODS: tuple[str, ...] = ("opsd", "sft", "grpo")

# Bounds on what one request may ask for (every number and size has one).
MAX_NEW_TOKENS = 32768
MAX_STEPS = 1_000_000
MAX_ROWS = 10_000_000
MAX_TOP_K = 1_000_000
MAX_NAME = 256  # field and module names
MAX_URI = 2048
MAX_TEXT = 16384  # prompt templates
MAX_METADATA_KEYS = 64
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def _metadata_value(value: Any) -> Any:
    """A flat JSON scalar: a string of at most 512 characters, a 64-bit integer, a finite
    number, a boolean or null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("integers must fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > 512:
            raise ValueError("strings are at most 512 characters")
        return value
    raise ValueError("values are strings, numbers, booleans or null (no nesting)")


MetadataValue = Annotated[
    Any,
    AfterValidator(_metadata_value),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": 512},
                {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "null"},
            ]
        }
    ),
]

DEFAULT_STUDENT_TEMPLATE = "Problem: {problem}\nAnswer:"
DEFAULT_TEACHER_TEMPLATE = (
    "Problem: {problem}\n"
    "Here is a reference solution:\n{solution}\n"
    "After understanding the reference solution, please try to solve this problem using your "
    "own approach below:\nAnswer:"
)
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class _Group(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )


class DatasetFields(_Group):
    """Which fields of the dataset hold the problem, the reference solution and the answer.

    A name is a column or a dotted path into nested fields (``reward_model.ground_truth``). A
    problem or solution field may hold a list of chat messages: the problem is the last user
    message (a system message becomes the system prompt unless ``prompts.system_prompt`` is set),
    the solution the last assistant message. ``answer_field`` other than ``answer`` must be in
    every row; ``answer`` is used when present (else the solution's last ``\\boxed{}``).
    """

    problem_field: str = Field(
        "problem",
        min_length=1,
        max_length=MAX_NAME,
        description="Column or dotted path; text or chat messages.",
    )
    solution_field: str = Field(
        "solution",
        min_length=1,
        max_length=MAX_NAME,
        description="Column or dotted path; text or chat messages.",
    )
    answer_field: str | None = Field(
        "answer",
        min_length=1,
        max_length=MAX_NAME,
        description="Column or dotted path; null: the rows have none.",
    )
    limit: int | None = Field(None, ge=1, le=MAX_ROWS, description="Use only the first N rows.")

    @field_validator("problem_field", "solution_field", "answer_field")
    @classmethod
    def _dotted_path(cls, value: str | None) -> str | None:
        if value is not None and any(not part.strip() for part in value.split(".")):
            raise ValueError(f"{value!r} is not a field name or dotted path (empty part)")
        return value


class GenerationConfig(_Group):
    """Student sampling (the rollout). Independent of the loss temperature."""

    temperature: float = Field(1.2, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 disables top-k filtering.")
    num_generations: int = Field(1, ge=1, le=64)


class LoraConfig(_Group):
    r: int = Field(64, ge=1, le=1024)
    alpha: float = Field(128.0, gt=0.0, le=8192.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[Annotated[str, StringConstraints(max_length=MAX_NAME)]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES), max_length=64
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not m.strip() for m in value):
            raise ValueError("must be a non-empty list of module names")
        return value


class OptimConfig(_Group):
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    batch_size: int = Field(1, ge=1, le=1024, description="Problems per micro-batch per device.")
    grad_accum: int = Field(4, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    epochs: float | None = Field(
        None, gt=0.0, le=100.0, description="Default 1 epoch when max_steps is unset."
    )
    max_grad_norm: float | None = Field(1.0, gt=0.0, le=1e6)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_length(self) -> OptimConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set optim.max_steps or optim.epochs, not both")
        return self


class LossConfig(_Group):
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Loss temperature (not sampling)."
    )
    num_loss_tokens_to_skip: int = Field(0, ge=0, le=MAX_NEW_TOKENS)
    clip: float | None = Field(
        None, gt=0.0, le=1e6, description="Per-token cap on the loss; off by default."
    )
    vocab_clip: float | None = Field(
        None,
        gt=0.0,
        le=1e6,
        description="Per-vocabulary-entry cap, the OPSD authors' jsd_token_clip: each term of "
        "the divergence's sum over the vocabulary is clamped at this value before the sum "
        "(official recipe: 0.05). Divergences only. The clipped loss can be negative. Off by "
        "default.",
    )
    implementation: Literal["chunked", "naive"] = Field(
        "chunked", description="chunked: from hidden states, never builds T x V logits."
    )
    chunk_size: int | None = Field(
        None, ge=1, le=65536, description="Positions per chunk; auto if unset."
    )


class PromptConfig(_Group):
    student_template: str = Field(DEFAULT_STUDENT_TEMPLATE, max_length=MAX_TEXT)
    teacher_template: str = Field(DEFAULT_TEACHER_TEMPLATE, max_length=MAX_TEXT)
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: use the tokenizer's chat template when it has one."
    )
    student_thinking: bool | None = Field(
        None, description="Qwen3 enable_thinking for the student; None leaves the template default."
    )
    allow_thinking_mismatch: bool = Field(
        False,
        description="Accept a teacher_thinking different from student_thinking (the two prompts "
        "then end in different generation-prompt states).",
    )
    teacher_thinking: bool | None = Field(
        None, description="enable_thinking for the teacher; None: the student's setting."
    )
    system_prompt: str | None = Field(
        None,
        max_length=MAX_TEXT,
        description="System message of both roles; None: the row's own, if it has one.",
    )

    @field_validator("teacher_thinking")
    @classmethod
    def _same_thinking_as_student(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        _check_thinking(
            info.data.get("student_thinking"), value, info.data.get("allow_thinking_mismatch")
        )
        return value

    @model_validator(mode="after")
    def _teacher_follows_student(self) -> PromptConfig:
        if self.teacher_thinking is None and self.student_thinking is not None:
            self.teacher_thinking = self.student_thinking
        # an assignment to student_thinking after construction is checked here
        _check_thinking(self.student_thinking, self.teacher_thinking, self.allow_thinking_mismatch)
        return self

    @field_validator("student_template")
    @classmethod
    def _student_has_problem(cls, value: str) -> str:
        _check_placeholders(value, required={"problem"}, allowed={"problem"})
        return value

    @field_validator("teacher_template")
    @classmethod
    def _teacher_has_problem_and_solution(cls, value: str) -> str:
        _check_placeholders(
            value, required={"problem", "solution"}, allowed={"problem", "solution", "answer"}
        )
        return value


def _check_thinking(student: bool | None, teacher: bool | None, allowed: bool | None) -> None:
    """Teacher and student score the same rollout tokens, so both prompts must end in the same
    generation-prompt state: with Qwen3's switch, enable_thinking=False pre-fills
    "<think>\\n\\n</think>\\n\\n" and True leaves the model to open "<think>" itself."""
    if teacher is None or teacher == student or allowed:
        return
    raise ValueError(
        f"teacher_thinking={teacher} differs from student_thinking={student}: the teacher and "
        "student prompts would end in different generation-prompt states, and the teacher "
        "would score the student's first tokens where it expects others; leave "
        "teacher_thinking unset (it follows student_thinking) or set "
        "prompts.allow_thinking_mismatch: true"
    )


class GRPOConfig(_Group):
    """The GRPO baseline (paper Eq. 4-5): group-normalised binary rewards, clipped surrogate.

    The group size is `generation.num_generations` (8 for `method: grpo` unless set).
    """

    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="Clip range of the importance ratio.")
    kl_beta: float = Field(
        0.0, ge=0.0, le=100.0, description="KL penalty to the initial policy (Table 6: 0)."
    )
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std.")
    loss_normalization: Literal["sequence", "token"] = Field(
        "sequence",
        description="sequence: Eq. 5's 1/|o_i| per completion, then the mean over completions; "
        "token: the mean over every completion token of the step (DAPO / Dr. GRPO).",
    )


class EvalSpec(_Group):
    """Evaluation during/after training: avg@n and pass@k on a benchmark (problem/answer)."""

    dataset_uri: str | None = Field(
        None, max_length=MAX_URI, description="Benchmark file; no eval when unset."
    )
    problem_field: str = Field("problem", min_length=1, max_length=MAX_NAME)
    answer_field: str = Field("answer", min_length=1, max_length=MAX_NAME)
    limit: int | None = Field(None, ge=1, le=MAX_ROWS)
    n: int = Field(16, ge=1, le=256, description="Samples per problem (paper: 16).")
    max_new_tokens: int = Field(2048, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.6, ge=0.0, le=10.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 disables top-k (paper Table 5: -1).")
    thinking: bool | None = Field(
        None, description="Qwen3 enable_thinking; None: template default."
    )
    every_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Also evaluate every N optimizer steps."
    )
    at_end: bool = True
    include_base: bool = Field(False, description="Also evaluate the base model (adapter off).")
    select: Literal["best", "last"] = Field(
        "last",
        description="Which adapter the job publishes: the last step's, or the one of the "
        "evaluation with the best select_metric (the authors evaluate every 20 steps and "
        "report the best checkpoint).",
    )
    select_metric: str = Field(
        "avg",
        pattern=r"^(avg|majority|pass@[0-9]{1,3})$",
        description="Held-out metric that ranks evaluations: avg (avg@n), majority or pass@k.",
    )
    patience: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Stop early after this many evaluations in a row without a new best "
        "(needs every_steps); the job still succeeds, with the adapter select says.",
    )
    min_delta: float = Field(
        0.0, ge=0.0, le=1.0, description="A new best must beat the old one by more than this."
    )

    @model_validator(mode="after")
    def _selection_needs_evals(self) -> EvalSpec:
        if self.patience is not None and self.every_steps is None:
            raise ValueError("eval.patience counts periodic evaluations: set eval.every_steps")
        if (self.select == "best" or self.patience is not None) and not self.dataset_uri:
            raise ValueError("eval.select: best and eval.patience need eval.dataset_uri")
        return self


class GuardConfig(_Group):
    """Collapse alarms on the step metrics: each is a job event (`alarm`) when its condition
    starts to hold on the moving average of the last `window` steps; null turns one off."""

    window: int = Field(5, ge=1, le=10_000, description="Steps in the moving average.")
    length_collapse_ratio: float | None = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        description="Rollout length below this share of its first-window mean.",
    )
    entropy_collapse_ratio: float | None = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Student entropy below this share of its first-window mean.",
    )
    divergence_floor: float | None = Field(
        1e-4,
        gt=0.0,
        le=1e6,
        description="Divergence below this (nats): the teacher no longer teaches anything.",
    )
    clip_saturation: float | None = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Share of loss tokens whose loss.clip is active (clip_frac) above this.",
    )
    vocab_clip_saturation: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Share of loss tokens with a term capped by loss.vocab_clip "
        "(vocab_clip_token_frac) above this; off by default (such tokens still pass gradient).",
    )
    stop_on_alarm: bool = Field(
        False, description="Stop the run (succeeded, adapter as eval.select says) at an alarm."
    )


class CheckpointConfig(_Group):
    """Checkpoint retention (`checkpoint_every` says how often they are written)."""

    keep_last: int | None = Field(
        None,
        ge=1,
        description="Keep only the N most recent checkpoints, plus the final one; older ones are "
        "removed once a newer one is complete. Unset: keep all.",
    )


class PreflightSpec(_Group):
    """The pre-flight (:mod:`opsd_engine.preflight`): its sample sizes, and whether the job runs
    it before its first step (``run_first``), failing before training when the report is at
    least as bad as ``stop_on``. The same sizes are the defaults of ``opsd preflight`` and
    ``POST /jobs/{id}/preflight`` for this spec."""

    run_first: bool = Field(
        False, description="Run the pre-flight before the first training step (not on resume)."
    )
    stop_on: Literal["fail", "warn", "never"] = Field(
        "fail",
        description="With run_first: fail the job before training when the pre-flight's status "
        "is this or worse (fail: a failing check; warn: any warning; never: report only).",
    )
    sample_size: int = Field(16, ge=1, le=256, description="Problems sampled.")
    samples_per_problem: int = Field(1, ge=1, le=16, description="Samples per problem and role.")
    profile_rollouts: int = Field(
        4, ge=1, le=32, description="Student rollouts in the divergence profile."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="Rollout length; None: max_new_tokens."
    )
    min_gap: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Smallest privileged gap that passes; None: 0.23 (from the toy benchmark's capacity runs).",
    )


TrackerName = Literal["tensorboard", "wandb", "mlflow"]


MAX_GPUS = 64


class FSDPConfig(_Group):
    """FSDP options, named as accelerate's config file (``fsdp_config``) names them; the worker
    hands them to ``accelerate launch`` as its ``--fsdp_*`` flags (GPU workers only)."""

    fsdp_sharding_strategy: Literal[
        "FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"
    ] = "FULL_SHARD"
    fsdp_auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = (
        "TRANSFORMER_BASED_WRAP"
    )
    fsdp_transformer_layer_cls_to_wrap: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}(,[A-Za-z_][A-Za-z0-9_]{0,127}){0,15}$",
        description="Comma-separated decoder layer classes; unset: `_no_split_modules`.",
    )
    fsdp_min_num_params: int = Field(100_000_000, ge=1, description="SIZE_BASED_WRAP only.")
    fsdp_backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"] = "BACKWARD_PRE"
    fsdp_state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "FULL_STATE_DICT"
    fsdp_offload_params: bool = False
    fsdp_forward_prefetch: bool = False
    fsdp_use_orig_params: bool = True
    fsdp_cpu_ram_efficient_loading: bool = True
    fsdp_sync_module_states: bool = True
    fsdp_activation_checkpointing: bool = False


class RuntimeConfig(_Group):
    dtype: DType = "auto"
    gradient_checkpointing: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: str | None = Field(None, pattern=r"^[A-Za-z0-9_./-]{1,128}$")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How a job on several GPUs (resources.gpus > 1) shares the model: ddp "
        "(a full copy per GPU) or fsdp (sharded; for models that do not fit one device).",
    )
    fsdp_config: FSDPConfig | None = Field(
        None, description="FSDP options (accelerate's names); only with distributed: fsdp."
    )

    @field_validator("fsdp_config")
    @classmethod
    def _fsdp_options_need_fsdp(
        cls, value: FSDPConfig | None, info: ValidationInfo
    ) -> FSDPConfig | None:
        if value is not None and info.data.get("distributed") != "fsdp":
            raise ValueError("only allowed with runtime.distributed: fsdp")
        return value


class ResourcesConfig(_Group):
    """What one job occupies: ``gpus`` devices (processes) on ``nodes`` machines. The service
    runs the job on a worker of that resource class; on a CPU worker each GPU is a process."""

    gpus: int = Field(1, ge=1, le=MAX_GPUS, description="Devices (data-parallel processes).")
    nodes: Literal[1] = Field(1, description="Machines; one in this version.")


class JobSpec(BaseModel):
    """A whole training job. The same document is the `POST /jobs` body and `opsd train` spec."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    base_model: str = Field(
        ..., min_length=1, max_length=MAX_URI, description="Local directory or hub id."
    )
    dataset_uri: str = Field(
        ...,
        min_length=1,
        max_length=MAX_URI,
        description="An uploaded file's id (file-...) or a location the deployment allows.",
    )
    method: Method = "opsd"
    recipe: RecipeName | None = Field(
        None,
        description="A named set of defaults with its source: paper-v1 (the paper's first "
        "version) or official-2026-04 (the authors' repository's recipe of April 2026: forward "
        "KL, per-vocabulary clip 0.05, lr 5e-6, max_grad_norm 0.1, 1024-token rollouts at "
        "temperature 1.1 / top-p 0.95 / top-k 20, student thinking off). Fields set explicitly "
        "override it; method opsd only.",
    )
    divergence: DivergenceName = "jsd"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    max_new_tokens: int = Field(2048, ge=1, le=MAX_NEW_TOKENS)
    teacher: TeacherMode = "initial"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    checkpoint_every: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Optimizer steps between checkpoints."
    )
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_KEYS,
        description="Your labels: at most 64 flat key/value pairs (keys up to 64 characters, "
        "string values up to 512).",
    )

    dataset: DatasetFields = Field(default_factory=DatasetFields)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="Experiment trackers that mirror every metric and the spec (HF Trainer's "
        "names): tensorboard, wandb, mlflow. Where they write and their credentials come from "
        "the environment of the process that trains (TENSORBOARD_LOGGING_DIR, WANDB_*, "
        "MLFLOW_TRACKING_URI, ...), never from the spec.",
    )

    @field_validator("report_to")
    @classmethod
    def _unique_trackers(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        # The preset's values go under the document's own: an explicit field always wins.
        return apply_recipe(data) if isinstance(data, dict) else data

    @field_validator("recipe")
    @classmethod
    def _recipe_for_opsd(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("method", "opsd") != "opsd":
            raise ValueError(
                f"recipe {value!r} is an OPSD recipe; it does not apply to method "
                f"{info.data.get('method')!r}"
            )
        return value

    @field_validator("loss")
    @classmethod
    def _vocab_clip_needs_a_divergence(cls, value: LossConfig, info: ValidationInfo) -> LossConfig:
        if value.vocab_clip is not None and info.data.get("divergence") == "sampled_token":
            raise ValueError(
                "vocab_clip clips the terms of a full-vocabulary divergence; it does not apply "
                "to divergence: sampled_token (use loss.clip)"
            )
        return value

    @model_validator(mode="after")
    def _method_defaults(self) -> JobSpec:
        # GRPO samples a group per problem (paper: 8); OPSD one rollout. An explicit value wins.
        if self.method == "grpo" and "num_generations" not in self.generation.model_fields_set:
            self.generation = self.generation.model_copy(update={"num_generations": 8})
        return self

    @field_validator("method")
    @classmethod
    def _method_available(cls, value: str) -> str:
        if value not in AVAILABLE_METHODS:
            raise ValueError(
                f"method {value!r} is not available in this version; available: "
                + ", ".join(AVAILABLE_METHODS)
            )
        return value

    @field_validator("base_model", "dataset_uri")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class SpecError(ValueError):
    """A spec that failed validation; `errors` holds (dotted field path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{path}: {message}" for path, message in errors]
        super().__init__(where + "invalid job spec\n  " + "\n  ".join(lines))

    @property
    def first_field(self) -> str:
        return self.errors[0][0] if self.errors else ""


def _check_placeholders(template: str, *, required: set[str], allowed: set[str]) -> None:
    import string

    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(
            f"malformed template ({exc}); write literal braces as {{{{ and }}}}"
        ) from exc
    if missing := required - names:
        raise ValueError(
            "template must contain " + ", ".join("{" + m + "}" for m in sorted(missing))
        )
    if unknown := names - allowed:
        raise ValueError(
            "unknown placeholder(s) "
            + ", ".join("{" + u + "}" for u in sorted(unknown))
            + "; allowed: "
            + ", ".join("{" + a + "}" for a in sorted(allowed))
        )


def _errors_of(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(root)"
        message = err["msg"].removeprefix("Value error, ")
        out.append((path, message))
    return out


def parse_spec(data: Any, *, source: str | None = None) -> JobSpec:
    """Validate a mapping as a JobSpec; raises SpecError naming each bad field."""
    if not isinstance(data, dict):
        raise SpecError([("(root)", f"expected a mapping, got {type(data).__name__}")], source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_errors_of(exc), source) from None


def load_spec(path: str | Path) -> JobSpec:
    """Load a spec from a YAML (.yaml/.yml) or JSON (.json) file."""
    return load_spec_with_sources(path)[0]


def spec_sources(raw: dict[str, Any], spec: JobSpec) -> dict[str, tuple[Any, str]]:
    """Each value of ``spec`` (dotted path -> (value, source)) and who set it, given the
    document ``raw`` it was parsed from: ``user``, ``recipe <name>`` or ``default``."""
    return value_sources(raw, spec_to_dict(spec))


def load_spec_with_sources(path: str | Path) -> tuple[JobSpec, dict[str, tuple[Any, str]]]:
    """:func:`load_spec` plus :func:`spec_sources` of the file's document."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("(file)", "not found")], str(path)) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(
            [("(file)", f"not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}")], str(path)
        ) from None
    spec = _resolve_relative_paths(parse_spec(data, source=str(path)), path.parent)
    return spec, spec_sources(data, spec)


def _resolve_relative_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Local paths in a spec file are relative to the file, like most tools' config files."""

    def resolved(value: str | None) -> str | None:
        if not value or "://" in value or Path(value).is_absolute() or value.startswith("~"):
            return None
        candidate = base / value
        return str(candidate.resolve()) if candidate.exists() else None

    updates: dict[str, Any] = {}
    for name in ("base_model", "dataset_uri"):
        if (path := resolved(getattr(spec, name))) is not None:
            updates[name] = path
    if (path := resolved(spec.eval.dataset_uri)) is not None:
        updates["eval"] = spec.eval.model_copy(update={"dataset_uri": path})
    return spec.model_copy(update=updates) if updates else spec


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The whole spec with defaults filled in, JSON-serialisable (logged at the start of a run)."""
    return spec.model_dump(mode="json")
