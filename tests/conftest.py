"""Shared fixtures: a tiny Qwen3-architecture model and dataset built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opsd_engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def qwen3_base_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in the Qwen3 *-Base layout: EOS ``<|endoftext|>`` in the tokenizer, config
    and generation config, Qwen3's published chat template (see ``tests/qwen3_layout.py``)."""
    from tests.qwen3_layout import write_base_layout_model

    return write_base_layout_model(tiny_model_dir, tmp_path_factory.mktemp("qwen3") / "qwen3-base")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opsd_engine.tiny import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "train.jsonl", n=16, seed=0)


def make_tiny_spec(model_dir: Path, dataset: Path, **overrides: object):
    """A spec small enough for the CPU: short rollouts, tiny LoRA, high LR, fp32."""
    from opsd_engine.config import parse_spec

    body: dict = {
        "base_model": str(model_dir),
        "dataset_uri": str(dataset),
        "max_new_tokens": 12,
        "seed": 0,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {
            "learning_rate": 5e-3,
            "batch_size": 2,
            "grad_accum": 2,
            "max_steps": 3,
            "warmup_ratio": 0.0,
        },
        "runtime": {"dtype": "float32", "device": "cpu", "gradient_checkpointing": False},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return parse_spec(body)


@pytest.fixture
def tiny_spec(tiny_model_dir: Path, tiny_dataset: Path):
    def factory(**overrides: object):
        return make_tiny_spec(tiny_model_dir, tiny_dataset, **overrides)

    return factory
