"""`oodserve fit` for small vector sets: K-fold cross-conformal calibration instead of separate splits.

Below `CROSS_CONFORMAL_BELOW` rows, holding out 15% + 15% of the rows for calibration leaves too few of either (at
1,000 rows the fused statistic would be calibrated on 150 rows: the smallest alpha is 1/151 and the realised
false-positive rate at alpha 0.05 of one bundle has a standard deviation of 0.018, over a third of alpha). Here
every row trains and calibrates (Vovk 2015; Barber et al. 2021; Hennhöfer and Preisach 2024):

- the rows are split into K = `FOLDS` folds (stratified by label when there are labels);
- fold k's models see only the other K - 1 folds, and so does the standardisation of each signal inside the fold:
  its reference is the signal on those training rows themselves (the k-NN signals leave each row out of its own
  neighbours; a network trains on 80% of them and stops early on the rest). Training every fold on the same rows in
  the same way keeps the K score functions alike, which is what keeps CV+ near alpha;
- fold k's own rows are scored by fold k's models: per signal (`__held_out__.<signal>.fold<k>`) and fused
  (`__fused__.fold<k>`);
- the fusion is fixed before any data is seen, Fisher's combination of every signal (Fisher 1932), so no row is used
  twice to choose it;
- a new input is scored by every fold's models; its p-value counts the held-out statistics at or above its own in each
  fold: p = (1 + sum_k #{C_k >= T_k(x)}) / (n + 1) (`oodserve.scoring.cross_conformal`).

The guarantee is the CV+ one: P(p <= alpha) <= 2 alpha + O(K/n) in the worst case, and about alpha in practice when
the fold models are stable; `benchmarks/fpr_audit.py` measures it. The smallest alpha is 1/(n + 1).

The floor is `MIN_ROWS` = 30: with n rows no p-value falls below 1/(n + 1), so alpha 0.05 needs n >= 20 before any
input can be flagged at all; at 30 rows every fold model still trains on 24 rows, enough for k = 5 neighbours and a
Gaussian, while a flow or SNGP needs `NETWORK_MIN_TRAIN` training rows per fold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from oodserve.bundle.calibration import FUSED_CALIBRATION_KEY, HELD_OUT_PREFIX, fold_name
from oodserve.bundle.manifest import CalibrationSpec, ClassifierSpec, FusionSpec, InputSpec, ModelSpec, Provenance
from oodserve.models.build.calibrate import BundleDescription, fresh_staging, publish_staging, write_described_bundle
from oodserve.models.build.onnx_outputs import OnnxModels
from oodserve.models.build.signals import CALIBRATION_FILE, SignalPlan, code_version, fit_signals
from oodserve.models.closed_form import fit_vector_reference, vector_reference_leave_one_out, vector_reference_model
from oodserve.models.data import MIN_VECTOR_ROWS as MIN_ROWS
from oodserve.models.data import VectorSet
from oodserve.models.fit.budget import Budget
from oodserve.models.fit.summary import FitResult, figure_text
from oodserve.models.fit.vector_signals import (
    FLOAT32_LIMIT,
    KNN_NEIGHBOURS,
    MAX_REFERENCE_ROWS,
    constant_columns,
    vector_signal_plans,
)
from oodserve.models.flows.tabular import export_tabular_flow, train_tabular_flow
from oodserve.models.sngp.tabular import export_tabular_sngp, train_tabular_sngp
from oodserve.scoring.cross_conformal import worst_case_rate
from oodserve.scoring.pipeline import FusionRule, compute_signals, fold_statistic

logger = logging.getLogger("oodserve.fit")

CROSS_CONFORMAL_BELOW = 1000
"""Vector sets with fewer rows are calibrated cross-conformally."""
FOLDS = 5
NETWORK_MIN_TRAIN = 200
"""Training rows every fold needs before it trains a flow (and, with labels, SNGP)."""
EARLY_STOPPING_SHARE = 0.2


@dataclass(frozen=True)
class FoldRows:
    """Index arrays of one fold: `train` (every row of the other folds), `early_stopping` (a seeded share of them that
    stops a network's training and that the networks do not train on) and `held_out` (the fold's own rows)."""

    train: np.ndarray
    early_stopping: np.ndarray
    held_out: np.ndarray

    @property
    def network_train(self) -> np.ndarray:
        return np.setdiff1d(self.train, self.early_stopping)


def fold_rows(count: int, folds: int, seed: int, labels: np.ndarray | None = None) -> list[FoldRows]:
    """A seeded K-fold partition of range(count), stratified by `labels` (N,) when given; inside each fold's
    complement a seeded `EARLY_STOPPING_SHARE` (at least 5 rows) stops the networks early."""
    if count < MIN_ROWS:
        raise ValueError(f"{count} rows are too few: cross-conformal calibration needs at least {MIN_ROWS}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    if labels is not None:  # deal each class's rows round the folds in turn
        order = np.concatenate([order[labels[order] == label] for label in np.unique(labels)])
    assignment = np.empty(count, dtype=np.int64)
    assignment[order] = np.arange(count) % folds
    result = []
    for fold in range(folds):
        rest = np.flatnonzero(assignment != fold)
        stop = rng.choice(rest, size=max(5, int(round(EARLY_STOPPING_SHARE * len(rest)))), replace=False)
        result.append(FoldRows(rest, np.sort(stop), np.flatnonzero(assignment == fold)))
    return result


def guarantee_statement(rows: int, folds: int, alpha: float = 0.05) -> str:
    """The cross-conformal guarantee in words."""
    return (f"cross-conformal, {folds} folds over {rows} rows (Barber et al. 2021, CV+): the false-positive rate at alpha is "
            f"at most 2 alpha + {worst_case_rate(0.0, rows, folds):.3f} in the worst case (at alpha {alpha:g}: "
            f"{worst_case_rate(alpha, rows, folds):.3f}) and about alpha in practice; the smallest alpha is 1/{rows + 1}")


def fit_vectors_cross_conformal(
    data: VectorSet, out: Path, *, name: str, minutes: float, seed: int = 0, default_alpha: float = 0.05,
) -> FitResult:
    """Fit a cross-conformal bundle for `data` (N < `CROSS_CONFORMAL_BELOW` rows) into `out` within `minutes`."""
    budget = Budget(minutes * 60.0)
    features, labels = data.features, data.labels
    count, dimensions = features.shape
    folds = fold_rows(count, FOLDS, seed, labels)
    smallest_train = min(len(fold.network_train) for fold in folds)
    constant = constant_columns(features)
    if constant.size == dimensions:
        raise ValueError(f"{data.source}: every column is constant; nothing to learn")
    has_flow = dimensions - constant.size >= 2 and smallest_train >= NETWORK_MIN_TRAIN
    has_classifier = labels is not None and data.class_names is not None and smallest_train >= NETWORK_MIN_TRAIN
    plans = vector_signal_plans(has_flow, has_classifier)
    if labels is not None and not has_classifier and _every_class_has(labels, folds, 3):  # small classes share a covariance
        plans.append(SignalPlan("class_gaussian_density", "feature_density", "reference", "standardized",
                                {"parameters_file": "class_gaussians.npz", "shared_covariance": True}))
    staging = fresh_staging(out)
    budget.plan({"networks": 1.0} if has_flow or has_classifier else {})
    network_seconds = budget.seconds_for("networks") / FOLDS if has_flow or has_classifier else 0.0
    calibration: dict[str, np.ndarray] = {}
    signal_entries: list[dict[str, Any]] = []
    parameter_files: dict[str, dict[str, np.ndarray]] = {}
    model_specs: dict[str, ModelSpec] = {}
    figures: dict[str, dict[str, Any]] = {}
    rule = FusionRule("fisher", tuple(plan.name for plan in plans))
    for index, rows in enumerate(folds):
        with budget.timed(f"fold {index}"):
            fold = _fit_fold(data, rows, index, plans, staging, has_flow, has_classifier, network_seconds, seed, rule)
        calibration.update(fold.calibration)
        signal_entries += fold.entries
        parameter_files.update(fold.parameter_files)
        model_specs.update(fold.models)
        figures[f"fold{index}"] = fold.figures
    statement = guarantee_statement(count, FOLDS)
    minimum_alpha = 1.0 / (count + 1)
    fusion = FusionSpec(method="fisher", signals=list(rule.signals),
                        reason=f"Fisher over every signal, fixed before any data was seen: with {count} rows no row is spent on "
                               "choosing the fusion, and none is used twice")
    description = BundleDescription(
        name=name,
        version="1.0.0",
        description=f"oodserve fit of {Path(data.source).name}: {count} vectors of {dimensions} features, cross-conformal "
                    f"({FOLDS} folds)" + (f", {len(data.class_names or [])} classes" if labels is not None else ", unlabelled"),
        input=InputSpec(shape=[dimensions], dtype="float32", min=-FLOAT32_LIMIT, max=FLOAT32_LIMIT, layout="features",
                        features=list(data.feature_names)),
        labels=list(data.class_names) if has_classifier and data.class_names is not None else None,
        models=model_specs,
        classifier=ClassifierSpec(model=fold_name("sngp", 0), logits="logits") if has_classifier else None,
        default_alpha=default_alpha if default_alpha > minimum_alpha else min(0.5, 2.0 * minimum_alpha),
        provenance=Provenance(
            data=f"{data.source}: {count} rows x {dimensions} columns", seed=seed, code_version=code_version(),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            builder="oodserve fit (models/fit/cross_conformal.py)",
            folds={f"fold{index}": {"train": len(rows.train), "early_stopping": len(rows.early_stopping), "held_out": len(rows.held_out)}
                   for index, rows in enumerate(folds)},
            minimum_alpha=minimum_alpha, training=figures, budget_seconds=budget.total_seconds,
        ),
    )
    spec = CalibrationSpec(file=CALIBRATION_FILE, method="cross_conformal", folds=FOLDS, statement=statement,
                           minimum_alpha=minimum_alpha)
    manifest = write_described_bundle(staging, description, signal_entries, parameter_files, calibration, spec, fusion)
    publish_staging(staging, out)
    rows_text = [
        ("data", f"{data.source}: {count} vectors x {dimensions} features, "
                 + (f"{len(data.class_names or [])} classes" if labels is not None else "no labels")),
        ("method", statement),
        ("folds", f"{FOLDS} folds; each fold's models train on {min(len(f.train) for f in folds)}-{max(len(f.train) for f in folds)} "
                  f"rows (its networks on {smallest_train}, stopped early on the rest), and every one of the {count} rows calibrates"),
        ("small data costs", _cost_text(count, has_flow, has_classifier, labels is not None)),
        ("fusion", f"fisher over {list(rule.signals)} (fixed: no rows spent choosing it)"),
        ("alpha", f"default {manifest.default_alpha:g}; minimum supported {minimum_alpha:.4f} (1 / (rows + 1))"),
        ("budget", budget.split_text()),
    ]
    return FitResult(out, rows_text, manifest.model_dump(mode="json"))


def _every_class_has(labels: np.ndarray, folds: list[FoldRows], least: int) -> bool:
    return all(np.min(np.bincount(labels[rows.train], minlength=int(labels.max()) + 1)) >= least for rows in folds)


def _cost_text(count: int, has_flow: bool, has_classifier: bool, labelled: bool) -> str:
    parts = [f"no alpha at or below 1/{count + 1} can flag anything",
             f"the worst-case false-positive rate is about twice alpha (CV+), {FOLDS} models score every input"]
    if not has_flow:
        parts.append(f"no flow (needs {NETWORK_MIN_TRAIN} training rows per fold)")
    if labelled and not has_classifier:
        parts.append(f"no SNGP classifier (needs {NETWORK_MIN_TRAIN} training rows per fold)")
    return "; ".join(parts)


@dataclass(frozen=True)
class FittedFold:
    calibration: dict[str, np.ndarray]
    entries: list[dict[str, Any]]
    parameter_files: dict[str, dict[str, np.ndarray]]
    models: dict[str, ModelSpec]
    figures: dict[str, Any]


def _fit_fold(data: VectorSet, rows: FoldRows, index: int, plans: list[SignalPlan], staging: Path, has_flow: bool,
              has_classifier: bool, network_seconds: float, seed: int, rule: FusionRule) -> FittedFold:
    """Fold `index`'s models (files `<model>.fold<k>.onnx`), signals, standardising and held-out scores."""
    features, labels = data.features, data.labels
    dimensions = features.shape[1]
    train = features[rows.train]
    kept = np.setdiff1d(np.arange(dimensions), constant_columns(train))
    if kept.size == 0:
        kept = np.arange(dimensions)
    reference = fit_vector_reference(train, kept, MAX_REFERENCE_ROWS, KNN_NEIGHBOURS, np.random.default_rng([seed, index]))
    files = {"reference": staging / f"{fold_name('reference', index)}.onnx"}
    onnx.save_model(vector_reference_model(reference, dimensions), files["reference"])
    figures: dict[str, Any] = {"train": len(rows.train), "reference_rows": len(reference.reference), "k": reference.k}
    standardize = (features[:, kept] - reference.mean) / reference.scale
    network_train, stop = rows.network_train, rows.early_stopping
    if has_flow:
        fit = train_tabular_flow(standardize[network_train], standardize[stop], network_seconds, seed=seed + index,
                                 description=f"flow fold {index}")
        files["flow"] = staging / f"{fold_name('flow', index)}.onnx"
        export_tabular_flow(fit.flow, kept, reference.mean, reference.scale, dimensions, files["flow"])
        figures["flow_validation_nll_per_dim"] = fit.validation_nll_per_dim
    if has_classifier and labels is not None and data.class_names is not None:
        sngp = train_tabular_sngp(standardize[network_train], labels[network_train], standardize[stop], labels[stop],
                                  len(data.class_names), network_seconds, seed=seed + index, description=f"sngp fold {index}")
        files["sngp"] = staging / f"{fold_name('sngp', index)}.onnx"
        export_tabular_sngp(sngp.model, kept, reference.mean, reference.scale, dimensions, files["sngp"])
        figures["sngp_validation_accuracy"] = sngp.validation_accuracy
    models = OnnxModels(files, threads=2, batch_size=2048)
    train_outputs = models.outputs(train, f"fold {index} train")
    fitted = fit_signals(plans, train_outputs, train, labels[rows.train] if labels is not None else None)
    if len(reference.reference) == len(train):  # every training row is a neighbour: leave each out of its own
        train_outputs["reference"].update(vector_reference_leave_one_out(reference))
    standardising = compute_signals(fitted.definitions, train_outputs, train)
    held_out = compute_signals(fitted.definitions, models.outputs(features[rows.held_out], f"fold {index} held out"),
                               features[rows.held_out])
    standardising = {name: np.sort(values) for name, values in standardising.items()}
    fused = fold_statistic(rule, {name: name for name in rule.signals}, held_out, standardising)
    renamed_files = {name: fold_name(name.removesuffix(".npz"), index) + ".npz" for name in fitted.parameter_files}
    entries = []
    for entry in fitted.manifest_entries:
        params = dict(entry["params"])
        if "parameters_file" in params:
            params["parameters_file"] = renamed_files[params["parameters_file"]]
        entries.append({**entry, "name": fold_name(entry["name"], index), "model": fold_name(entry["model"], index), "params": params})
    calibration = {fold_name(name, index): values for name, values in standardising.items()}
    calibration |= {HELD_OUT_PREFIX + fold_name(name, index): values for name, values in held_out.items()}
    calibration[fold_name(FUSED_CALIBRATION_KEY, index)] = fused
    specs = {fold_name(name, index): spec for name, spec in models.specs().items()}
    figures["fold"] = figure_text({"held_out": len(rows.held_out), "early_stopping": len(rows.early_stopping)})
    return FittedFold(calibration, entries, {renamed_files[name]: arrays for name, arrays in fitted.parameter_files.items()},
                      specs, figures)
