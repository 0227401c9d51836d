"""The adapter server's model: one base model, named LoRA adapters, batched sampling.

One transformers causal LM is loaded once. Adapters are loaded at runtime from local PEFT
directories (or any fsspec URI, copied to a local cache first) into one ``PeftModel`` with
several named adapters (``load_adapter(path, adapter_name=...)``); a request selects its adapter
with ``set_adapter`` or, for the base model, runs under ``disable_adapter()``. LoRA weights are
never merged into the base weights. Names are immutable: loading a name that exists is an error,
so a name always means the same weights. At most ``max_loras`` adapters are kept; loading one more
evicts the least recently used.

Model work (generation, loading, unloading) is serialized by one lock; the ``n`` samples of a
request, and several prompts of one request, are sampled together in batches of at most
``max_batch_sequences`` sequences with the engine's rollout backend (KV cache, left padding).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opsd_engine.modeling import (
    load_base_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    stop_token_ids,
)
from opsd_engine.rollout import SamplingParams, TransformersRolloutBackend

log = logging.getLogger("opsd.adapter_server")


class ServerError(Exception):
    """An error answered as ``{"error": {"message", "type", "code"}}`` with ``status``."""

    status = 400
    type = "BadRequestError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServerError):
    status, type = 400, "BadRequestError"


class NotFound(ServerError):
    status, type = 404, "NotFoundError"


@dataclass
class AdapterInfo:
    name: str
    path: str  # as the client gave it
    local_path: Path
    rank: int | None
    created: int  # unix time it was loaded
    last_used: float


@dataclass(frozen=True)
class Sample:
    text: str
    token_ids: tuple[int, ...]  # the sampled completion ids (the stop token included)
    finish_reason: str  # "stop" | "length"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request. ``top_k`` <= 0 and ``top_p`` 1 disable those filters."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class AdapterEngine:
    """The base model plus named adapters; thread-safe."""

    def __init__(
        self,
        base_model: str,
        *,
        served_model_name: str | None = None,
        max_loras: int = 8,
        max_lora_rank: int = 256,
        max_batch_sequences: int = 32,
        max_model_len: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | Path | None = None,
    ) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        self.base_model_path = base_model
        self.served_model_name = served_model_name or Path(base_model.rstrip("/")).name
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_batch_sequences = max(1, max_batch_sequences)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(base_model)
        base = load_base_model(base_model, dtype=self.dtype)
        base.to(self.device)
        base.eval()
        for param in base.parameters():
            param.requires_grad_(False)
        self._base: Any = base
        self._peft: Any = None  # the PeftModel once an adapter is loaded
        self.stop_ids = stop_token_ids(self.tokenizer, base)
        config_len = getattr(base.config, "max_position_embeddings", None)
        self.max_model_len = int(max_model_len or config_len or 4096)
        self.created = int(time.time())
        self._adapters: OrderedDict[str, AdapterInfo] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="opsd-adapters-"))

    # ------------------------------------------------------------------------------ listing
    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters in load order."""
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: (a.created, a.name))

    def has_model(self, name: str) -> bool:
        return name == self.served_model_name or name in self._adapters

    # ------------------------------------------------------------------------------ loading
    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load the PEFT adapter at ``path`` under ``name`` (which must be new)."""
        if not name or not path:
            raise InvalidRequest("Both 'lora_name' and 'lora_path' must be provided.")
        if name == self.served_model_name:
            raise InvalidRequest(f"'{name}' is the name of the base model.", param="lora_name")
        with self._lock:
            if name in self._adapters:
                raise InvalidRequest(
                    f"The lora adapter '{name}' has already been loaded.", param="lora_name"
                )
            local = self._local_copy(name, path)
            rank = self._check_config(local, path)
            while len(self._adapters) >= self.max_loras:
                evicted = next(iter(self._adapters))
                log.info("evicting adapter %r (max_loras=%d)", evicted, self.max_loras)
                self._remove(evicted)
            try:
                if self._peft is None:
                    from peft import PeftModel

                    self._peft = PeftModel.from_pretrained(
                        self._base, str(local), adapter_name=name, is_trainable=False
                    )
                else:
                    self._peft.load_adapter(str(local), adapter_name=name, is_trainable=False)
            except Exception as exc:
                self._discard_failed(name)
                raise InvalidRequest(f"cannot load adapter '{name}' from {path}: {exc}") from exc
            self._peft.eval()
            now = time.time()
            info = AdapterInfo(name, path, local, rank, int(now), now)
            self._adapters[name] = info
            log.info("loaded adapter %r from %s", name, path)
            return info

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise NotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            self._remove(name)
            log.info("unloaded adapter %r", name)

    def _remove(self, name: str) -> None:
        del self._adapters[name]
        if not self._adapters:
            # peft cannot delete its last adapter and stay usable: take the LoRA layers out.
            self._base = self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(name)

    def _discard_failed(self, name: str) -> None:
        """Leave no half-loaded adapter behind after a failed load."""
        if self._peft is None:
            return
        with contextlib.suppress(Exception):
            if name in getattr(self._peft, "peft_config", {}):
                if self._adapters:
                    self._peft.delete_adapter(name)
                else:
                    self._base = self._peft.unload()
                    self._peft = None

    def _local_copy(self, name: str, path: str) -> Path:
        if _is_local(path):
            local = Path(path.removeprefix("file://")).expanduser()
            if not (local / "adapter_config.json").is_file():
                raise NotFound(f"No adapter found for {path}", param="lora_path")
            return local
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(path)
            files = [f for f in fs.find(root) if not fs.isdir(f)]
        except Exception as exc:
            raise InvalidRequest(f"cannot read adapter {path}: {exc}", param="lora_path") from exc
        if not any(f.endswith("adapter_config.json") for f in files):
            raise NotFound(f"No adapter found for {path}", param="lora_path")
        target = self._cache / f"{name}-{int(time.time() * 1000)}"
        prefix = root.rstrip("/") + "/"
        for remote in files:
            local_file = target / remote.removeprefix(prefix)
            local_file.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local_file))
        return target

    def _check_config(self, local: Path, path: str) -> int | None:
        try:
            config = json.loads((local / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"unreadable adapter_config.json in {path}: {exc}") from exc
        if config.get("peft_type", "LORA") != "LORA":
            raise InvalidRequest(f"{path} is a {config.get('peft_type')} adapter, not LoRA")
        rank = config.get("r")
        if isinstance(rank, int) and rank > self.max_lora_rank:
            raise InvalidRequest(
                f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
            )
        return rank if isinstance(rank, int) else None

    # ---------------------------------------------------------------------------- prompts
    def encode_text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("the model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {}),
            )
        except Exception as exc:
            raise InvalidRequest(f"cannot apply the chat template: {exc}") from exc
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---------------------------------------------------------------------------- sampling
    def generate(
        self, model: str, prompts: Sequence[Sequence[int]], sampling: Sampling
    ) -> list[list[Sample]]:
        """``sampling.n`` samples for each prompt, with ``model`` (an adapter or the base)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequest("prompt must not be empty", param="prompt")
        vocab = len(self.tokenizer)
        for prompt in prompts:
            if any(not 0 <= int(t) < vocab for t in prompt):
                raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
            if len(prompt) + sampling.max_tokens > self.max_model_len:
                raise InvalidRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, you requested {len(prompt) + sampling.max_tokens} tokens "
                    f"({len(prompt)} in the messages, {sampling.max_tokens} in the completion).",
                    param="max_tokens",
                )
        # Greedy decoding gives one answer per prompt: sample it once and repeat it n times.
        greedy = sampling.temperature == 0
        per_prompt = 1 if greedy else sampling.n
        params = SamplingParams(
            max_new_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            num_generations=per_prompt,
        )
        with self._lock, self._selected(model) as runnable, self._rng(sampling.seed):
            backend = TransformersRolloutBackend(
                runnable,
                pad_id=int(self.tokenizer.pad_token_id),
                stop_ids=self.stop_ids,
                device=self.device,
                batch_size=max(1, self.max_batch_sequences // per_prompt),
            )
            rollouts = backend.generate([list(map(int, p)) for p in prompts], params)
        out: list[list[Sample]] = [[] for _ in prompts]
        for rollout in rollouts:
            text = self.tokenizer.decode(rollout.token_ids, skip_special_tokens=True)
            reason = "stop" if rollout.finished else "length"
            cut = _cut_at_stop_strings(text, sampling.stop)
            if cut is not None:
                text, reason = cut, "stop"
            sample = Sample(text, tuple(rollout.token_ids), reason)
            out[rollout.prompt_index].extend([sample] * (sampling.n if greedy else 1))
        return out

    @contextlib.contextmanager
    def _selected(self, model: str) -> Iterator[Any]:
        """The module to sample from for ``model`` (adapter active, or adapters disabled)."""
        if model == self.served_model_name:
            if self._peft is None:
                yield self._base
            else:
                with self._peft.disable_adapter():
                    yield self._peft
            return
        info = self._adapters.get(model)
        if info is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model")
        self._adapters.move_to_end(model)
        info.last_used = time.time()
        self._peft.set_adapter(model)
        yield self._peft

    @contextlib.contextmanager
    def _rng(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


def _cut_at_stop_strings(text: str, stop: Sequence[str]) -> str | None:
    """``text`` up to the first stop string (excluded), or None when none occurs."""
    positions = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(positions)] if positions else None
