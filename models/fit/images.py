"""`oodserve fit` for images (N, C, H, W), greyscale or RGB, sides 8 to 64: train the flow, a background
flow on mutated inputs and (with labels) SNGP within the budget, export them, calibrate every signal, choose
the fusion on self-made image perturbations and write a verified bundle. `oodserve build-bundle` is the
Fashion-MNIST case of this pipeline.

Models: a multi-scale Glow (Kingma and Dhariwal 2018; squeeze and factor-out where the sides are even),
the same family trained on inputs mutated at rate 0.15 as the likelihood-ratio background (Ren et al.
2019), and SNGP's spectral-normalised residual CNN (Liu et al. 2020). Signals: bits/dim (reported, never
fused: Nalisnick et al. 2019), typicality, likelihood ratio, input complexity (PNG of the greyscale or
colour image; Serra et al. 2020), per-level typicality, and with labels SNGP variance, 1 - max softmax and
DDU feature density (Mukhoti et al. 2021).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from oodserve.bundle.loader import load_bundle
from oodserve.bundle.manifest import BatchTypicalitySpec, ClassifierSpec, InputSpec, Provenance, SamplerSpec
from oodserve.models.build import calibrate as build
from oodserve.models.build.calibrate import BundleDescription, Calibrated, CalibrationSets, FusionSearch, fresh_staging, publish_staging
from oodserve.models.build.onnx_outputs import OnnxModels
from oodserve.models.build.signals import SignalPlan, code_version, fit_signals
from oodserve.models.data import ImageDataset
from oodserve.models.fit.budget import Budget
from oodserve.models.fit.summary import FitResult, closing_rows, figure_text
from oodserve.models.fit.work import WorkDirectory, data_fingerprint
from oodserve.models.flows.export import export_checkpoint as export_flow
from oodserve.models.flows.train import FlowData, TrainSettings, train_flow
from oodserve.models.perturbations import make_perturbed_sets
from oodserve.models.sngp.export import export_checkpoint as export_sngp
from oodserve.models.sngp.train import SNGPData, train
from oodserve.models.sngp.train import TrainSettings as SNGPSettings
from oodserve.models.splits import DataSplit, fit_split
from oodserve.scoring.signals import bits_per_dim_from_log_prob

FEATURE_DENSITY_FILE = "feature_density.npz"
BATCH_TYPICALITY_FILE = "batch_typicality.npz"
NEVER_FUSED = ("bits_per_dim",)
"""Raw likelihood is inverted on simpler images (Nalisnick et al. 2019): reported, never fused."""
STAGE_WEIGHTS_LABELLED = {"flow": 0.45, "background": 0.2, "sngp": 0.35}
STAGE_WEIGHTS_UNLABELLED = {"flow": 0.65, "background": 0.35}


@dataclass(frozen=True)
class ImageFitOptions:
    """What a caller may fix instead of the data-driven defaults (build-bundle uses them for Fashion-MNIST).

    checkpoints: trained `flow` / `background` (train flow best.pt) and `sngp` (model.pt) to use as they are;
    reuse_bundle / reuse_models: exported models of an earlier bundle to keep (for example its flows, when only
    SNGP is retrained);
    stage_minutes: training minutes per stage instead of the split of the budget; flow_preset: the Glow size
    (default from the data); limit: at most this many images per held-out split (quick smoke builds);
    reference_size: training images the signal parameters are fitted on.
    """

    checkpoints: dict[str, Path] = field(default_factory=dict)
    reuse_bundle: Path | None = None
    """An earlier bundle whose exported `reuse_models` are copied as they are (not retrained); their training
    record is carried over from its manifest."""
    reuse_models: tuple[str, ...] = ()
    stage_minutes: dict[str, float] = field(default_factory=dict)
    flow_preset: str | None = None
    background_preset: str = "small"
    mutation_rate: float = 0.15
    background_weight_decay: float = 1e-4
    limit: int | None = None
    reference_size: int = 10000
    threads: int = 2
    sngp_flip: bool = False
    """Random horizontal flips while training SNGP (right for Fashion-MNIST, wrong where mirror images differ)."""
    sngp_epochs: int | None = None
    """Epochs of SNGP's one-cycle schedule (default: as many as its share of the budget affords, timed on the data,
    at most `sngp_epoch_cap`)."""
    split: DataSplit | None = None
    """The split to use instead of `fit_split` (checkpoints trained elsewhere must not have seen its calibration)."""
    version: str = "1.0.0"
    description: str | None = None
    extra_provenance: dict[str, Any] = field(default_factory=dict)


def flow_preset_for(count: int) -> str:
    """Glow size from the number of training images: the default (3 levels x 8 steps, 64 channels) from 20,000."""
    return "default" if count >= 20000 else "small"


def sngp_epoch_cap(count: int) -> int:
    """The most epochs SNGP's schedule may take for `count` training images when the budget affords them:
    about a million image presentations, 10 to 60 epochs."""
    return int(np.clip(1_000_000 // max(count, 1), 10, 60))


def image_signal_plans(level_outputs: list[str], has_classifier: bool) -> list[SignalPlan]:
    """Every signal an image bundle computes; each kind's `fit` learns its parameters on the training split."""
    plans = [
        SignalPlan("bits_per_dim", "bits_per_dim", "flow", "log_prob"),
        SignalPlan("typicality", "typicality", "flow", "log_prob"),
        SignalPlan(
            "likelihood_ratio", "likelihood_ratio", "flow", "log_prob", {"background_model": "background", "background_output": "log_prob"}
        ),
        SignalPlan("input_complexity", "input_complexity", "flow", "log_prob"),
    ]
    plans += [SignalPlan(f"{level}_typicality", "model_output", "flow", level, {"two_sided": True}) for level in level_outputs]
    if has_classifier:
        plans += [
            SignalPlan("sngp_variance", "model_output", "sngp", "variance", {"sign": 1.0}),
            SignalPlan("sngp_max_softmax", "max_softmax", "sngp", "logits"),
            SignalPlan("feature_density", "feature_density", "sngp", "features", {"parameters_file": FEATURE_DENSITY_FILE}),
        ]
    return plans


