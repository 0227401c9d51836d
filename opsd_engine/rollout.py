"""Student rollouts: sampling completions as token ids behind a small backend interface.

`RolloutBackend.generate` takes prompt token ids and returns completion token ids, each cut just
after its first stop token (the stop token kept) or at `max_new_tokens`. Rollouts are never
decoded to text here. Two backends:

* :class:`TransformersRolloutBackend` samples in process, in batches with a KV cache from
  left-padded prompts (the default);
* :class:`ServedRolloutBackend` has an inference server with runtime LoRA loading (vLLM, or
  `opsd serve-adapters`) sample them: once per optimizer step it saves the current adapter and
  loads it under a new immutable name. It talks to the server through :class:`CompletionServer`,
  which the worker implements over HTTP (`worker.inference_client`): no HTTP in the engine.

A trainer gets a :data:`RolloutFactory` (default: the transformers backend), which builds the
backend from a :class:`PolicyView` of the trainer's policy.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import GenerationConfig

from opsd_engine.checkpoint import save_adapter

log = logging.getLogger("opsd.rollout")


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


@dataclass(frozen=True)
class PolicyView:
    """What a rollout backend may use of a trainer's policy."""

    model: Any  # the PEFT model (adapter enabled = the current policy)
    current_step: Callable[[], int]  # optimizer steps done: the weights' version
    pad_id: int
    stop_ids: list[int]
    device: torch.device
    batch_size: int


RolloutFactory = Callable[[PolicyView], RolloutBackend]


def local_rollouts(view: PolicyView) -> RolloutBackend:
    """The default :data:`RolloutFactory`: sampling in process with transformers."""
    return TransformersRolloutBackend(
        view.model,
        pad_id=view.pad_id,
        stop_ids=view.stop_ids,
        device=view.device,
        batch_size=view.batch_size,
    )


class ServedChoice(Protocol):
    token_ids: list[int] | None
    finish_reason: str | None


class CompletionServer(Protocol):
    """The calls :class:`ServedRolloutBackend` makes to an OpenAI-compatible server with runtime
    LoRA loading (`worker.inference_client.InferenceClient` makes them over HTTP)."""

    def ensure_adapter(self, name: str, path: str) -> bool: ...

    def unload_adapter(self, name: str) -> None: ...

    def completions(
        self,
        *,
        model: str,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        stop_token_ids: Sequence[int],
    ) -> Sequence[Sequence[ServedChoice]]: ...


class ServedRolloutBackend:
    """Rollouts sampled by an inference server from the current policy.

    Before the first rollouts of each optimizer step, the adapter is saved under
    ``adapter_dir/<run_name>-step<N>`` and loaded on the server under that name (names are
    immutable there: a new name per weight version, and ``run_name`` is unique per run so a
    resumed run never reuses one); the previous version is unloaded and its files deleted.
    ``adapter_dir`` must be visible to the server at the same path. Every request carries the
    engine's stop set (``view.stop_ids``) as ``stop_token_ids``: vLLM stops by itself only on
    the tokenizer's and generation config's EOS, so without it a Qwen3 *-Base model would write
    past ``<|im_end|>``. The server returns token ids (vLLM >= 0.10.2 ``return_token_ids``);
    they are cut at the first stop token like the local backend's. :meth:`close` unloads the
    last version.
    """

    def __init__(
        self,
        server: CompletionServer,
        view: PolicyView,
        *,
        adapter_dir: str | Path,
        run_name: str,
    ) -> None:
        self.server = server
        self.view = view
        self.adapter_dir = Path(adapter_dir)
        self.run_name = run_name
        self.stop_ids = set(view.stop_ids)
        self.loaded: tuple[int, str] | None = None  # (step, adapter name) on the server

    def sync(self) -> str:
        """The server's name for the current weights, loading them there when they changed."""
        step = self.view.current_step()
        if self.loaded is not None and self.loaded[0] == step:
            return self.loaded[1]
        name = f"{self.run_name}-step{step}"
        path = save_adapter(self.view.model, self.adapter_dir / name)  # atomic: never half-read
        self.server.ensure_adapter(name, str(path.resolve()))
        previous, self.loaded = self.loaded, (step, name)
        if previous is not None:
            self._retire(previous[1])
        return name

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        name = self.sync()
        results = self.server.completions(
            model=name,
            prompts=prompts,
            n=params.num_generations,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            stop_token_ids=list(self.view.stop_ids),
        )
        rollouts = []
        for prompt_index, choices in enumerate(results):
            for choice in choices:
                if choice.token_ids is None:
                    raise RuntimeError(
                        "the inference server returned no token ids; training rollouts need "
                        "vLLM >= 0.10.2 (return_token_ids) or opsd serve-adapters"
                    )
                token_ids, finished = cut_at_stop(list(choice.token_ids), self.stop_ids)
                # A stop of the server's own list (kept in the ids) also ends the rollout.
                finished = finished or choice.finish_reason == "stop"
                rollouts.append(Rollout(prompt_index, token_ids, finished))
        return rollouts

    def close(self) -> None:
        if self.loaded is not None:
            self._retire(self.loaded[1])
            self.loaded = None

    def _retire(self, name: str) -> None:
        try:
            self.server.unload_adapter(name)
        except Exception as exc:  # the server may be gone; its adapters go with it
            log.warning("could not unload rollout adapter %s: %s", name, exc)
        shutil.rmtree(self.adapter_dir / name, ignore_errors=True)
