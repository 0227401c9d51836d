"""The `opsd` console command: one entry point that mounts each part's commands.

Engine commands (train, report, spec, dev) come from `opsd_engine.cli`; service commands (up,
api, worker, migrate, keys) from `opsd_service.cli`. Each part keeps its own imports lazy, so
`opsd --help` and the client commands never load torch.
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

try:  # the service part arrives in its own package
    from opsd_service.cli import register as register_service_commands
except ImportError:  # pragma: no cover - only while the package is absent
    register_service_commands = None
if register_service_commands is not None:
    register_service_commands(app)


def main() -> None:
    app()
