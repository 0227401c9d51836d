"""OPSD engine: on-policy self-distillation of causal LMs with LoRA (no HTTP, DB or queue here)."""
