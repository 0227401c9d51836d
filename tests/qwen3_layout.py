"""The tiny model in the special-token layouts of real Qwen3 checkpoints.

* :data:`QWEN3_CHAT_TEMPLATE` is Qwen3's published chat template (``tokenizer_config.json`` of
  Qwen/Qwen3-8B, revision 895c8d171bc03c30e113cd7a28c02494b5e068b7, line 230; the Qwen3-*-Base
  checkpoints ship the same text), kept verbatim in ``tests/fixtures/qwen3_chat_template.jinja``.
  Its thinking switch: ``enable_thinking=False`` appends ``<think>\\n\\n</think>\\n\\n`` to the
  generation prompt ``<|im_start|>assistant\\n``; true or unset appends nothing.
* :func:`write_base_layout_model` copies the tiny model into the Qwen3 *-Base layout: the
  tokenizer's ``eos_token``, ``config.json``'s and ``generation_config.json``'s ``eos_token_id``
  are all ``<|endoftext|>`` (Qwen/Qwen3-0.6B-Base ships exactly this), while the chat template
  still ends turns with ``<|im_end|>``. A server that stops only on EOS (vLLM) runs past
  ``<|im_end|>`` on this model unless the request names it in ``stop_token_ids``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

QWEN3_CHAT_TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja").read_text(
    encoding="utf-8"
)
ENDOFTEXT = "<|endoftext|>"


def write_base_layout_model(source: Path, target: Path) -> Path:
    """Copy the model at ``source`` to ``target`` in the Qwen3 *-Base EOS layout (see above)."""
    shutil.copytree(source, target)
    added = json.loads((target / "tokenizer.json").read_text())["added_tokens"]
    endoftext = next(int(t["id"]) for t in added if t["content"] == ENDOFTEXT)
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = ENDOFTEXT
    tokenizer_config.pop("chat_template", None)  # transformers >= 4.43 reads the .jinja file
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (target / "chat_template.jinja").write_text(QWEN3_CHAT_TEMPLATE, encoding="utf-8")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((target / name).read_text())
        config["eos_token_id"] = endoftext
        (target / name).write_text(json.dumps(config, indent=2))
    return target
