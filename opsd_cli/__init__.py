"""The `opsd` console command: one entry point that mounts each part's commands.

Engine commands (train, report, spec, dev) come from `opsd_engine.cli`; service commands (up,
api, worker, migrate, keys) from `opsd_service.cli`; client commands (jobs, evals) from
`opsd_client.cli`; `serve-adapters` from `adapter_server.cli`. Each part keeps its own imports
lazy, so `opsd --help` and the client commands never load torch.
"""

from __future__ import annotations

import typer

from opsd_engine.cli import register as register_engine_commands

app = typer.Typer(
    help="On-Policy Self-Distillation (OPSD) of LLMs: train locally or run the service.",
    no_args_is_help=True,
    add_completion=False,
)
register_engine_commands(app)


def _mount(module_name: str) -> None:
    """Mount `module_name.register(app)` when that part is installed (the SDK can stand alone)."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return
        raise
    module.register(app)


for _part in ("opsd_service.cli", "opsd_client.cli", "adapter_server.cli"):
    _mount(_part)


def main() -> None:
    app()
