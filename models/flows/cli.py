"""`oodserve train flow` and `oodserve export flow` (torch is imported lazily inside the commands)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"


def train_flow_command(
    family: str = typer.Option("glow", help="nice | glow | nsf | iresnet | rectangular (injective: a density on a learned manifold)"),
    data: Path = typer.Option(Path(DEFAULT_DATA), help="IDX directory (gzip or not), .npy file or PNG folder"),
    out: Path = typer.Option(Path("runs/flow"), help="output directory for checkpoints and metrics.json"),
    epochs: int = typer.Option(20, help="maximum number of epochs"),
    batch_size: int = typer.Option(64, help="training batch size"),
    lr: float = typer.Option(1e-3, help="peak Adam learning rate (linear warm-up, cosine decay)"),
    warmup_steps: int = typer.Option(200, help="linear warm-up steps"),
    seed: int = typer.Option(0, help="random seed"),
    max_minutes: float | None = typer.Option(None, help="stop training cleanly after this many minutes"),
    threads: int | None = typer.Option(None, help="torch intra-op threads"),
    resume: bool = typer.Option(False, help="resume from OUT/checkpoint.pt"),
    mutation_rate: float = typer.Option(0.0, help="Ren et al. 2019 background model: pixel mutation probability"),
    weight_decay: float = typer.Option(0.0, help="L2 penalty (Adam weight_decay)"),
    preset: str = typer.Option("default", help="tiny | small | default"),
    config: str | None = typer.Option(None, help='JSON overrides of the preset, e.g. \'{"hidden_channels": 96}\''),
    attention: str = typer.Option("none", help="iresnet only: none, or l2 to end every scale with an attentive contractive "
                                  "block (L2 self-attention scaled to Lipschitz < 1, models/flows/attention.py)"),
    hybrid: bool = typer.Option(False, help="add a linear classifier head on the latent and train on cross-entropy + "
                                "NLL_WEIGHT * bits/dim (needs labels; the export gains logits and features)"),
    nll_weight: float = typer.Option(1.0, help="hybrid only: weight of bits/dim against the per-image cross-entropy"),
    schedule: str = typer.Option("joint", help="joint: end-to-end maximum likelihood; jko: a sequence of JKO proximal steps, one "
                                 "stage of blocks at a time, each minimising KL + transport cost / (2 h) (models/flows/jko.py)"),
    jko_step_size: float = typer.Option(1.0, help="jko only: the step size h"),
    jko_steps: int | None = typer.Option(None, help="jko only: number of steps (stages) [default: one per block]"),
    snapshot_minutes: list[float] = typer.Option([], help="also save the EMA model as snapshot-<m>min.pt at these training minutes"),
    patience: int = typer.Option(3, help="early stop after this many epochs without validation improvement"),
    eval_minutes: float = typer.Option(10.0, help="also validate + checkpoint every this many minutes"),
    limit_train: int | None = typer.Option(None, help="use only the first N training/validation images"),
    limit_test: int | None = typer.Option(None, help="use only the first N test images"),
) -> None:
    """Train a normalizing flow by maximum likelihood on dequantised 8-bit images."""
    from oodserve.models.flows.train import TrainSettings, train_flow

    overrides = json.loads(config) if config else {}
    if attention != "none":
        if family != "iresnet" or attention != "l2":
            raise typer.BadParameter(f"--attention takes none or l2, and only with --family iresnet; got {attention!r} with {family!r}")
        overrides["attention"] = attention
    settings = TrainSettings(
        family=family, data=str(data), out=str(out), epochs=epochs, batch_size=batch_size, lr=lr,
        warmup_steps=warmup_steps, seed=seed, max_minutes=max_minutes, threads=threads, resume=resume,
        mutation_rate=mutation_rate, weight_decay=weight_decay, preset=preset,
        overrides=overrides, patience=patience, eval_minutes=eval_minutes,
        limit_train=limit_train, limit_test=limit_test, hybrid=hybrid, nll_weight=nll_weight,
        schedule=schedule, jko_step_size=jko_step_size, jko_steps=jko_steps, snapshot_minutes=tuple(snapshot_minutes),
    )
    train_flow(settings)


def export_flow_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt or best.pt written by `train flow`"),
    out: Path = typer.Option(Path("flow.onnx"), help="density graph; the sampling graph goes to <stem>_sample.onnx"),
    opset: int = typer.Option(18, help="ONNX opset (>= 17)"),
) -> None:
    """Export a trained flow to ONNX: x (N,1,28,28) 0..255 -> log_prob (+ level_k) and z -> x sampling graph."""
    from oodserve.models.flows.export import export_checkpoint

    paths = export_checkpoint(checkpoint, out, opset=opset)
    for path in paths:
        typer.echo(f"wrote {path}")


def register(train_app: typer.Typer, export_app: typer.Typer) -> None:
    """Add the `flow` command to the `train` and `export` sub-apps."""
    train_app.command("flow")(train_flow_command)
    export_app.command("flow")(export_flow_command)


def _standalone_app() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, help="Flow commands (same as `oodserve train/export flow`).")
    train_app = typer.Typer(no_args_is_help=True)
    export_app = typer.Typer(no_args_is_help=True)
    register(train_app, export_app)
    app.add_typer(train_app, name="train")
    app.add_typer(export_app, name="export")
    return app


if __name__ == "__main__":
    _standalone_app()()
