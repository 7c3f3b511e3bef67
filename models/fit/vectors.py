"""`oodserve fit` for feature vectors (tabular rows, embeddings): standardise, train the models the data
affords within the budget, export them to ONNX, calibrate every signal, choose the fusion on self-made
vector perturbations, write a verified bundle.

Models (each ONNX graph takes the raw vectors `x` (N, D) float32 and standardises inside):
- `reference` (closed form): the standardised kept columns, the mean distance to the k = 5 nearest
  training rows (a k-nearest-neighbour detector, Ramaswamy et al. 2000; the strong tabular baseline) and
  its ratio to the neighbours' own k-NN distances (local density, after Breunig et al. 2000);
- `flow` (D' >= 2): an affine-coupling flow on the standardised features (`oodserve.models.flows.tabular`);
- `sngp` (with labels): SNGP with a spectral-normalised residual MLP (`oodserve.models.sngp.tabular`).

Signals: knn distance and ratio, Gaussian (Mahalanobis) density of the standardised features, flow negative
log-likelihood and its typicality, and with labels SNGP variance, 1 - max softmax, class-conditional
Gaussian densities of SNGP features (DDU) and of the inputs. Constant columns of the training split are
left out of every model (and recorded in the manifest).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from oodserve.bundle.manifest import ClassifierSpec, InputSpec, Provenance
from oodserve.models.build.calibrate import (
    BundleDescription,
    Calibrated,
    CalibrationSets,
    FusionSearch,
    calibrate_and_write,
    fresh_staging,
    publish_staging,
)
from oodserve.models.build.onnx_outputs import OnnxModels
from oodserve.models.build.signals import code_version, fit_signals
from oodserve.models.closed_form import fit_vector_reference, vector_reference_model
from oodserve.models.data import VectorSet
from oodserve.models.fit.budget import Budget
from oodserve.models.fit.cross_conformal import CROSS_CONFORMAL_BELOW, fit_vectors_cross_conformal
from oodserve.models.fit.summary import FitResult, closing_rows, figure_text
from oodserve.models.fit.vector_signals import FLOAT32_LIMIT, KNN_NEIGHBOURS, MAX_REFERENCE_ROWS, constant_columns, vector_signal_plans
from oodserve.models.fit.work import WorkDirectory, data_fingerprint
from oodserve.models.flows.tabular import build_tabular_flow, export_tabular_flow, train_tabular_flow
from oodserve.models.perturbations import make_perturbed_vectors
from oodserve.models.sngp.tabular import TabularSNGP, export_tabular_sngp, train_tabular_sngp, width_for
from oodserve.models.splits import DataSplit, fit_split

logger = logging.getLogger("oodserve.fit")

def fit_vectors(
    data: VectorSet, out: Path, *, name: str, minutes: float, seed: int = 0, work: Path | None = None, default_alpha: float = 0.05,
    delta: float | None = None,
) -> FitResult:
    """Fit a bundle for `data` into `out` (replaced only once the new bundle is complete) within `minutes`; below
    `CROSS_CONFORMAL_BELOW` rows the bundle is calibrated cross-conformally (`oodserve.models.fit.cross_conformal`).
    `delta`: the calibration-conditional guarantee (split calibration only)."""
    features, labels = data.features, data.labels
    count, dimensions = features.shape
    if count < CROSS_CONFORMAL_BELOW and delta is not None:
        raise ValueError(f"{data.source}: --guarantee conditional needs split calibration, which takes at least {CROSS_CONFORMAL_BELOW} "
                         f"rows; {count} rows are calibrated cross-conformally, with the marginal (CV+) guarantee only")
    if count < CROSS_CONFORMAL_BELOW:
        return fit_vectors_cross_conformal(data, out, name=name, minutes=minutes, seed=seed, default_alpha=default_alpha)
    budget = Budget(minutes * 60.0)
    split = fit_split(count, seed, labels)
    constant = constant_columns(features[split.train])
    kept = np.setdiff1d(np.arange(dimensions), constant)
    if kept.size == 0:
        raise ValueError(f"{data.source}: every column is constant on the training split; nothing to learn")
    if constant.size:
        logger.warning("dropping %d constant columns: %s", constant.size, [data.feature_names[i] for i in constant][:20])
    has_flow, has_classifier = kept.size >= 2, labels is not None
    work_directory = WorkDirectory(work or out.with_name(out.name + ".work"),
                                   data_fingerprint(features, labels, seed=seed, kind="vectors"))
    staging = fresh_staging(out)
    rng = np.random.default_rng(seed)
    train = features[split.train]
    with budget.timed("reference"):
        reference = fit_vector_reference(train, kept, MAX_REFERENCE_ROWS, KNN_NEIGHBOURS, rng)
        onnx.save_model(vector_reference_model(reference, dimensions), staging / "reference.onnx")
    standardized = (features[:, kept] - reference.mean) / reference.scale
    weights = {"flow": 0.6 if has_classifier else 1.0} if has_flow else {}
    if has_classifier:
        weights["sngp"] = 0.4 if has_flow else 1.0
    budget.plan(weights)
    figures: dict[str, dict[str, Any]] = {"reference": {"reference_rows": int(len(reference.reference)), "k": reference.k}}
    if has_flow:
        figures["flow"] = _flow_stage(work_directory, budget, standardized, split, reference, kept, dimensions, staging, seed)
    if labels is not None and data.class_names is not None:
        budget.plan({"sngp": weights["sngp"]}, keep=budget.planned)  # what an early-stopped flow left over
        figures["sngp"] = _sngp_stage(work_directory, budget, standardized, labels, len(data.class_names), split,
                                      reference, kept, dimensions, staging, seed)
    with budget.timed("calibration and fusion"):
        manifest = _calibrate_and_write(data, staging, split, kept, constant, has_flow, has_classifier, figures, budget,
                                        name=name, seed=seed, default_alpha=default_alpha, delta=delta)
    publish_staging(staging, out)
    return FitResult(out, _summary(data, split, manifest, figures, budget, constant), manifest)


def _flow_stage(work: WorkDirectory, budget: Budget, standardized: np.ndarray, split: DataSplit, reference: Any,
                kept: np.ndarray, dimensions: int, staging: Path, seed: int) -> dict[str, Any]:
    checkpoint = work.file("flow.pt")
    with budget.timed("flow"):
        if work.done("flow"):
            state = torch.load(checkpoint, weights_only=False)
            flow = build_tabular_flow(state["config"])
            flow.load_state_dict(state["weights"])
            flow.eval()
            info = work.info("flow")
        else:
            fit = train_tabular_flow(standardized[split.train], standardized[split.validation], budget.seconds_for("flow"), seed=seed)
            flow = fit.flow
            torch.save({"config": flow.config, "weights": flow.state_dict()}, checkpoint)
            info = {"validation_nll_per_dim": fit.validation_nll_per_dim, "epochs": fit.epochs, "steps": fit.steps,
                    "seconds": fit.seconds, "parameters": sum(p.numel() for p in flow.parameters()), **flow.config}
            work.finish("flow", info)
        export_tabular_flow(flow, kept, reference.mean, reference.scale, dimensions, staging / "flow.onnx")
    return info


def _sngp_stage(work: WorkDirectory, budget: Budget, standardized: np.ndarray, labels: np.ndarray, classes: int, split: DataSplit,
                reference: Any, kept: np.ndarray, dimensions: int, staging: Path, seed: int) -> dict[str, Any]:
    checkpoint = work.file("sngp.pt")
    with budget.timed("sngp"):
        if work.done("sngp"):
            info = work.info("sngp")
            model = TabularSNGP(len(kept), classes, width_for(len(kept)), depth=3, seed=seed)
            model.load_state_dict(torch.load(checkpoint, weights_only=False))
            model.eval()
        else:
            fit = train_tabular_sngp(standardized[split.train], labels[split.train], standardized[split.validation],
                                     labels[split.validation], classes, budget.seconds_for("sngp"), seed=seed)
            model = fit.model
            torch.save(model.state_dict(), checkpoint)
            info = {"validation_accuracy": fit.validation_accuracy, "epochs": fit.epochs, "seconds": fit.seconds,
                    "width": width_for(len(kept)), "classes": classes}
            work.finish("sngp", info)
        export_tabular_sngp(model, kept, reference.mean, reference.scale, dimensions, staging / "sngp.onnx")
    return info


def _calibrate_and_write(
    data: VectorSet, staging: Path, split: DataSplit, kept: np.ndarray, constant: np.ndarray, has_flow: bool, has_classifier: bool,
    figures: dict[str, dict[str, Any]], budget: Budget, *, name: str, seed: int, default_alpha: float, delta: float | None,
) -> dict[str, Any]:
    """Fit the signals on the training split, calibrate them, choose the fusion on self-made perturbations of the
    validation rows and write the bundle into `staging` (`oodserve.models.build.calibrate`). Returns the manifest as JSON."""
    model_files = {model: staging / f"{model}.onnx" for model in ("reference", "flow", "sngp") if (staging / f"{model}.onnx").exists()}
    models = OnnxModels(model_files, threads=2, batch_size=2048)
    features, labels = data.features, data.labels
    fitted = fit_signals(vector_signal_plans(has_flow, has_classifier), models.outputs(features[split.train], "reference (train split)"),
                         features[split.train], labels[split.train] if labels is not None else None)
    search = FusionSearch(
        validation=features[split.validation], perturb=lambda validation: make_perturbed_vectors(validation, seed), what="validation rows"
    )
    minimum_alpha = split.minimum_alpha

    def describe(calibrated: Calibrated) -> BundleDescription:
        return BundleDescription(
            name=name,
            version="1.0.0",
            description=f"oodserve fit of {Path(data.source).name}: {len(features)} vectors of {features.shape[1]} features"
            + (f", {len(data.class_names or [])} classes" if has_classifier else ", unlabelled"),
            input=InputSpec(shape=[features.shape[1]], dtype="float32", min=-FLOAT32_LIMIT, max=FLOAT32_LIMIT, layout="features",
                            features=list(data.feature_names)),
            labels=list(data.class_names) if has_classifier and data.class_names is not None else None,
            models=models.specs(),
            classifier=ClassifierSpec(model="sngp", logits="logits") if has_classifier else None,
            default_alpha=max(default_alpha, minimum_alpha),
            provenance=Provenance(
                data=f"{data.source}: {len(features)} rows x {features.shape[1]} columns",
                seed=seed,
                code_version=code_version(),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                builder="oodserve fit (models/fit/vectors.py)",
                splits=split.sizes(),
                minimum_alpha=minimum_alpha,
                constant_columns_dropped=[data.feature_names[index] for index in constant],
                training=figures,
                budget_seconds=budget.total_seconds,
                fusion_candidates_top5=calibrated.top_candidates(),
            ),
        )

    sets = CalibrationSets(signal=features[split.signal_calibration], fusion=features[split.fusion_calibration])
    return calibrate_and_write(staging, models, fitted, sets, search, describe, delta).model_dump(mode="json")


def _summary(data: VectorSet, split: DataSplit, manifest: dict[str, Any], figures: dict[str, dict[str, Any]], budget: Budget,
             constant: np.ndarray) -> list[tuple[str, str]]:
    count, dimensions = data.features.shape
    rows = [("data", f"{data.source}: {count} vectors x {dimensions} features, "
                     + (f"{len(data.class_names or [])} classes" if data.labels is not None else "no labels"))]
    if constant.size:
        rows.append(("dropped", f"{constant.size} constant columns: {[data.feature_names[i] for i in constant][:10]}"))
    rows.append(("splits", ", ".join(f"{key} {value}" for key, value in split.sizes().items())))
    rows += [(f"model {model}", figure_text(info)) for model, info in figures.items()]
    return rows + closing_rows(manifest, split.minimum_alpha, budget)
