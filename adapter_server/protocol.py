"""Request bodies of the adapter server: the subset of vLLM's OpenAI-compatible protocol we serve.

Field names and defaults follow vLLM's OpenAI server (``max_tokens`` 16 for completions; for
chat, the rest of the context when unset; ``top_k`` -1 or 0 disables it). Unknown fields are
ignored, as vLLM does. ``stream``, ``logprobs`` and ``echo`` are refused with a 400: this server
does not implement them.
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


class _SamplingFields(_Request):
    model: str
    n: int = Field(1, ge=1, le=256)
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    echo: bool = False
    return_token_ids: bool = False  # vLLM >= 0.10.2: each choice also carries its `token_ids`

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            str(part.get("text", "")) for part in self.content if part.get("type") == "text"
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
