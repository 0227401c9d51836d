"""`opsd serve-adapters`: run the adapter server (see :mod:`adapter_server`).

Imports of torch, transformers and the web stack happen inside the command, so mounting it on
`opsd` costs nothing for the other commands.
"""

from __future__ import annotations

import logging

import typer


def register(app: typer.Typer) -> None:
    """Mount `serve-adapters` on the top-level `opsd` command."""
    app.command("serve-adapters")(serve_adapters)


def serve_adapters(
    base_model: str = typer.Option(..., "--base-model", help="Base model directory or hub id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address."),
    port: int = typer.Option(8001, "--port", help="Port."),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Name of the base model in /v1/models (default: dir)."
    ),
    max_loras: int = typer.Option(8, "--max-loras", help="Adapters kept loaded (LRU eviction)."),
    max_lora_rank: int = typer.Option(
        256,
        "--max-lora-rank",
        help="Largest LoRA rank accepted, of any module (rank_pattern included), as in vLLM.",
    ),
    max_batch_sequences: int = typer.Option(
        32, "--max-batch-sequences", help="Sequences sampled together in one batch."
    ),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", help="Prompt + completion limit (default: the model config's)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    lora_modules: list[str] = typer.Option(
        [], "--lora-modules", help="NAME=PATH adapters to load at start (repeatable)."
    ),
) -> None:
    """Serve a base model and runtime-loaded LoRA adapters over vLLM's OpenAI-compatible API."""
    import uvicorn

    from adapter_server.app import create_app
    from adapter_server.engine import AdapterEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine = AdapterEngine(
        base_model,
        served_model_name=served_model_name,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        max_batch_sequences=max_batch_sequences,
        max_model_len=max_model_len,
        device=device,
        dtype=dtype,
    )
    for module in lora_modules:
        name, sep, path = module.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(
                f"expected NAME=PATH, got {module!r}", param_hint="--lora-modules"
            )
        engine.load_adapter(name, path)
    typer.echo(
        f"serving {engine.served_model_name!r} ({engine.device}, {engine.dtype}) "
        f"on http://{host}:{port}"
    )
    uvicorn.run(create_app(engine), host=host, port=port, log_level="info")