def _train_models(
    data: ImageDataset, split: DataSplit, budget: Budget, options: ImageFitOptions, work: WorkDirectory, seed: int
) -> dict[str, Path]:
    """Checkpoints of the flow, the background flow and (with labels) SNGP: given, finished in `work`, or trained now."""
    images, labels = data.images, data.labels
    has_classifier = labels is not None
    weights = dict(STAGE_WEIGHTS_LABELLED if has_classifier else STAGE_WEIGHTS_UNLABELLED)
    budget.plan(weights)
    flow_data = FlowData(images[split.train], images[split.validation], images[split.validation])

    def minutes(stage: str) -> float:
        return options.stage_minutes.get(stage, budget.seconds_for(stage) / 60.0)

    checkpoints: dict[str, Path] = {}
    stages: list[tuple[str, Path]] = [("flow", work.file("flow") / "best.pt"), ("background", work.file("background") / "best.pt")]
    if has_classifier:
        stages.append(("sngp", work.file("sngp") / "model.pt"))
    given = set(options.checkpoints) | set(options.reuse_models)
    for stage, checkpoint in stages:
        if stage in options.reuse_models:
            continue
        if stage in options.checkpoints:
            checkpoints[stage] = Path(options.checkpoints[stage])
            continue
        # a stage that stopped early (validation plateau) hands its time to the stages after it
        budget.plan({name: weight for name, weight in weights.items() if name not in budget.spent and name not in given},
                    keep=budget.planned)
        with budget.timed(stage):
            if not work.done(stage):
                if stage == "sngp":
                    assert labels is not None
                    train(
                        SNGPSettings(
                            out_dir=str(checkpoint.parent),
                            epochs=options.sngp_epochs or 0,
                            max_epochs=sngp_epoch_cap(len(split.train)),
                            max_minutes=minutes(stage),
                            threads=options.threads,
                            seed=seed,
                            flip=options.sngp_flip,
                        ),
                        SNGPData(
                            images[split.train],
                            labels[split.train],
                            images[split.validation],
                            labels[split.validation],
                            images[split.validation],
                            labels[split.validation],
                        ),
                    )
                else:
                    background = stage == "background"
                    preset = options.background_preset if background else (options.flow_preset or flow_preset_for(len(split.train)))
                    train_flow(
                        TrainSettings(
                            family="glow",
                            preset=preset,
                            out=str(checkpoint.parent),
                            epochs=1000,
                            max_minutes=minutes(stage),
                            threads=options.threads,
                            seed=seed + int(background),
                            patience=3,
                            mutation_rate=options.mutation_rate if background else 0.0,
                            weight_decay=options.background_weight_decay if background else 0.0,
                        ),
                        flow_data,
                    )
                work.finish(stage, read_metrics(checkpoint))
        checkpoints[stage] = checkpoint
    return checkpoints


