"""`oodserve train sngp` and `oodserve export sngp` (torch imported lazily inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"


def train_command(
    data: Path = typer.Option(Path(DEFAULT_DATA), "--data", help="Fashion-MNIST IDX directory."),
    out: Path = typer.Option(Path("runs/sngp"), "--out", help="Output directory (checkpoints, metrics.json)."),
    epochs: int = typer.Option(11, help="Epochs (the LR schedule spans all of them); 0 = as many as --max-minutes affords."),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate of the one-cycle schedule."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    seed: int = typer.Option(0),
    max_minutes: float = typer.Option(25.0, "--max-minutes", help="Wall-clock budget for training."),
    threads: int = typer.Option(1, help="torch intra-op threads."),
    spectral_bound: float = typer.Option(6.0, "--spectral-bound", help="Soft spectral-norm bound c."),
    ridge: float = typer.Option(1.0, help="Ridge penalty of the GP precision."),
    random_features: int = typer.Option(1024, "--random-features"),
    lengthscale: float = typer.Option(4.0, help="RFF kernel lengthscale (W ~ N(0, 1/l^2))."),
    widths: str = typer.Option("16,32,64", help="Channels per stage, comma separated."),
    blocks_per_stage: int = typer.Option(1, "--blocks-per-stage"),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips."),
    crop_padding: int = typer.Option(0, "--crop-padding", help="Random-crop padding in pixels (0 = off)."),
    limit_train: int = typer.Option(0, "--limit-train", help="Use only N training images (smoke tests)."),
) -> None:
    """Train the SNGP classifier on split.train of Fashion-MNIST."""
    from oodserve.models.sngp.train import TrainSettings, train

    settings = TrainSettings(
        data_dir=str(data), out_dir=str(out), epochs=epochs, batch_size=batch_size, learning_rate=lr,
        weight_decay=weight_decay, seed=seed, max_minutes=max_minutes, threads=threads, flip=flip,
        crop_padding=crop_padding, limit_train=limit_train,
        model={
            "spectral_bound": spectral_bound, "ridge": ridge, "num_random_features": random_features,
            "lengthscale": lengthscale, "widths": tuple(int(w) for w in widths.split(",")),
            "blocks_per_stage": blocks_per_stage,
        },
    )
    train(settings)


def export_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt / model.pt written by `train sngp`."),
    out: Path = typer.Option(..., "--out", help="Destination .onnx file."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
) -> None:
    """Export a trained SNGP to ONNX: x (N,1,28,28) 0..255 -> logits, variance, features."""
    from oodserve.models.sngp.export import export_checkpoint

    export_checkpoint(checkpoint, out, opset=opset)
    typer.echo(f"wrote {out}")


def register(train_app: typer.Typer, export_app: typer.Typer) -> None:
    """Add the `sngp` command to the train and export sub-apps."""
    train_app.command("sngp")(train_command)
    export_app.command("sngp")(export_command)


def main() -> None:
    """Stand-alone entry: `python -m oodserve.models.sngp.cli train|export ...`."""
    app = typer.Typer(no_args_is_help=True)
    train_app = typer.Typer(no_args_is_help=True)
    export_app = typer.Typer(no_args_is_help=True)
    register(train_app, export_app)
    app.add_typer(train_app, name="train")
    app.add_typer(export_app, name="export")
    app()


if __name__ == "__main__":
    main()
