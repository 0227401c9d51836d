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

It is the CPU stand-in for vLLM, so it follows vLLM's documented behaviour, not the engine's
conveniences: the stop set is the tokenizer's EOS, the generation config's EOS ids and the
request's ``stop_token_ids`` (nothing else: a ChatML ``<|im_end|>`` that is neither does not
stop it); stop strings and the text are computed as vLLM's detokenizer does (:meth:`_finish`);
adapter configs are checked as vLLM checks them (:meth:`_check_config`); unset sampling fields
take the generation config's defaults (:func:`default_sampling_params`). Serving never changes
a parameter's ``requires_grad``. The contract tests in ``tests/contract/`` hold it to this, and
run unchanged against a real vLLM.
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

from opsd_engine.modeling import load_base_model, load_tokenizer, resolve_device, resolve_dtype
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
    """One completion, as vLLM reports it (``CompletionOutput``)."""

    text: str
    token_ids: tuple[int, ...]  # sampled ids, up to and including the token that stopped it
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id (not EOS) or stop string

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request (vLLM's ``SamplingParams`` subset we serve).

    ``top_k`` <= 0 and ``top_p`` 1 disable those filters; ``temperature`` 0 is greedy (then
    ``n`` must be 1, as in vLLM). ``stop_token_ids`` are added to the engine's EOS ids;
    ``stop`` strings end generation at the token that completes one.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


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
        # vLLM's stop set: the tokenizer's EOS (a stop with stop_reason None) plus the generation
        # config's EOS ids (SamplingParams.update_from_generation_config), nothing else; a
        # request adds its own stop_token_ids.
        self.eos_token_id: int | None = self.tokenizer.eos_token_id
        generation_config = base.generation_config
        self.stop_ids = _unique([self.eos_token_id, generation_config.eos_token_id])
        self.default_sampling = default_sampling_params(generation_config)
        self.vocab_size = int(base.config.vocab_size)
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
        """vLLM's checks of an adapter config; the adapter's rank (the largest of any module).

        As vLLM's ``PEFTHelper.validate_legal`` (``vllm/lora/peft_helper.py``): the rank
        checked against ``max_lora_rank`` is ``max(r, *rank_pattern.values())``, and adapters
        using PEFT features vLLM does not implement (bias, DoRA, ``modules_to_save``, LoRA
        bias, base-modifying inits such as PiSSA/OLoRA/LoftQ, layer replication) are refused,
        all messages joined in one 400. ``alpha_pattern`` needs no check: peft applies it.
        """
        try:
            config = json.loads((local / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"unreadable adapter_config.json in {path}: {exc}") from exc
        if config.get("peft_type", "LORA") != "LORA":
            raise InvalidRequest(f"{path} is a {config.get('peft_type')} adapter, not LoRA")
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise InvalidRequest(f"LoRA rank `r` must be a positive integer, got {rank!r}.")
        pattern = config.get("rank_pattern") or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pattern.values()
        ):
            raise InvalidRequest(f"rank_pattern must map module names to ranks, got {pattern!r}")
        max_rank = max([rank, *pattern.values()])
        errors = _unsupported_features(config)
        if max_rank > self.max_lora_rank:
            errors.append(
                f"LoRA rank {max_rank} is greater than max_lora_rank {self.max_lora_rank}."
            )
        if config.get("bias", "none") != "none":
            errors.append("Adapter bias is not supported.")
        if errors:
            raise InvalidRequest(" ".join(errors))
        return max_rank

    # ---------------------------------------------------------------------------- prompts
    def encode_text(self, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

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
        greedy = sampling.temperature < _SAMPLING_EPS
        if greedy and sampling.n > 1:
            raise InvalidRequest(
                f"n must be 1 when using greedy sampling, got {sampling.n}.", param="n"
            )
        outside = [t for t in sampling.stop_token_ids if not 0 <= t < self.vocab_size]
        if outside:
            raise InvalidRequest(
                f"token_id(s) {outside} in stop_token_ids contain out-of-vocab token ids. "
                f"Vocabulary size: {self.vocab_size}",
                param="stop_token_ids",
            )
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
        params = SamplingParams(
            max_new_tokens=sampling.max_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else max(sampling.top_k, 0),
            num_generations=sampling.n,
        )
        stop_ids = _unique([*self.stop_ids, *sampling.stop_token_ids])
        with self._lock, self._selected(model) as runnable, self._rng(sampling.seed):
            backend = TransformersRolloutBackend(
                runnable,
                pad_id=int(self.tokenizer.pad_token_id),
                stop_ids=stop_ids,
                device=self.device,
                batch_size=max(1, self.max_batch_sequences // sampling.n),
            )
            rollouts = backend.generate([list(map(int, p)) for p in prompts], params)
        out: list[list[Sample]] = [[] for _ in prompts]
        for rollout in rollouts:
            out[rollout.prompt_index].append(
                self._finish(list(rollout.token_ids), rollout.finished, sampling)
            )
        return out

    def _finish(self, token_ids: list[int], stopped: bool, sampling: Sampling) -> Sample:
        """Text, stop strings and stop reason of one completion, as vLLM's output processor does.

        vLLM (``vllm/v1/engine/detokenizer.py``, ``BaseIncrementalDetokenizer.update`` and
        ``check_stop_strings``) detokenizes incrementally; a completion ended by a stop token
        leaves that token out of the text unless ``include_stop_str_in_output``; after each
        token the new text is searched for the stop strings (in list order), and the first hit
        ends the completion at that token: ``finish_reason="stop"``, ``stop_reason`` = the
        string, text cut before it (after it with ``include_stop_str_in_output``). Token ids
        (and so ``usage``) end at the token that completed the string. A completion ended by
        the tokenizer's EOS has ``stop_reason`` None; by another stop token, that token's id.
        """
        reason: str = "stop" if stopped else "length"
        stop_reason: int | str | None = None
        if stopped and token_ids[-1] != self.eos_token_id:
            stop_reason = token_ids[-1]
        shown = token_ids[:-1] if stopped and not sampling.include_stop_str_in_output else token_ids
        text = ""
        for position, piece in enumerate(self._pieces(shown, sampling.skip_special_tokens)):
            text += piece
            if not sampling.stop or not piece:
                continue
            hit = _check_stop_strings(
                text, len(piece), sampling.stop, sampling.include_stop_str_in_output
            )
            if hit is not None:
                stop_string, truncate_to = hit
                if truncate_to != -1:
                    text = text[:truncate_to]
                return Sample(text, tuple(token_ids[: position + 1]), "stop", stop_string)
        return Sample(text, tuple(token_ids), reason, stop_reason)

    def _pieces(self, token_ids: Sequence[int], skip_special_tokens: bool) -> Iterator[str]:
        """The text each token adds, decoded incrementally (tokenizers' ``DecodeStream``, as
        vLLM's fast detokenizer; a token ending inside a UTF-8 character adds "")."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            for token in token_ids:
                yield stream.step(backend, int(token)) or ""
            return
        previous = ""  # a slow tokenizer: decode each prefix
        for end in range(1, len(token_ids) + 1):
            current = self.tokenizer.decode(
                list(token_ids[:end]), skip_special_tokens=skip_special_tokens
            )
            if current.endswith("\ufffd") or not current.startswith(previous):
                yield ""
                continue
            yield current[len(previous) :]
            previous = current

    @contextlib.contextmanager
    def _selected(self, model: str) -> Iterator[Any]:
        """The module to sample from for ``model`` (adapter active, or adapters disabled).

        peft's ``set_adapter`` marks the active adapter trainable and leaving
        ``disable_adapter()`` re-enables adapter layers; serving must change no parameter's
        ``requires_grad``, so the flags are put back as they were afterwards.
        """
        if model == self.served_model_name:
            if self._peft is None:
                yield self._base
            else:
                with self._kept_flags(), self._peft.disable_adapter():
                    yield self._peft
            return
        info = self._adapters.get(model)
        if info is None:
            raise NotFound(f"The model `{model}` does not exist.", param="model")
        self._adapters.move_to_end(model)
        info.last_used = time.time()
        with self._kept_flags():
            self._peft.set_adapter(model)
            yield self._peft

    @contextlib.contextmanager
    def _kept_flags(self) -> Iterator[None]:
        flags = [(p, p.requires_grad) for p in self._peft.parameters()]
        try:
            yield
        finally:
            for param, flag in flags:
                if param.requires_grad != flag:
                    param.requires_grad_(flag)

    @contextlib.contextmanager
    def _rng(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


_SAMPLING_EPS = 1e-5  # vLLM: a temperature below this is greedy sampling

# init_lora_weights values that only set initial weights (a saved adapter is a plain LoRA);
# other strings (pissa, olora, corda, loftq, ...) modify the base weights: vLLM refuses them.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def _unsupported_features(config: dict[str, Any]) -> list[str]:
    """vLLM's ``PEFTHelper._validate_features`` messages for an adapter config."""
    errors = []
    unsupported = [
        m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")
    ]
    if unsupported:
        errors.append(
            "vLLM only supports modules_to_save being either None or "
            f'["classifier", "score"] for classification models. Unsupported modules_to_save: '
            f"{unsupported}"
        )
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config.get("lora_bias"):
        errors.append("vLLM does not support LoRA bias (lora_bias).")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        errors.append(f"vLLM does not support init_lora_weights={init!r}.")
    if config.get("layer_replication"):
        errors.append("vLLM does not support layer_replication.")
    return errors


def _check_stop_strings(
    text: str, new_chars: int, stop: Sequence[str], include_in_output: bool
) -> tuple[str, int] | None:
    """vLLM's ``check_stop_strings``: ``(stop string, length to cut the text to or -1)`` for the
    first string of ``stop`` (in list order) that occurs in the last ``new_chars`` characters
    (or straddles them), else None."""
    for stop_string in stop:
        index = text.find(stop_string, 1 - new_chars - len(stop_string))
        if index == -1:
            continue
        if include_in_output:
            index += len(stop_string)
            if index >= len(text):
                return stop_string, -1
        return stop_string, index
    return None


def _unique(candidates: Sequence[Any]) -> list[int]:
    ids: list[int] = []
    for candidate in candidates:
        for value in candidate if isinstance(candidate, list | tuple) else [candidate]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


#: The sampling defaults vLLM takes from a model's generation config (``ModelConfig.
#: get_diff_sampling_param``): used when a request leaves the parameter unset.
GENERATION_CONFIG_DEFAULTS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


def default_sampling_params(generation_config: Any) -> dict[str, Any]:
    """The request defaults vLLM (``--generation-config auto``) reads from a model's generation
    config: the non-default values of :data:`GENERATION_CONFIG_DEFAULTS`, and ``max_new_tokens``
    as ``max_tokens``, a cap on every request's."""
    diff = generation_config.to_diff_dict()
    out = {key: diff[key] for key in GENERATION_CONFIG_DEFAULTS if diff.get(key) is not None}
    if diff.get("max_new_tokens") is not None:
        out["max_tokens"] = int(diff["max_new_tokens"])
    return out
