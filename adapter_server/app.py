"""The adapter server's HTTP app: vLLM-compatible routes over an :class:`AdapterEngine`.

Routes (JSON in and out, as vLLM's OpenAI server answers them):

* ``GET /health`` -> 200; ``GET /v1/models`` -> ``{"object": "list", "data": [model cards]}``,
  the base model first, then each adapter with ``parent`` = the base model's name.
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` -> 200 with a plain-text "Success: ..."
  line. Like vLLM, only when runtime LoRA updating is allowed
  (``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is ``1``/``true`` when the app is built); otherwise 404.
* ``POST /v1/completions`` (``prompt``: a string, token ids, or a list of either) and
  ``POST /v1/chat/completions`` (``messages``, ``chat_template_kwargs`` such as
  ``{"enable_thinking": false}``), with ``model`` naming an adapter or the base model and ``n``
  samples per prompt. Choice ``index`` is ``prompt_index * n + sample_index``; with
  ``return_token_ids`` (as in vLLM >= 0.10.2) each choice also has its ``token_ids``.
  Generation follows vLLM's semantics (see :mod:`adapter_server.engine`): it stops on the
  tokenizer's EOS, the generation config's EOS ids and the request's ``stop_token_ids``, and
  nothing else (``stop_reason`` None for the EOS, the token id otherwise); a ``stop`` string
  ends it at the token that completes the string (``stop_reason`` = the string, token ids and
  ``usage`` cut there); ``include_stop_str_in_output`` and ``skip_special_tokens`` shape the
  text; greedy sampling (temperature 0) needs ``n`` = 1; ``seed`` makes sampling reproducible.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with status 400 (bad request,
unknown adapter name on load/duplicate name) or 404 (unknown model or adapter).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_server.engine import AdapterEngine, InvalidRequest, NotFound, Sampling, ServerError
from adapter_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    SamplingFields,
    UnloadLoRAAdapterRequest,
)

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_lora_updating_allowed(environ: dict[str, str] | None = None) -> bool:
    """vLLM's rule: the variable is set to ``1`` or ``true`` (any case)."""
    env = os.environ if environ is None else environ
    return env.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


