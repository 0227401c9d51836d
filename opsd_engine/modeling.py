"""Model loading, the LoRA student, the frozen teacher view and hidden-state forwards.

One set of base weights serves both roles. The student is the PEFT model with its adapter
enabled; the `initial` teacher is the same model under `disable_adapter()` and `no_grad` — LoRA
is never merged into (or unmerged from) the base weights, so the teacher cannot drift. Forwards
return final hidden states; logits are produced only where a loss asks for them (the chunked
loss never builds a full [T, V] tensor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opsd_engine.config import JobSpec, LoraConfig, PromptConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The base model or tokenizer could not be loaded (message says which and why)."""


def resolve_device(preference: str) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it (as in the paper) and fp32 on the CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors alike
        raise ModelLoadError(f"cannot load tokenizer from {name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_base_model(
    name_or_path: str, *, dtype: torch.dtype, attn_implementation: str | None = None
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {name_or_path!r}: {exc}") from exc
    return model


def attach_lora(model: nn.Module, lora: LoraConfig, *, gradient_checkpointing: bool) -> Any:
    """Wrap the base model with a fresh trainable LoRA adapter (base weights frozen)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ModelLoadError(
            f"lora.target_modules: {missing} not found in the model (it has e.g. "
            f"{sorted(n for n in present if n.endswith('proj'))[:12]})"
        )
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:  # the older name, deprecated (FutureWarning) where the new one exists
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.config.use_cache = False
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


@dataclass
class PolicyModel:
    """The PEFT-wrapped model plus the pieces the trainer needs to reach directly."""

    peft_model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    prompts: PromptConfig | None = None  # how prompts are rendered (decides the stop set)

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers *ForCausalLM with LoRA layers injected."""
        return self.peft_model.get_base_model()

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack that returns final hidden states (LoRA layers live inside it)."""
        lm = self.causal_lm
        return lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model

    @property
    def output_embeddings(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    @property
    def stop_token_ids(self) -> list[int]:
        """The engine's stop set for this model and prompt config (:func:`stop_token_ids`)."""
        return stop_token_ids(self.tokenizer, self.causal_lm, prompts=self.prompts)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Final (normed) hidden states `[B, L, H]` of the model as it currently is."""
        out = self.backbone(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=False,
        )
        return out.last_hidden_state

    @contextlib.contextmanager
    def teacher_view(self, mode: str) -> Iterator[None]:
        """Forwards here are the teacher's: no grad, eval mode, adapter off when `initial`."""
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with torch.no_grad():
                if mode == "initial":
                    with self.peft_model.disable_adapter():
                        yield
                else:
                    yield
        finally:
            self.peft_model.train(was_training)


def load_generation_config(name_or_path: str) -> Any:
    """The model's generation config without loading its weights.

    ``generation_config.json`` if the model has one, else the one derived from ``config.json``
    (what ``from_pretrained`` gives a model, and what vLLM's ``try_get_generation_config`` reads
    for its stop set). Raises :class:`ModelLoadError` when neither can be read.
    """
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(name_or_path)
    except OSError:
        pass
    try:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(name_or_path))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the generation config of {name_or_path!r}: {exc}"
        ) from exc


def stop_token_ids(
    tokenizer: Any, model: Any = None, *, prompts: PromptConfig | None = None
) -> list[int]:
    """The engine's stop set: every token id that ends a rollout, in process and when served.

    In this order, without repeats: the tokenizer's EOS, the generation config's EOS id(s)
    (``model`` is a model, whose ``generation_config`` is used, or a ``GenerationConfig``), and,
    when prompts go through the chat template (``prompts``; default :class:`PromptConfig`: when
    the tokenizer has one), the template's end-of-turn token (:func:`end_of_turn_token_id`, e.g.
    ``<|im_end|>``). An inference server stops on the first two by itself (vLLM:
    ``SamplingParams.update_from_generation_config``); the third only when the request's
    ``stop_token_ids`` name it, so every request carries this whole set. A Qwen3 *-Base model
    (EOS ``<|endoftext|>`` everywhere) with a ChatML template ends its turns with ``<|im_end|>``.
    """
    from opsd_engine.prompts import end_of_turn_token_id, uses_chat_template

    ids: list[int] = []
    gen_config = getattr(model, "generation_config", model)
    candidates: list[Any] = [
        tokenizer.eos_token_id,
        getattr(gen_config, "eos_token_id", None),
    ]
    if uses_chat_template(tokenizer, prompts or PromptConfig()):
        candidates.append(end_of_turn_token_id(tokenizer))
    for candidate in candidates:
        if candidate is None:
            continue
        for value in candidate if isinstance(candidate, list | tuple) else [candidate]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def load_policy(spec: JobSpec, *, device: torch.device | None = None) -> PolicyModel:
    """Load tokenizer + base model from `spec.base_model` and attach a fresh LoRA adapter."""
    device = device or resolve_device(spec.runtime.device)
    dtype = resolve_dtype(spec.runtime.dtype, device)
    tokenizer = load_tokenizer(spec.base_model)
    base = load_base_model(
        spec.base_model, dtype=dtype, attn_implementation=spec.runtime.attn_implementation
    )
    peft_model = attach_lora(
        base, spec.lora, gradient_checkpointing=spec.runtime.gradient_checkpointing
    )
    peft_model.to(device)
    return PolicyModel(
        peft_model=peft_model, tokenizer=tokenizer, device=device, dtype=dtype, prompts=spec.prompts
    )
