"""Torch-side subcommands (train, export, build-bundle, eval) registered on the `oodserve` CLI.

Importing this module must stay cheap and must not import torch (`oodserve.cli.optional` registers it whenever torch is
installed): each command imports its implementation, which imports torch, inside the command. These, and the same
pattern in `oodserve.models.flows.cli` and `oodserve.models.sngp.cli`, are the torch side's only function-level
first-party imports.
"""

from __future__ import annotations

from pathlib import Path

import typer

from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, DataError
from oodserve.models.flows.cli import register as register_flows
from oodserve.models.sngp.cli import register as register_sngp

train_app = typer.Typer(help="Train models (needs the `train` extra).", no_args_is_help=True)
export_app = typer.Typer(help="Export trained checkpoints to ONNX (needs the `train` extra).", no_args_is_help=True)


def build_bundle_command(
    data: Path = typer.Option(DEFAULT_FASHION_MNIST_DIR, help="in-distribution data (IDX directory with train-* files)"),
    out: Path | None = typer.Option(None, help="bundle directory to write [default: models/bundles/fashion-mnist, with --hybrid "
                                     "models/bundles/fashion-mnist-iresnet]"),
    work: Path | None = typer.Option(None, help="where models are trained when no checkpoint is given [default: runs/bundle, "
                                     "with --hybrid runs/bundle-hybrid]"),
    hybrid: bool = typer.Option(False, help="one hybrid invertible ResNet (flow + classifier head) instead of Glow + background + SNGP"),
    hybrid_checkpoint: Path | None = typer.Option(None, help="with --hybrid: a `train flow --hybrid` checkpoint instead of training"),
    attention: str = typer.Option("none", help="with --hybrid and no checkpoint: none or l2 (attentive contractive blocks)"),
    rectangular_checkpoint: Path | None = typer.Option(None, help="a `train flow --family rectangular` checkpoint: a bundle of its "
                                                       "manifold signals (density on the manifold, distance to it)"),
    flow_checkpoint: Path | None = typer.Option(None, help="use this `train flow` checkpoint instead of training"),
    background_checkpoint: Path | None = typer.Option(None, help="checkpoint of the background (mutation) flow"),
    sngp_checkpoint: Path | None = typer.Option(None, help="`train sngp` checkpoint (model.pt)"),
    reuse_from: Path | None = typer.Option(None, help="an earlier bundle whose exported --reuse models are kept, not retrained"),
    reuse: list[str] = typer.Option([], help="flow, background or sngp: copy this model from --reuse-from (repeatable)"),
    flow_minutes: float = typer.Option(40.0, help="training budget of the flow"),
    background_minutes: float = typer.Option(20.0, help="training budget of the background flow"),
    sngp_minutes: float = typer.Option(25.0, help="training budget of SNGP"),
    seed: int = typer.Option(0, help="random seed"),
    threads: int = typer.Option(2, help="torch / onnxruntime threads"),
) -> None:
    """Train (or take checkpoints), export, calibrate, choose the fusion and write a verified bundle."""
    if rectangular_checkpoint is not None:
        from oodserve.models.fit.manifold import build_manifold_bundle

        build_manifold_bundle(rectangular_checkpoint, out or Path("models/bundles/fashion-mnist-manifold"), data=str(data), seed=seed,
                              threads=threads)
        return
    if hybrid:
        from oodserve.models.fit.hybrid import HybridBuildSettings, build_hybrid_bundle

        build_hybrid_bundle(HybridBuildSettings(
            checkpoint=str(hybrid_checkpoint) if hybrid_checkpoint else None, data=str(data),
            out=str(out or "models/bundles/fashion-mnist-iresnet"), work=str(work or "runs/bundle-hybrid"),
            minutes=flow_minutes, attention=attention, seed=seed, threads=threads,
        ))
        return
    if hybrid_checkpoint or attention != "none":
        raise typer.BadParameter("--hybrid-checkpoint and --attention apply with --hybrid only")
    from oodserve.models.fit.fashion_mnist import BuildSettings, build_bundle

    build_bundle(BuildSettings(
        data=str(data), out=str(out or "models/bundles/fashion-mnist"), work=str(work or "runs/bundle"),
        flow_checkpoint=str(flow_checkpoint) if flow_checkpoint else None,
        background_checkpoint=str(background_checkpoint) if background_checkpoint else None,
        sngp_checkpoint=str(sngp_checkpoint) if sngp_checkpoint else None,
        reuse_from=str(reuse_from) if reuse_from else None, reuse=tuple(reuse),
        flow_minutes=flow_minutes, background_minutes=background_minutes, sngp_minutes=sngp_minutes,
        seed=seed, threads=threads,
    ))