def _error(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def create_app(engine: AdapterEngine, *, allow_runtime_lora: bool | None = None) -> FastAPI:
    """The app serving ``engine``; ``allow_runtime_lora`` None reads the environment now."""
    allowed = runtime_lora_updating_allowed() if allow_runtime_lora is None else allow_runtime_lora
    app = FastAPI(title="OPSD adapter server (vLLM-compatible subset)", version="0.1.0")
    app.state.engine = engine
    app.state.allow_runtime_lora = allowed

    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request"))
        return _error(400, f"{param}: {message}" if param else message, "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        return _error(exc.status_code, str(exc.detail), err_type)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        base = engine.served_model_name
        cards = [
            {
                "id": base,
                "object": "model",
                "created": engine.created,
                "owned_by": "opsd",
                "root": engine.base_model_path,
                "parent": None,
                "max_model_len": engine.max_model_len,
                "permission": [],
            }
        ]
        for adapter in engine.adapters():
            cards.append(
                {
                    "id": adapter.name,
                    "object": "model",
                    "created": adapter.created,
                    "owned_by": "opsd",
                    "root": adapter.path,
                    "parent": base,
                    "max_model_len": engine.max_model_len,
                    "permission": [],
                }
            )
        return {"object": "list", "data": cards}

    def _require_runtime_lora() -> None:
        if not app.state.allow_runtime_lora:
            raise NotFound(
                f"runtime LoRA updating is disabled; start the server with {RUNTIME_LORA_ENV}=True"
            )

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    def load_lora_adapter(body: LoadLoRAAdapterRequest) -> str:
        _require_runtime_lora()
        engine.load_adapter(body.lora_name, body.lora_path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> str:
        _require_runtime_lora()
        if not body.lora_name:
            raise InvalidRequest("'lora_name' must be provided.", param="lora_name")
        engine.unload_adapter(body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @app.post("/v1/completions")
    def completions(body: CompletionRequest) -> dict[str, Any]:
        _refuse_unsupported(body, logprobs=body.logprobs is not None)
        _check_model(engine, body.model)
        prompts = _completion_prompts(engine, body.prompt, body.add_special_tokens)
        sampling = _sampling(engine, body, body.max_tokens or 16)
        results = engine.generate(body.model, prompts, sampling)
        choices = [
            {
                "index": i * body.n + j,
                "text": sample.text,
                "logprobs": None,
                "finish_reason": sample.finish_reason,
                "stop_reason": sample.stop_reason,
                **({"token_ids": list(sample.token_ids)} if body.return_token_ids else {}),
            }
            for i, samples in enumerate(results)
            for j, sample in enumerate(samples)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "usage": _usage(prompts, results),
        }

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest) -> dict[str, Any]:
        _refuse_unsupported(body, logprobs=bool(body.logprobs))
        _check_model(engine, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = engine.encode_chat(
            messages,
            add_generation_prompt=body.add_generation_prompt,
            chat_template_kwargs=body.chat_template_kwargs,
        )
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.max_model_len - len(prompt), 1)
        results = engine.generate(body.model, [prompt], _sampling(engine, body, max_tokens))
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": sample.text},
                "logprobs": None,
                "finish_reason": sample.finish_reason,
                "stop_reason": sample.stop_reason,
                **({"token_ids": list(sample.token_ids)} if body.return_token_ids else {}),
            }
            for j, sample in enumerate(results[0])
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "usage": _usage([prompt], results),
        }

    return app


def _refuse_unsupported(body: SamplingFields, *, logprobs: bool) -> None:
    """A 400 for each field this server does not implement, when it would change the result
    (vLLM would honour it; ignoring it silently would make this stand-in differ)."""
    unsupported = {
        "stream": body.stream,
        "echo": body.echo,
        "logprobs": logprobs,
        "presence_penalty": body.presence_penalty not in (None, 0.0),
        "frequency_penalty": body.frequency_penalty not in (None, 0.0),
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens > 0,
        "logit_bias": bool(body.logit_bias),
        "bad_words": bool(body.bad_words),
        "allowed_token_ids": body.allowed_token_ids is not None,
    }
    for name, used in unsupported.items():
        if used:
            raise InvalidRequest(f"'{name}' is not supported by this server", param=name)
    if any(not s for s in body.stop_strings()):
        raise InvalidRequest("stop cannot contain an empty string.", param="stop")


def _check_model(engine: AdapterEngine, model: str) -> None:
    if not engine.has_model(model):
        raise NotFound(f"The model `{model}` does not exist.", param="model")


def _completion_prompts(
    engine: AdapterEngine, prompt: Any, add_special_tokens: bool = True
) -> list[list[int]]:
    if isinstance(prompt, str):
        return [engine.encode_text(prompt, add_special_tokens=add_special_tokens)]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [
        engine.encode_text(p, add_special_tokens=add_special_tokens)
        if isinstance(p, str)
        else list(p)
        for p in prompt
    ]


def _sampling(engine: AdapterEngine, body: SamplingFields, max_tokens: int) -> Sampling:
    """The request's sampling, unset fields from the model's generation config (vLLM's
    ``default_sampling_params``), else vLLM's neutral defaults; ``max_new_tokens`` of the
    generation config caps ``max_tokens``, and a seed of -1 means none, as in vLLM."""
    defaults = engine.default_sampling

    def value(name: str, neutral: float) -> float:
        given = getattr(body, name)
        return float(given if given is not None else defaults.get(name, neutral))

    for name, neutral in (("repetition_penalty", 1.0), ("min_p", 0.0)):
        if value(name, neutral) != neutral:
            source = "" if getattr(body, name) is not None else " (the model's generation config)"
            raise InvalidRequest(
                f"'{name}' = {value(name, neutral)}{source} is not supported by this server; "
                f"send {name}: {neutral}",
                param=name,
            )
    top_k = int(value("top_k", 0))
    cap = defaults.get("max_tokens")
    return Sampling(
        n=body.n,
        max_tokens=min(max_tokens, cap) if cap else max_tokens,
        temperature=value("temperature", 1.0),
        top_p=value("top_p", 1.0),
        top_k=0 if top_k < 0 else top_k,
        seed=None if body.seed == -1 else body.seed,
        stop=body.stop_strings(),
        stop_token_ids=tuple(dict.fromkeys(body.stop_token_ids or ())),
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )


def _usage(prompts: list[list[int]], results: list[list[Any]]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(s.num_tokens for samples in results for s in samples)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
