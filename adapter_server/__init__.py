"""A small OpenAI/vLLM-compatible inference server for LoRA adapters on transformers + peft.

`opsd serve-adapters --base-model DIR` serves one base model and any number of PEFT LoRA adapters
loaded at runtime, with the subset of vLLM's OpenAI-compatible protocol the service uses:
`GET /v1/models`, `POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter` (only when
`VLLM_ALLOW_RUNTIME_LORA_UPDATING` is true, as in vLLM), `POST /v1/completions` and
`/v1/chat/completions` with `model=<adapter name or base name>` and `n` samples. It is the
embedded default and the CPU stand-in for a vLLM server: the worker talks to either the same way.

Modules: :mod:`adapter_server.engine` (model, adapters, batched sampling),
:mod:`adapter_server.protocol` (request schemas), :mod:`adapter_server.app` (the FastAPI app),
:mod:`adapter_server.cli` (the `opsd serve-adapters` command).
"""
