"""HTTP client for an OpenAI-compatible inference server with runtime LoRA loading (vLLM).

Works against vLLM's OpenAI server (started with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) and against our ``opsd serve-adapters``. Calls used:

* ``GET /v1/models``: the base model card(s) (no ``parent``) and the loaded adapters;
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` / ``/v1/unload_lora_adapter``;
* ``POST /v1/completions`` with token-id prompts (several per request) and ``n`` samples;
  every generation request carries the engine's stop set as ``stop_token_ids`` and neutral
  values for the sampling fields vLLM would otherwise take from the model's generation config.

Admin calls (models, load, unload) run under ``admin_timeout``; generation under
``generation_timeout``. Adapter names are immutable on the server, so :meth:`ensure_adapter`
treats "already loaded" as success when the name is then listed (two workers raced to load it).
Errors come back as :class:`InferenceError` with the server's status and message, whichever of
vLLM's error shapes it used (``{"error": {...}}`` or a flat ``{"message", "type", "code"}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import httpx

DEFAULT_ADMIN_TIMEOUT = 120.0
DEFAULT_GENERATION_TIMEOUT = 3600.0
KEEPALIVE_EXPIRY = 2.0  # seconds; below uvicorn's (and vLLM's) 5 s keep-alive timeout
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is greedy sampling


@dataclass(frozen=True)
class Choice:
    """One sampled completion. ``token_ids`` when the server returns them (vLLM >= 0.10.2 and
    `opsd serve-adapters` with ``return_token_ids``), else ``None``. ``stop_reason`` is what
    ended a ``"stop"``: a stop token id, a stop string, or ``None`` for the EOS token."""

    text: str
    token_ids: list[int] | None
    finish_reason: str | None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int | None:
        return None if self.token_ids is None else len(self.token_ids)


class InferenceError(RuntimeError):
    """The inference server refused a call or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(body)[:500]


