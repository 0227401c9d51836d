"""OPSD engine: on-policy self-distillation of causal LMs with LoRA (no HTTP, DB or queue here).

Importing it silences one library warning users can do nothing about: peft's `PeftModel` asks a
transformers >= 5 model for `is_gradient_checkpointing`, which transformers deprecated, so every
LoRA wrap or adapter load printed a FutureWarning. Only that message is silenced.
"""

import warnings

warnings.filterwarnings(
    "ignore",
    message=r"`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
)