REUSED_FILES = {"flow": ("flow.onnx", "flow_sample.onnx"), "background": ("background.onnx",), "sngp": ("sngp.onnx",)}
"""The bundle files each model stage writes (the first is the model itself)."""


def check_reusable(options: ImageFitOptions, split: DataSplit, seed: int) -> None:
    """Refuse to reuse an earlier bundle's models unless its files verify (sha256) and it was fitted with the same
    seed (and, where recorded, the same split sizes): models trained on another split may have seen this fit's
    calibration images, and their p-values would then be too small."""
    if not options.reuse_models:
        return
    if options.reuse_bundle is None:
        raise ValueError(f"reuse_models {list(options.reuse_models)} needs reuse_bundle")
    earlier = load_bundle(options.reuse_bundle).manifest.provenance.model_dump(mode="json")
    if earlier.get("seed") != seed:
        raise ValueError(f"{options.reuse_bundle} was fitted with seed {earlier.get('seed')!r}, this fit uses {seed}: its models were "
                         "trained on another split and may have seen this fit's calibration images")
    recorded = earlier.get("splits") or {}
    mismatched = {name: (recorded[name], size) for name, size in split.sizes().items() if name in recorded and recorded[name] != size}
    if mismatched:
        raise ValueError(f"{options.reuse_bundle} has other split sizes (earlier, now): {mismatched}")


def _export(checkpoints: dict[str, Path], staging: Path, options: ImageFitOptions) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for stage in options.reuse_models:
        assert options.reuse_bundle is not None
        for name in REUSED_FILES[stage]:
            source = options.reuse_bundle / name
            if not source.is_file():
                raise FileNotFoundError(f"{source}: the bundle to reuse {stage!r} from has no {name}")
            shutil.copyfile(source, staging / name)
        files[stage] = staging / REUSED_FILES[stage][0]
    if "flow" in checkpoints:
        files["flow"], _ = export_flow(checkpoints["flow"], staging / "flow.onnx")
    if "background" in checkpoints:
        files["background"], background_sampler = export_flow(checkpoints["background"], staging / "background.onnx")
        background_sampler.unlink()  # the background model never generates
    if "sngp" in checkpoints:
        files["sngp"] = export_sngp(checkpoints["sngp"], staging / "sngp.onnx")
    return {stage: files[stage] for stage in REUSED_FILES if stage in files}


def _training_record(checkpoints: dict[str, Path], options: ImageFitOptions) -> dict[str, Any]:
    """Each model's training metrics: from its checkpoint's run, or carried over from the bundle it was reused from."""
    record: dict[str, Any] = {stage: read_metrics(path) for stage, path in checkpoints.items()}
    if options.reuse_models:
        assert options.reuse_bundle is not None
        earlier = json.loads((options.reuse_bundle / "manifest.json").read_text())
        earlier_training = earlier.get("provenance", {}).get("training", {})
        for stage in options.reuse_models:
            record[stage] = {
                **earlier_training.get(stage, {}),
                "reused_from": f"{earlier.get('name')} {earlier.get('version')} (code {earlier.get('provenance', {}).get('code_version')})",
            }
    return {stage: record[stage] for stage in REUSED_FILES if stage in record}


