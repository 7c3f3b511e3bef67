"""Torch-side subcommands (train, export, build-bundle, eval) registered on the `oodserve` CLI.

Importing this module must stay cheap and must not import torch: each command imports its
implementation lazily.
"""

from __future__ import annotations

import typer

train_app = typer.Typer(help="Train models (needs the `train` extra).", no_args_is_help=True)
export_app = typer.Typer(help="Export trained checkpoints to ONNX (needs the `train` extra).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach the torch-side subcommands to the main CLI."""
    from models.flows.cli import register as register_flows
    from models.sngp.cli import register as register_sngp

    register_flows(train_app, export_app)
    register_sngp(train_app, export_app)
    app.add_typer(train_app, name="train")
    app.add_typer(export_app, name="export")
