"""Request bodies of the adapter server: the subset of vLLM's OpenAI-compatible protocol we serve.

Field names and defaults follow vLLM's OpenAI server (``max_tokens`` 16 for completions; for
chat, the rest of the context when unset; ``top_k`` -1 or 0 disables it; unset sampling fields
take the model's generation-config defaults). Unknown fields are ignored, as vLLM does. Fields
this server does not implement (``stream``, ``logprobs``, ``echo``, penalties, ``min_p``,
``ignore_eos``, ``min_tokens``, logit bias, bad words, allowed token ids) are refused with a
400 when they would change the result, never silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = ""
    lora_path: str = ""


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str = ""
    lora_int_id: int | None = None


class SamplingFields(_Request):
    """The sampling fields of vLLM's completion and chat requests (``CompletionRequest``,
    ``ChatCompletionRequest`` in ``vllm/entrypoints/openai/``), with vLLM's defaults. ``None``
    for temperature/top_p/top_k/min_p/repetition_penalty means the model's generation config
    default (else vLLM's neutral one), as vLLM's ``to_sampling_params`` does."""

    model: str
    n: int = Field(1, ge=1, le=256)
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    stream: bool = False
    echo: bool = False
    return_token_ids: bool = False  # vLLM >= 0.10.2: each choice also carries its `token_ids`

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = None
    add_special_tokens: bool = True


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content; text parts joined by newlines, as vLLM joins them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(
            str(part.get("text", "")) for part in self.content if part.get("type") == "text"
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