def fit_command(
    data: Path = typer.Argument(..., help="vectors: .npy / .npz (x, y) (N, D), .csv, .parquet; images: IDX, .npy / .npz (N, H, W[, C]) "
                                "or (N, C, H, W), a folder of class folders of PNG/JPEG files, or a folder of images"),
    out: Path = typer.Option(..., "--out", help="bundle directory to write (replaced only once the new bundle is complete)"),
    name: str | None = typer.Option(None, help="bundle name [default: the --out directory's name]"),
    minutes: float = typer.Option(5.0, help="wall-clock budget of the whole fit (training, export, calibration, fusion choice)"),
    labels: str = typer.Option("auto", help="auto: use labels where the data has them (a classifier is trained); none: label-free"),
    label_column: str | None = typer.Option(None, help="CSV / Parquet: the column holding the labels"),
    seed: int = typer.Option(0, help="random seed of the splits and the models"),
    work: Path | None = typer.Option(None, help="resumable work directory [default: OUT.work]; finished stages are reused"),
    resize: str | None = typer.Option(None, help="images: resize every image to HxW pixels (sides 8 to 64), e.g. 32x32"),
    backbone: Path | None = typer.Option(None, help="your classifier as ONNX: detect OOD in its features and logits (DATA = the "
                                         "images it trained on)"),
    calibration: Path | None = typer.Option(None, help="with --backbone: held-out images the backbone never trained on (your "
                                            "validation split, at least 300) for the conformal calibration"),
    features: str | None = typer.Option(None, help="with --backbone: the feature tensor [default: input of the last Gemm/MatMul]"),
    logits: str | None = typer.Option(None, help="with --backbone: the logits output [default: the 2-D output]"),
    pooling: str | None = typer.Option(None, help="with --backbone: mean or flatten, for a feature tensor that is not 2-D"),
    preprocess: list[str] = typer.Option([], help="with --backbone: KEY=VALUE (mean=0.485,0.456,0.406 std=... scale=1/255 "
                                         "layout=NCHW dtype=float32 size=224x224 resize=center_crop) or a JSON file; repeatable"),
    calibrate_on_training_data: bool = typer.Option(False, help="with --backbone and no --calibration: calibrate on held-back "
                                                    "training images; the FPR guarantee then does NOT hold"),
    min_accuracy: float | None = typer.Option(None, help="with --backbone: the accuracy below which the fit stops [default: "
                                              "chance + 25% of the way to 1]"),
    guarantee: str = typer.Option("marginal", help="vectors: marginal (FPR <= alpha on average over calibration draws) or "
                                  "conditional (FPR <= alpha with probability >= 1 - delta for this bundle; needs >= 1,000 rows)"),
    delta: float = typer.Option(0.1, help="with --guarantee conditional: the allowed probability that the calibration draw breaks it"),
) -> None:
    """Train, export, calibrate and choose the fusion for your own data; writes a bundle `oodserve serve` serves."""
    from oodserve.models.fit.run import FitSettings, fit, format_summary

    if labels not in ("auto", "none"):
        raise typer.BadParameter(f"--labels must be auto or none, got {labels!r}")
    if guarantee not in ("marginal", "conditional"):
        raise typer.BadParameter(f"--guarantee must be marginal or conditional, got {guarantee!r}")
    if not 0.0 < delta < 1.0:
        raise typer.BadParameter(f"--delta must be between 0 and 1, got {delta:g}")
    if backbone is not None:
        from oodserve.models.fit.backbone import BackboneOptions, fit_backbone, parse_preprocess
        from oodserve.models.fit.run import bundle_name

        try:
            options = BackboneOptions(backbone=backbone, calibration=calibration, features=features, logits=logits, pooling=pooling,
                                      preprocess=parse_preprocess(preprocess), calibrate_on_training_data=calibrate_on_training_data,
                                      min_accuracy=min_accuracy, work=work or out.with_name(out.name + ".work"))
            result = fit_backbone(data, out, options, name=bundle_name(FitSettings(data=data, out=out, name=name)), seed=seed)
        except DataError as error:
            typer.echo(f"oodserve fit: {error}", err=True)
            raise typer.Exit(code=2) from error
        typer.echo(format_summary(result))
        return
    try:
        result = fit(FitSettings(data=data, out=out, name=name, minutes=minutes, labels=labels, label_column=label_column,
                                 seed=seed, work=work, resize=resize, delta=delta if guarantee == "conditional" else None))
    except DataError as error:
        typer.echo(f"oodserve fit: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(format_summary(result))


def eval_command(
    bundle: Path = typer.Option(Path("models/bundles/fashion-mnist"), help="bundle directory"),
    in_dist: Path = typer.Option(DEFAULT_FASHION_MNIST_DIR, help="in-distribution test data (IDX dir uses t10k-*)"),
    ood: list[str] = typer.Option([], help="OOD set as NAME=PATH (IDX, .npy (N,28,28) uint8 or PNG folder); repeatable"),
    out: Path = typer.Option(Path("runs/eval"), help="report directory (report.md + PNG plots)"),
    perturbations: bool = typer.Option(True, help="also evaluate self-made perturbations of the in-distribution images"),
    limit: int | None = typer.Option(None, help="use only the first N images of every set"),
    threads: int = typer.Option(2, help="onnxruntime threads"),
) -> None:
    """Score data sets through the serving engine and write a Markdown report with ROC curves and histograms."""
    from oodserve.models.evaluation.run import EvalSettings, evaluate

    named = {}
    for item in ood:
        if "=" not in item:
            raise typer.BadParameter(f"--ood expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        named[name] = path
    evaluate(EvalSettings(bundle=str(bundle), in_dist=str(in_dist), ood=named, out=str(out),
                          perturbations=perturbations, limit=limit, threads=threads))


def register(app: typer.Typer) -> None:
    """Attach the torch-side subcommands to the main CLI."""
    register_flows(train_app, export_app)
    register_sngp(train_app, export_app)
    app.add_typer(train_app, name="train")
    app.add_typer(export_app, name="export")
    app.command("build-bundle")(build_bundle_command)
    app.command("fit")(fit_command)
    app.command("eval")(eval_command)
