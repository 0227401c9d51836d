"""Student rollouts: sampling completions as token ids behind a small backend interface.

`RolloutBackend.generate` takes prompt token ids and returns completion token ids, each cut just
after its first stop token (the stop token kept) or at `max_new_tokens`. The transformers backend
samples in batches with a KV cache from left-padded prompts; a vLLM backend can implement the same
interface. Rollouts are never decoded to text here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.2
    top_p: float = 1.0
    top_k: int = 0
    num_generations: int = 1


@dataclass(frozen=True)
class Rollout:
    prompt_index: int  # which prompt of the request this completion answers
    token_ids: list[int]  # completion ids, stop token included when one was sampled
    finished: bool  # True when it ended on a stop token, False when cut at max_new_tokens


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """`num_generations` rollouts per prompt, grouped by prompt in prompt order."""
        ...


def cut_at_stop(
    token_ids: list[int], stop_ids: set[int], pad_id: int | None = None
) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first stop token; drop what generate padded after it."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: position + 1], True
    return list(token_ids), False


class TransformersRolloutBackend:
    """Batched sampling with `model.generate` (KV cache, left padding, attention mask)."""

    def __init__(
        self,
        model: Any,
        *,
        pad_id: int,
        stop_ids: list[int],
        device: torch.device,
        batch_size: int = 8,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.device = device
        self.batch_size = max(1, batch_size)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            for rollout in self._generate_chunk(chunk, params):
                rollouts.append(
                    Rollout(rollout.prompt_index + start, rollout.token_ids, rollout.finished)
                )
        return rollouts

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
        sampling = params.temperature > 0
        # A fresh config, so that a checkpoint's generation_config.json (repetition penalty, its
        # own temperature, min_p, ...) cannot silently change the on-policy distribution.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            num_return_sequences=params.num_generations,
            pad_token_id=self.pad_id,
            eos_token_id=self.stop_ids,
            use_cache=True,
            **(
                {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
                if sampling
                else {}
            ),
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                output = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=config,
                )
        finally:
            self.model.train(was_training)
        completions = output[:, width:].tolist()
        stop = set(self.stop_ids)
        rollouts = []
        for index, ids in enumerate(completions):
            token_ids, finished = cut_at_stop(ids, stop)
            rollouts.append(Rollout(index // params.num_generations, token_ids, finished))
        return rollouts
