"""Student rollouts: sampling completions as token ids behind a small backend interface.

`RolloutBackend.generate` takes prompt token ids and returns completion token ids, each cut just
after its first stop token (the stop token kept) or at `max_new_tokens`. Rollouts are never
decoded to text here. Two backends:

* :class:`TransformersRolloutBackend` samples in process with its own decode loop over the
  model's KV cache (left-padded prompts, one forward per new token, finished rows dropped from
  the batch), as many rows per call as the memory budget allows; float32 LoRA layers are folded
  into a temporary copy of their weights for the call (:func:`folded_lora`: one matmul instead
  of three and none of peft's per-call Python, base weights untouched);
* :class:`ServedRolloutBackend` has an inference server with runtime LoRA loading (vLLM, or
  `opsd serve-adapters`) sample them: once per optimizer step it saves the current adapter and
  loads it under a new immutable name. It talks to the server through :class:`CompletionServer`,
  which the worker implements over HTTP (`worker.inference_client`): no HTTP in the engine.

Seeded sampling: every rollout draws its randomness from its own generator, seeded from a
per-prompt seed and its generation index (:func:`derive_seed`). The trainers key the per-prompt
seed on (spec seed, epoch, example index) (:func:`rollout_seed`), so a rollout is the same
whether its prompt is sampled alone, in a batch, or on another data-parallel rank. Each row's
uniforms are drawn up front (one per decode step) and a token is drawn by inverting the CDF of
the (temperature / top-k / top-p filtered) next-token distribution, so no random number depends
on which other rows share the batch.

A trainer gets a :data:`RolloutFactory` (default: the transformers backend), which builds the
backend from a :class:`PolicyView` of the trainer's policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from opsd_engine.checkpoint import save_adapter
from opsd_engine.events import StepCancelled

log = logging.getLogger("opsd.rollout")

#: Decode steps between two polls of ``should_stop`` while sampling.
STOP_POLL_EVERY = 8
_SEED_MASK = (1 << 63) - 1
_TRAIN_ROLLOUT_DOMAIN = 0x4F505344  # "OPSD": keeps training streams apart from other uses


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


StopPoll = Callable[[], bool]


class RolloutBackend(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        should_stop: StopPoll | None = None,
    ) -> list[Rollout]:
        """`num_generations` rollouts per prompt, grouped by prompt in prompt order.

        ``seeds`` (one per prompt) make each rollout a function of its prompt, seed and
        generation index alone; ``should_stop`` is polled while sampling and a True answer
        raises :class:`~opsd_engine.events.StepCancelled`.
        """
        ...


def derive_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers: BLAKE2b of their decimal text, so it is the same
    in every process, on every platform and for every Python version (unlike ``hash``)."""
    text = ",".join(str(int(part)) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _SEED_MASK


def rollout_seed(seed: int, epoch: int, example_index: int) -> int:
    """The per-prompt sampling seed of a training rollout: the spec's ``seed``, the epoch of the
    example stream and the example's index in the dataset. Independent of batching, of the
    step's micro-batches and of the number of processes."""
    return derive_seed(_TRAIN_ROLLOUT_DOMAIN, seed, epoch, example_index)


def row_uniforms(seed: int, generation: int, count: int) -> Tensor:
    """``count`` float64 uniforms in [0, 1) for generation ``generation`` of a prompt seeded
    ``seed``: the random numbers of one rollout, one per decode step (CPU tensor)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, generation))
    return torch.rand(count, generator=generator, dtype=torch.float64)


def cut_at_stop(
    token_ids: list[int], stop_ids: set[int], pad_id: int | None = None
) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first stop token; drop what generate padded after it."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: position + 1], True
    return list(token_ids), False


def sample_next_tokens(logits: Tensor, uniforms: Tensor, params: SamplingParams) -> Tensor:
    """One token per row of ``logits`` ``[B, V]``, drawn with the row's uniform ``[B]``.

    Greedy (``temperature == 0``) takes the first maximum. Otherwise the logits are divided by
    the temperature, filtered to the ``top_k`` most likely tokens (0 = all) and then to the
    smallest set whose probability reaches ``top_p`` (the order transformers applies them in),
    and the token is the first whose cumulative probability exceeds ``u * total``: an exact
    draw from the filtered distribution (tokens of probability 0 are never picked). Every row
    is computed on its own, so a row's token does not depend on the other rows.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    order = None
    if params.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= params.top_p, 0.0)  # the first token always stays
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: stay strictly below it.
    target = torch.minimum(
        uniforms.to(cdf).unsqueeze(1) * total, torch.nextafter(total, cdf.new_zeros(()))
    )
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
    if order is not None:
        index = order.gather(-1, index)
    return index.squeeze(1)