class InferenceClient:
    """A synchronous client for one inference server (``base_url`` with or without ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_timeout: float = DEFAULT_ADMIN_TIMEOUT,
        generation_timeout: float = DEFAULT_GENERATION_TIMEOUT,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = _base_url(base_url)
        self.admin_timeout = admin_timeout
        self.generation_timeout = generation_timeout
        # Servers close idle keep-alive connections (uvicorn, so vLLM: after 5 s); a request
        # sent on one that is being closed fails with "Server disconnected". Idle connections
        # are dropped sooner here, and such a failure is retried once on a fresh connection.
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ calls
    def _request(self, method: str, path: str, *, timeout: float, **kwargs: Any) -> httpx.Response:
        try:
            try:
                response = self._http.request(method, path, timeout=timeout, **kwargs)
            except httpx.RemoteProtocolError:  # a keep-alive connection closed under us
                response = self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise InferenceError(
                f"{method} {self.base_url}{path} timed out after {timeout:g}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise InferenceError(
                f"cannot reach the inference server at {self.base_url}: {exc}"
            ) from exc
        if response.status_code >= 400:
            raise InferenceError(
                f"{method} {path} -> {response.status_code}: {_error_message(response)}",
                status=response.status_code,
            )
        return response

    def models(self) -> list[dict[str, Any]]:
        """The model cards of ``GET /v1/models`` (base model(s) and loaded adapters)."""
        body = self._request("GET", "/v1/models", timeout=self.admin_timeout).json()
        return list(body.get("data", []))

    def model_ids(self) -> set[str]:
        return {str(card["id"]) for card in self.models()}

    def base_model(self, expected: str | None = None) -> str:
        """The name under which the server serves its base model.

        With ``expected`` (the job's ``base_model``), the served base must be that model: same
        id or path, or the same last path component (``/models/Qwen3-1.7B`` serves
        ``Qwen/Qwen3-1.7B``); otherwise :class:`InferenceError`.
        """
        bases = [card for card in self.models() if not card.get("parent")]
        if not bases:
            raise InferenceError(f"{self.base_url} lists no base model in /v1/models")
        if expected is None:
            return str(bases[0]["id"])
        wanted = expected.rstrip("/")
        for card in bases:
            names = {str(card.get("id", "")), str(card.get("root") or "")}
            names = {n.rstrip("/") for n in names if n}
            if wanted in names or PurePosixPath(wanted).name in {
                PurePosixPath(n).name for n in names
            }:
                return str(card["id"])
        served = ", ".join(f"{c.get('id')} ({c.get('root')})" for c in bases)
        raise InferenceError(
            f"the inference server at {self.base_url} serves {served}, not the job's base model "
            f"{expected!r}; point OPSD_INFERENCE_URL at a server for that model"
        )

    def load_adapter(self, name: str, path: str) -> None:
        self._request(
            "POST",
            "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": path},
            timeout=self.admin_timeout,
        )

    def unload_adapter(self, name: str) -> None:
        self._request(
            "POST", "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=self.admin_timeout
        )

    def ensure_adapter(self, name: str, path: str) -> bool:
        """Make sure ``name`` is loaded (from ``path`` if absent); True if this call loaded it."""
        if name in self.model_ids():
            return False
        try:
            self.load_adapter(name, path)
        except InferenceError as exc:
            if exc.status == 400 and name in self.model_ids():
                return False  # someone else loaded it meanwhile: names are immutable, same weights
            raise
        return True

    def completions(
        self,
        *,
        model: str,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int],
    ) -> list[list[Choice]]:
        """``n`` completions per prompt (prompt order, then sample order).

        ``stop_token_ids`` is required: the engine's stop set
        (:func:`opsd_engine.modeling.stop_token_ids`), because vLLM stops only on the
        tokenizer's EOS, the generation config's EOS and these ids, and a Qwen3 *-Base model
        would otherwise write past ``<|im_end|>``. Every other sampling field that vLLM would
        otherwise take from the model's generation config (``repetition_penalty``, ``min_p``)
        is sent with its neutral value, so the server samples what the engine samples in
        process. ``top_k`` 0 disables top-k (sent as -1, which every vLLM version accepts).
        Greedy sampling (``temperature`` 0) asks for one completion and repeats it ``n`` times
        (vLLM refuses ``n`` > 1 when greedy). The sampled token ids are asked for
        (``return_token_ids``); servers that do not know the field ignore it, and the choices
        then have ``token_ids=None``.
        """
        greedy = temperature < GREEDY_TEMPERATURE
        body = sampling_body(model, n, max_tokens, temperature, top_p, top_k, seed, stop_token_ids)
        body["prompt"] = [list(p) if not isinstance(p, str) else p for p in prompts]
        body["return_token_ids"] = True
        if stop:
            body["stop"] = list(stop)
        response = self._request(
            "POST", "/v1/completions", json=body, timeout=self.generation_timeout
        )
        per_prompt = int(body["n"])
        choices = response.json().get("choices", [])
        out: list[list[Choice]] = [[] for _ in prompts]
        for choice in sorted(choices, key=lambda c: int(c["index"])):
            prompt_index = int(choice["index"]) // per_prompt
            if not 0 <= prompt_index < len(out):
                raise InferenceError(f"choice index {choice['index']} out of range")
            ids = choice.get("token_ids")
            out[prompt_index].append(
                Choice(
                    text=str(choice.get("text") or ""),
                    token_ids=[int(t) for t in ids] if isinstance(ids, list) else None,
                    finish_reason=choice.get("finish_reason"),
                    stop_reason=choice.get("stop_reason"),
                )
            )
        if any(len(row) != per_prompt for row in out):
            raise InferenceError(
                f"expected {per_prompt} choices per prompt, got {[len(t) for t in out]}"
            )
        return [row * n if greedy else row for row in out]

    def chat_completions(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        seed: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        stop_token_ids: Sequence[int],
    ) -> list[str]:
        """``n`` assistant replies to ``messages`` (sample order); sampling fields and the
        required ``stop_token_ids`` as in :meth:`completions`."""
        greedy = temperature < GREEDY_TEMPERATURE
        body = sampling_body(model, n, max_tokens, temperature, top_p, top_k, seed, stop_token_ids)
        body["messages"] = messages
        if chat_template_kwargs:
            body["chat_template_kwargs"] = chat_template_kwargs
        response = self._request(
            "POST", "/v1/chat/completions", json=body, timeout=self.generation_timeout
        )
        choices = sorted(response.json().get("choices", []), key=lambda c: int(c["index"]))
        replies = [str((c.get("message") or {}).get("content") or "") for c in choices]
        return replies * n if greedy else replies


def sampling_body(
    model: str,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop_token_ids: Sequence[int],
) -> dict[str, Any]:
    """The sampling fields every generation request carries (see
    :meth:`InferenceClient.completions`); greedy sampling asks for ``n`` = 1."""
    if not stop_token_ids:
        raise ValueError("stop_token_ids must name the engine's stop set (got none)")
    body: dict[str, Any] = {
        "model": model,
        "n": 1 if temperature < GREEDY_TEMPERATURE else n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k if top_k > 0 else -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop_token_ids": [int(t) for t in stop_token_ids],
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }
    if seed is not None:
        body["seed"] = seed
    return body