def fit_images(
    data: ImageDataset,
    out: Path,
    *,
    name: str,
    minutes: float,
    seed: int = 0,
    work: Path | None = None,
    default_alpha: float = 0.05,
    options: ImageFitOptions | None = None,
) -> FitResult:
    """Fit an image bundle for `data` into `out` (replaced only once the new bundle is complete)."""
    options = options or ImageFitOptions()
    budget = Budget(minutes * 60.0, reserve_fraction=0.15)
    images, labels = data.images, data.labels
    split = options.split or fit_split(len(images), seed, labels)
    work_directory = WorkDirectory(work or out.with_name(out.name + ".work"), data_fingerprint(images, labels, seed=seed, kind="images"))
    staging = fresh_staging(out)
    check_reusable(options, split, seed)
    checkpoints = _train_models(data, split, budget, options, work_directory, seed)
    with budget.timed("export"):
        model_files = _export(checkpoints, staging, options)
    with budget.timed("calibration and fusion"):
        manifest = calibrate_and_write(
            data, staging, split, model_files, budget, options, name=name, seed=seed, default_alpha=default_alpha,
            training=_training_record(checkpoints, options),
        )
    publish_staging(staging, out)
    return FitResult(out, _summary(data, split, manifest, budget), manifest)


@dataclass(frozen=True)
class BundleLayout:
    """Which signals an image bundle computes and which model classifies: Glow + background + SNGP by default
    (`image_signal_plans`), or one hybrid flow that is density model and classifier at once."""

    plans: list[SignalPlan] | None = None
    """None: `image_signal_plans` for the models present."""
    classifier_model: str = "sngp"
    builder: str = "oodserve fit (models/fit/images.py)"
    model_summary: str = "Glow flow + mutation-trained background flow"
    latent_dimension: int | None = None
    """The sampler's latent size (None: the image's D, as for a bijective flow)."""
    batch_typicality: bool = True
    """Declare the batch typicality test on the flow's bits/dim (needs a `bits_per_dim` signal)."""


def calibrate_and_write(
    data: ImageDataset,
    staging: Path,
    split: DataSplit,
    model_files: dict[str, Path],
    budget: Budget,
    options: ImageFitOptions,
    *,
    name: str,
    seed: int,
    default_alpha: float,
    training: dict[str, Any],
    layout: BundleLayout | None = None,
) -> dict[str, Any]:
    """Fit the signals on the training split, calibrate them on the held-out halves, choose the fusion on
    self-made perturbations of the validation images and write the bundle's manifest and data into `staging`
    (`oodserve.models.build.calibrate`). Returns the manifest as JSON."""
    layout = layout or BundleLayout()
    models = OnnxModels(model_files, threads=options.threads)
    level_outputs = [output for output in models.output_names("flow") if output.startswith("level_")]
    plans = layout.plans if layout.plans is not None else image_signal_plans(level_outputs, data.labels is not None)
    has_classifier = data.labels is not None and layout.classifier_model in model_files
    images, labels = data.images, data.labels
    rng = np.random.default_rng(seed)
    limit = options.limit
    reference_index = rng.choice(split.train, size=min(options.reference_size, len(split.train)), replace=False)[:limit]
    signal_index, fusion_index, validation_index = (
        part[:limit] for part in (split.signal_calibration, split.fusion_calibration, split.validation)
    )
    dimensions = int(np.prod(images.shape[1:]))
    reference_outputs = models.outputs(images[reference_index], "reference (train split)")
    fitted = fit_signals(plans, reference_outputs, models.signal_inputs(images[reference_index]),
                         labels[reference_index] if labels is not None else None)
    search = FusionSearch(
        validation=images[validation_index],
        perturb=lambda validation: make_perturbed_sets(validation, seed=seed),
        what="validation images",
        never_fused=NEVER_FUSED,
        reason_suffix="; raw bits/dim is never fused because flows give simpler images higher likelihood (Nalisnick et al. 2019)",
    )
    channels, height, width = (int(side) for side in images.shape[1:])
    minimum_alpha = 1.0 / (len(fusion_index) + 1)

    def describe(calibrated: Calibrated) -> BundleDescription:
        reference_bpd = bits_per_dim_from_log_prob(reference_outputs["flow"]["log_prob"], dimensions)
        return BundleDescription(
            name=name,
            version=options.version,
            description=options.description or (
                f"oodserve fit of {Path(data.source).name}: {len(images)} {'RGB' if channels == 3 else 'greyscale'} images of "
                f"{height}x{width}; {layout.model_summary}"
                + (" + SNGP classifier" if labels is not None and layout.classifier_model == "sngp" else "")
            ),
            input=InputSpec(shape=[channels, height, width], dtype="uint8", min=0, max=255, layout="NCHW"),
            labels=list(data.class_names) if has_classifier and data.class_names is not None else None,
            models=models.specs(),
            classifier=ClassifierSpec(model=layout.classifier_model, logits="logits") if has_classifier else None,
            sampler=SamplerSpec(file="flow_sample.onnx", input="z", output="x", latent_shape=[layout.latent_dimension or dimensions]),
            batch_typicality=BatchTypicalitySpec(signal="bits_per_dim", entropy_bpd=float(np.mean(reference_bpd)),
                                                 parameters_file=BATCH_TYPICALITY_FILE) if layout.batch_typicality else None,
            extra_files={BATCH_TYPICALITY_FILE: {"reference_bpd": calibrated.fusion_set_signals["bits_per_dim"]}}
            if layout.batch_typicality else {},
            default_alpha=max(default_alpha, minimum_alpha),
            provenance=Provenance.model_validate({
                "data": f"{data.source}: models trained on {len(split.train)} images, validation {len(validation_index)}, "
                f"calibration {len(signal_index)} (signals) + {len(fusion_index)} (fusion), never trained on",
                "seed": seed,
                "code_version": code_version(),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "builder": layout.builder,
                "splits": {
                    **split.sizes(),
                    "validation_used": len(validation_index),
                    "signal_calibration_used": len(signal_index),
                    "fusion_calibration_used": len(fusion_index),
                },
                "minimum_alpha": minimum_alpha,
                "training": training,
                "budget": budget.split_text(),
                "fusion_candidates_top5": calibrated.top_candidates(),
                **options.extra_provenance,
            }),
        )

    manifest = build.calibrate_and_write(
        staging, models, fitted, CalibrationSets(signal=images[signal_index], fusion=images[fusion_index]), search, describe
    )
    return manifest.model_dump(mode="json")