@contextlib.contextmanager
def folded_lora(module: nn.Module, *, max_bytes: float = float("inf")) -> Iterator[int]:
    """Inside the block, every foldable LoRA layer of ``module`` computes
    ``x @ (W + delta).T + b`` with ``delta`` the adapter's ``get_delta_weight`` (peft), from a
    temporary folded copy of its weight: the same function as peft's ``W x + s B A x`` in one
    matmul, without peft's per-call Python. The base weights are never written (this is not
    peft's in-place merge), and the layers are restored on exit. Yields the number of layers
    folded.

    Foldable: a peft LoRA ``Linear`` over an ``nn.Linear`` with float32 weights, adapters
    enabled and not merged, every active adapter plain LoRA (no DoRA or other variant), while
    the copies fit ``max_bytes``. Lower precisions are left alone: a bf16 copy would round the
    small LoRA delta away. Gradients are not tracked (for sampling only).
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is an engine dependency
        yield 0
        return
    patched: list[nn.Module] = []
    used = 0.0
    try:
        with torch.no_grad():
            for layer in module.modules():
                if not isinstance(layer, LoraLinear) or layer.disable_adapters or layer.merged:
                    continue
                base = layer.base_layer
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if (
                    not isinstance(base, nn.Linear)
                    or base.weight.dtype != torch.float32
                    or any(a in layer.lora_variant for a in active)
                    or used + base.weight.nbytes > max_bytes
                ):
                    continue
                weight = base.weight.detach().clone()
                for adapter in active:
                    weight += layer.get_delta_weight(adapter)
                layer.forward = _linear_with(weight, base.bias)  # instance attribute: restored
                patched.append(layer)
                used += weight.nbytes
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward


def _linear_with(weight: Tensor, bias: Tensor | None) -> Callable[..., Tensor]:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return F.linear(x, weight, bias)

    return forward


class TransformersRolloutBackend:
    """In-process sampling with a decode loop over the model's KV cache.

    Prompts are left-padded (attention mask and position ids follow the real tokens); the
    prompt is prefilled once, then one token per step is fed back for the rows still running.
    Rows that sampled a stop token leave the batch (and the cache) at once. At most
    ``batch_size`` prompts, and at most as many rows as :meth:`max_rows` allows for the memory
    budget, share one call.
    """

    def __init__(
        self,
        model: Any,
        *,
        pad_id: int,
        stop_ids: list[int],
        device: torch.device,
        batch_size: int = 8,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.device = device
        self.batch_size = max(1, batch_size)
        self.memory_budget_bytes = memory_budget_bytes
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._lm = lm
        self._backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        self._head = lm.get_output_embeddings()
        names = inspect.signature(self._backbone.forward).parameters
        self._cache_arg = "cache" if "cache" in names else "past_key_values"

    # ------------------------------------------------------------------------------ memory
    def max_rows(self, prompt_len: int, max_new_tokens: int) -> int:
        """Rows whose KV cache and per-step buffers fit the memory budget (at least 1).

        Per row: keys and values of every layer over ``prompt_len + max_new_tokens`` positions,
        plus the prefill's activations and the sampling buffers over the vocabulary. The budget
        is ``memory_budget_bytes``, else ``OPSD_ROLLOUT_MEMORY_GB``, else 40% of the device's
        free memory (CUDA) or of the machine's available memory (CPU).
        """
        config = self._lm.config
        text = getattr(config, "text_config", None) or config
        layers = int(getattr(text, "num_hidden_layers", 1))
        heads = int(getattr(text, "num_attention_heads", 1))
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        hidden = int(getattr(text, "hidden_size", 1))
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        intermediate = int(getattr(text, "intermediate_size", 4 * hidden))
        vocab = int(getattr(text, "vocab_size", 1))
        element = next(self._lm.parameters()).element_size()
        length = prompt_len + max_new_tokens
        kv = 2 * layers * kv_heads * head_dim * length * element
        prefill = prompt_len * (4 * hidden + 2 * intermediate) * element
        sampling = vocab * 8 * 4  # fp32 logits/probs and the float64 cdf, sorted copies
        per_row = kv + prefill + sampling
        return max(1, int(self._budget() // max(per_row, 1)))

    def _budget(self) -> float:
        if self.memory_budget_bytes is not None:
            return float(self.memory_budget_bytes)
        if configured := os.environ.get("OPSD_ROLLOUT_MEMORY_GB"):
            return float(configured) * 2**30
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return 0.4 * free
        return 0.4 * _available_host_memory()

    # ---------------------------------------------------------------------------- sampling
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        should_stop: StopPoll | None = None,
    ) -> list[Rollout]:
        if not prompts:
            return []
        if seeds is None:  # reproducible under torch.manual_seed, like transformers' sampling
            seeds = torch.randint(0, _SEED_MASK, (len(prompts),), dtype=torch.int64).tolist()
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        n = params.num_generations
        rows = [(i, g) for i in range(len(prompts)) for g in range(n)]
        longest = max(len(p) for p in prompts)
        per_call = min(self.batch_size * n, self.max_rows(longest, params.max_new_tokens))
        per_call = max(n, per_call - per_call % n)  # whole prompts per call
        completions: list[list[int]] = []
        for start in range(0, len(rows), per_call):
            chunk = rows[start : start + per_call]
            uniforms = torch.stack(
                [row_uniforms(seeds[i], g, params.max_new_tokens) for i, g in chunk]
            )
            completions += self._decode(
                [prompts[i] for i, _ in chunk], uniforms, params, should_stop
            )
        stop = set(self.stop_ids)
        rollouts = []
        for (prompt_index, _), ids in zip(rows, completions, strict=True):
            token_ids, finished = cut_at_stop(ids, stop)
            rollouts.append(Rollout(prompt_index, token_ids, finished))
        return rollouts

    def _forward(
        self, input_ids: Tensor, attention: Tensor, positions: Tensor, cache: Any
    ) -> Tensor:
        """fp32 logits ``[B, V]`` of the last position, the cache extended in place.

        A one-token step under SDPA gets its mask ready-made (``[B, 1, 1, kv]`` bool, True =
        attend: what transformers' ``sdpa_mask`` builds, and a 4D mask is used as given), which
        spares rebuilding it from the 2D mask at every token."""
        mask: Tensor = attention
        if input_ids.shape[1] == 1 and self._lm.config._attn_implementation == "sdpa":
            mask = attention.bool()[:, None, None, :]
        out = self._backbone(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return self._head(out.last_hidden_state[:, -1]).float()

    def _decode(
        self,
        prompts: list[list[int]],
        uniforms: Tensor,
        params: SamplingParams,
        should_stop: StopPoll | None,
    ) -> list[list[int]]:
        device, stop = self.device, torch.tensor(self.stop_ids, device=self.device)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        uniforms = uniforms.to(device)
        out: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))  # prompt row of each batch row
        rows = torch.arange(len(prompts), device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with (
                torch.inference_mode(),
                folded_lora(self._backbone, max_bytes=0.5 * self._budget()),
            ):
                # (a preallocated cache written in place measured slower on the CPU: SDPA copies
                # the strided key/value views)
                cache = DynamicCache(config=self._lm.config)
                logits = self._forward(input_ids, attention, positions, cache)
                next_position = positions[:, -1] + 1
                for step in range(params.max_new_tokens):
                    tokens = sample_next_tokens(logits, uniforms[rows, step], params)
                    running = ~torch.isin(tokens, stop)
                    for row, token in zip(active, tokens.tolist(), strict=True):
                        out[row].append(token)
                    if step + 1 == params.max_new_tokens or not bool(running.any()):
                        break
                    polled = should_stop is not None and (step + 1) % STOP_POLL_EVERY == 0
                    if polled and should_stop():
                        raise StepCancelled("stop requested while sampling")
                    if not bool(running.all()):  # finished rows leave the batch and the cache
                        keep = running.nonzero().squeeze(1)
                        cache.batch_select_indices(keep)
                        active = [active[i] for i in keep.tolist()]
                        rows, tokens = rows[keep], tokens[keep]
                        attention, next_position = attention[keep], next_position[keep]
                    attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
                    logits = self._forward(
                        tokens.unsqueeze(1), attention, next_position.unsqueeze(1), cache
                    )
                    next_position = next_position + 1
        finally:
            self.model.train(was_training)
        return out


def _available_host_memory() -> float:
    """Bytes of memory the kernel reports available (MemAvailable); 8 GiB if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(8 * 2**30)


@dataclass(frozen=True)
class PolicyView:
    """What a rollout backend may use of a trainer's policy."""

    model: Any  # the PEFT model (adapter enabled = the current policy)
    current_step: Callable[[], int]  # optimizer steps done: the weights' version
    pad_id: int
    stop_ids: list[int]
    device: torch.device
    batch_size: int  # prompts per generation call: all of a step's prompts on this rank
    # Data-parallel group: the rank, the group's size and a barrier over it (no-op alone).
    process_index: int = 0
    num_processes: int = 1
    barrier: Callable[[], None] = lambda: None


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

    In a data-parallel group every rank asks for its own share of the step's prompts (no prompt
    is sampled twice); rank 0 alone saves, loads and retires adapters, and the other ranks wait
    for it (``view.barrier``) before their first request of a step, so ``run_name`` must be the
    same on every rank. The server samples with its own randomness: ``seeds`` are not sent, so
    served rollouts are not reproducible across runs or group sizes.
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
        leader = self.view.process_index == 0
        if leader:
            path = save_adapter(self.view.model, self.adapter_dir / name)  # atomic: never half-read
            self.server.ensure_adapter(name, str(path.resolve()))
        self.view.barrier()  # the other ranks sample only once rank 0 has loaded it
        previous, self.loaded = self.loaded, (step, name)
        if previous is not None and leader:
            self._retire(previous[1])
        return name

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        should_stop: StopPoll | None = None,
    ) -> list[Rollout]:
        # One request per step: ``should_stop`` is left to the trainer's next poll (a rank that
        # stopped here would skip the barrier of `sync` that the other ranks wait in).
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
        if self.loaded is not None and self.view.process_index == 0:
            self._retire(self.loaded[1])
            self.loaded = None

    def _retire(self, name: str) -> None:
        try:
            self.server.unload_adapter(name)
        except Exception as exc:  # the server may be gone; its adapters go with it
            log.warning("could not unload rollout adapter %s: %s", name, exc)
        shutil.rmtree(self.adapter_dir / name, ignore_errors=True)
