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
        _refuse_unsupported(body.stream, body.echo, body.logprobs is not None)
        _check_model(engine, body.model)
        prompts = _completion_prompts(engine, body.prompt)
        sampling = _sampling(body, body.max_tokens or 16)
        results = engine.generate(body.model, prompts, sampling)
        choices = [
            {
                "index": i * body.n + j,
                "text": sample.text,
                "logprobs": None,
                "finish_reason": sample.finish_reason,
                "stop_reason": None,
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
        _refuse_unsupported(body.stream, body.echo, bool(body.logprobs))
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
        results = engine.generate(body.model, [prompt], _sampling(body, max_tokens))
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": sample.text},
                "logprobs": None,
                "finish_reason": sample.finish_reason,
                "stop_reason": None,
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


def _refuse_unsupported(stream: bool, echo: bool, logprobs: bool) -> None:
    for name, used in (("stream", stream), ("echo", echo), ("logprobs", logprobs)):
        if used:
            raise InvalidRequest(f"'{name}' is not supported by this server", param=name)


def _check_model(engine: AdapterEngine, model: str) -> None:
    if not engine.has_model(model):
        raise NotFound(f"The model `{model}` does not exist.", param="model")


def _completion_prompts(engine: AdapterEngine, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [engine.encode_text(prompt)]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [engine.encode_text(p) if isinstance(p, str) else list(p) for p in prompt]


def _sampling(body: Any, max_tokens: int) -> Sampling:
    return Sampling(
        n=body.n,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k,
        seed=body.seed,
        stop=body.stop_strings(),
    )


def _usage(prompts: list[list[int]], results: list[list[Any]]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(s.num_tokens for samples in results for s in samples)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