def read_metrics(checkpoint: Path) -> dict[str, Any]:
    """The run's metrics.json without its lists; for a run stopped before its test evaluation, what a `train flow`
    checkpoint records itself (steps, minutes, the validation figures of its last evaluation)."""
    path = checkpoint.parent / "metrics.json"
    if not path.exists():
        if checkpoint.suffix != ".pt" or not checkpoint.is_file():
            return {"checkpoint": checkpoint.name}
        import torch

        stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state = stored.get("state", {})
        if not isinstance(state, dict) or not state.get("history"):
            return {"checkpoint": checkpoint.name}
        last = state["history"][-1]
        return {"checkpoint": checkpoint.name, "family": stored.get("family"), "parameters": stored.get("parameters"),
                "steps": state.get("step"), "train_minutes": round(float(state.get("elapsed_s", 0.0)) / 60, 2),
                **{key: value for key, value in last.items() if key.startswith("validation_")},
                "test": "not run by the trainer (stopped before its test evaluation)"}
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if k != "history" and not isinstance(v, (list, dict))}


def _summary(data: ImageDataset, split: DataSplit, manifest: dict[str, Any], budget: Budget) -> list[tuple[str, str]]:
    count, channels, height, width = data.images.shape
    rows = [
        (
            "data",
            f"{data.source}: {count} {'RGB' if channels == 3 else 'greyscale'} images of {height}x{width}, "
            + (f"{len(data.class_names or [])} classes" if data.labels is not None else "no labels"),
        )
    ]
    rows.append(("splits", ", ".join(f"{key} {value}" for key, value in manifest["provenance"]["splits"].items())))
    shown = ("test_bpd", "validation_bpd", "test_accuracy", "validation_accuracy", "train_minutes", "parameters", "steps",
             "epochs_completed", "stop_reason")
    for model, info in manifest["provenance"]["training"].items():
        rows.append((f"model {model}", figure_text({key: value for key, value in info.items() if key in shown})))
    rows += closing_rows(manifest, manifest["provenance"]["minimum_alpha"], budget)
    return rows
