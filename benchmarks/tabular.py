"""Tabular quality of `oodserve fit` (issue 30): mean AUROC over many tables next to PyOD's detectors and the
per-set PyOD oracle (the best of KNN, LOF, IForest, ECOD, OCSVM on each set), in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.tabular [--sets a,b,...] [--splits N] [--minutes M] [--out FILE]
        [--study [--study-out FILE]] [--list]

Tables (nothing downloaded; `--list` prints them):
- scikit-learn's bundled sets with a class held out as OOD (novelty mode): digits (0, 7), breast cancer
  (benign, malignant), wine (class 0), iris (class 2), labelled;
- the other sets of `benchmarks.byod` (Fashion-MNIST SNGP embeddings and pooled pixels), where this machine has them;
- synthetic, unlabelled: `gmm_local` (clusters of very different spread, OOD rows just outside the tight
  ones: local-density detectors win), `skewed_heavy` (independent skewed and heavy-tailed columns, OOD rows
  extreme in two of them, often in the short left tail: per-feature tail detectors win), `swiss_roll`
  (inliers on a noisy 2-d manifold in 3-d, OOD uniform in its bounding box);
- small tables `<parent>_fit<n>`: n = 50, 100 or 150 fit rows drawn from a larger set, the held-out inliers
  and the OOD rows drawn from the rest (each capped at 1,000).

Per table and split (seed = --seed + split): the inliers are permuted; the first 70% (or n for a small
table) are the fit rows, the rest the held-out inliers. `fit_vectors` gets the fit rows (`--minutes` each)
and is scored through the serving engine (`benchmarks.byod.score_with_engine`); each PyOD detector is fitted
on the same rows, standardised as `benchmarks.byod.peer_aurocs` does. AUROC of held-out inliers vs OOD
(oodserve: the fused statistic), and oodserve's verdict FPR at alpha 0.05 on the held-out inliers. Per table
the mean over splits; the oracle is the best detector's split mean on each table.

ECOD: `peer_aurocs` scores held-out inliers and OOD rows in one `decision_function` call, and PyOD's ECOD
builds its tail probabilities from the training rows plus every row in the call, OOD included (transductive;
where OOD rows outnumber inliers they look typical: breast_cancer_malignant 0.39). The ECOD column and the
oracle use PyOD's ECOD as a service runs it, one row at a time (`ecod_scorer`, checked equal to PyOD's
`decision_function` of single rows to 1e-13); byod's batch figure is shown as `ECOD batch`, outside the oracle. A fit that raises (for
example below the rows `oodserve fit` accepts) is recorded as a refusal with the error text; the targets then
count as not met and are also shown on the tables oodserve scored.

`--study` (numpy and scikit-learn only, no product change) asks which extra signal a Fisher combination of
oodserve's signals should gain. For the same splits it takes the engine's per-signal p-values of the fused
signals and three extra scores fitted on the same fit rows: ECOD (`ecod_scorer`: per feature the larger
empirical tail's -log probability, summed), scikit-learn's IsolationForest and LocalOutlierFactor (novelty, on standardised
features). Extra scores become cross-conformal p-values over the fit rows (5 folds: each fold is set aside in
turn, the scorer fitted on the other four, the test score ranked among the set-aside rows' scores, counts
summed: p = (1 + #{held-out score >= s}) / (n + 1)). It reports the AUROC of Fisher's -2 sum log p over the
fused signals with and without each extra signal (and all three).

Run time on 2 cores with nothing else running: a full run (18 tables, 3 splits, 1-minute fits, --study) 9
minutes, most of it the Fashion-MNIST tables' fits (fits stop early; small tables take seconds); a quick pass
(`--splits 1 --minutes 0.3 --study`) 4 minutes.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.byod import PEERS, VectorBenchmarkSet, _sklearn_holdout, benchmark_sets, peer_aurocs, score_with_engine
from oodserve.models.data import VectorSet
from oodserve.models.evaluation.metrics import auroc, clopper_pearson
from oodserve.models.fit.vectors import fit_vectors

RESULTS = Path(__file__).resolve().parent / "results"
FIT_FRACTION = 0.7
HELD_OUT_CAP = 1000
ALPHA = 0.05
STUDY_FOLDS = 5
EXTRAS = ("ECOD", "IForest", "LOF")
ECOD_BATCH = "ECOD batch"
LARGE_FIT_ROWS = 1000
"""The study splits its gains at this many fit rows (where `oodserve fit` switches to cross-conformal calibration)."""
BYOD_SETS = ("digits_holdout_0", "digits_holdout_7", "breast_cancer_benign", "breast_cancer_malignant",
             "fmnist_embeddings_vs_mnist", "fmnist_embeddings_holdout_shirt", "fmnist_pixels7x7_vs_mnist")
SMALL_SETS = (("digits_holdout_0", 50), ("skewed_heavy", 50), ("breast_cancer_benign", 100), ("fmnist_pixels7x7_vs_mnist", 100),
              ("gmm_local", 150), ("swiss_roll", 150))


@dataclass(frozen=True)
class Table:
    """A benchmark set and how many inliers are fit rows (None: 70% of them)."""

    data: VectorBenchmarkSet
    fit_rows: int | None = None


# ------------------------------------------------------------------------------------------------- tables


def gmm_local(seed: int = 11) -> VectorBenchmarkSet:
    """Four 6-d Gaussian clusters, two tight (std 0.25) and two broad (std 2, 3); OOD rows sit 4.5-8 tight stds
    from a tight cluster's centre, where the global density is still that of the broad clusters' inliers."""
    rng = np.random.default_rng(seed)
    dimensions, scales, sizes = 6, np.array([0.25, 0.25, 2.0, 3.0]), [600, 600, 500, 300]
    centres = rng.uniform(-10.0, 10.0, (4, dimensions))
    inliers = np.concatenate([centre + scale * rng.standard_normal((size, dimensions))
                              for centre, scale, size in zip(centres, scales, sizes)])
    count = 300
    which = rng.integers(0, 2, count)
    directions = rng.standard_normal((count, dimensions))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    ood = centres[which] + directions * (scales[which] * rng.uniform(4.5, 8.0, count))[:, None]
    return VectorBenchmarkSet("gmm_local", inliers, None, ood, "4 clusters of spread 0.25-3 in 6-d, OOD just outside the tight ones")


def skewed_heavy(seed: int = 12) -> VectorBenchmarkSet:
    """Ten independent columns (3 log-normal, 2 exponential, 3 Student t with 2 dof, 2 Pareto); OOD rows are
    inlier draws with two columns moved to a marginal quantile in (0.0001, 0.003) or (0.997, 0.9999)."""
    rng = np.random.default_rng(seed)

    def draw(count: int) -> np.ndarray:
        return np.column_stack([rng.lognormal(0.0, 1.0, (count, 3)), rng.exponential(1.0, (count, 2)),
                                rng.standard_t(2.0, (count, 3)), rng.pareto(3.0, (count, 2))])

    inliers, ood = draw(2000), draw(300)
    reference = draw(200_000)
    for row in ood:
        for column in rng.choice(row.size, 2, replace=False):
            level = rng.uniform(0.0001, 0.003) if rng.random() < 0.5 else rng.uniform(0.997, 0.9999)
            row[column] = np.quantile(reference[:, column], level)
    return VectorBenchmarkSet("skewed_heavy", inliers, None, ood, "10 skewed/heavy-tailed columns, OOD extreme in 2 columns")


def swiss_roll(seed: int = 13) -> VectorBenchmarkSet:
    """scikit-learn's swiss roll (noise 0.5) against rows uniform in its bounding box."""
    from sklearn.datasets import make_swiss_roll

    inliers = make_swiss_roll(2000, noise=0.5, random_state=seed)[0]
    rng = np.random.default_rng(seed)
    ood = rng.uniform(inliers.min(axis=0), inliers.max(axis=0), (400, 3))
    return VectorBenchmarkSet("swiss_roll", inliers, None, ood, "noisy swiss roll in 3-d vs uniform in its bounding box")


@functools.cache
def base_set(name: str) -> VectorBenchmarkSet | None:
    """A full-size set by name (None where this machine cannot make it)."""
    from sklearn.datasets import load_iris, load_wine

    local: dict[str, Callable[[], VectorBenchmarkSet]] = {
        "wine_holdout_0": lambda: _sklearn_holdout(load_wine, 0, True, "wine_holdout_0"),
        "iris_holdout_2": lambda: _sklearn_holdout(load_iris, 2, True, "iris_holdout_2"),
        "gmm_local": gmm_local, "skewed_heavy": skewed_heavy, "swiss_roll": swiss_roll,
    }
    if name in local:
        return local[name]()
    try:
        return benchmark_sets([name])[0]
    except SystemExit:  # byod's "unknown or unavailable"
        return None


def table_names() -> list[str]:
    return [*BYOD_SETS, "wine_holdout_0", "iris_holdout_2", "gmm_local", "skewed_heavy", "swiss_roll",
            *(f"{parent}_fit{rows}" for parent, rows in SMALL_SETS)]


def make_table(name: str) -> Table | None:
    for parent, rows in SMALL_SETS:
        if name == f"{parent}_fit{rows}":
            data = base_set(parent)
            if data is None:
                return None
            small = VectorBenchmarkSet(name, data.inliers, data.labels, data.ood, f"{rows} fit rows of {parent}: {data.description}")
            return Table(small, rows)
    data = base_set(name)
    return None if data is None else Table(data)


# ------------------------------------------------------------------------------------------------- one split


@dataclass
class SplitResult:
    seed: int
    fit_rows: int
    test_inliers: int
    ood_rows: int
    peers: dict[str, float]
    peer_seconds: float
    oodserve_auroc: float | None = None
    false_positives: int | None = None
    fpr_at_005: float | None = None
    fit_seconds: float | None = None
    splits: dict[str, int] | None = None
    minimum_alpha: float | None = None
    fusion: str | None = None
    signal_aurocs: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    study: dict[str, Any] | None = None


def split_rows(table: Table, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit row indices, held-out inlier indices, OOD row indices) of a split."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table.data.inliers))
    ood = np.arange(len(table.data.ood))
    if table.fit_rows is None:
        cut = int(round(FIT_FRACTION * len(order)))
        return np.sort(order[:cut]), np.sort(order[cut:]), ood
    if len(ood) > HELD_OUT_CAP:
        ood = np.sort(rng.choice(ood, HELD_OUT_CAP, replace=False))
    return np.sort(order[: table.fit_rows]), np.sort(order[table.fit_rows : table.fit_rows + HELD_OUT_CAP]), ood


def run_split(table: Table, seed: int, minutes: float, work: Path, study: bool) -> SplitResult:
    data = table.data
    fit_index, test_index, ood_index = split_rows(table, seed)
    fit, test, ood = data.inliers[fit_index], data.inliers[test_index], data.ood[ood_index]
    started = time.monotonic()
    peers = peer_aurocs(fit, test, ood, seed)
    # byod scores ECOD on held-out inliers and OOD in one call, where PyOD ranks each row among the training rows
    # AND all the others, OOD included; the oracle uses ECOD as a service would run it, one row at a time
    peers[ECOD_BATCH] = peers.pop("ECOD")
    mean, std = fit.mean(axis=0), fit.std(axis=0)  # the standardisation of peer_aurocs (ECOD is invariant to it)
    std = np.where(std > 0, std, 1.0)
    ecod = ecod_scorer((fit - mean) / std)
    peers["ECOD"] = auroc(ecod((test - mean) / std), ecod((ood - mean) / std))
    result = SplitResult(seed, len(fit), len(test), len(ood), peers, time.monotonic() - started)
    labels = data.labels[fit_index] if data.labels is not None else None
    class_names = [str(label) for label in np.unique(labels)] if labels is not None else None
    if labels is not None:  # a small draw may miss a class: keep the labels dense
        labels = np.unique(labels, return_inverse=True)[1]
    names = [f"f{index}" for index in range(data.inliers.shape[1])]
    started = time.monotonic()
    try:
        fitted = fit_vectors(VectorSet(fit, names, labels, class_names, data.name), work / f"{data.name}-{seed}",
                             name=data.name.replace("_", "-"), minutes=minutes, seed=seed, work=work / f"{data.name}-{seed}.work")
        result.fit_seconds = time.monotonic() - started
        inside, verdicts, inside_p = score_with_engine(fitted.bundle, test, ALPHA)
        outside, _, outside_p = score_with_engine(fitted.bundle, ood, ALPHA)
    except Exception as error:  # a refusal (or a product failure) is a result row, not a crash
        result.fit_seconds = time.monotonic() - started
        result.error = f"{type(error).__name__}: {error}"
        return result
    provenance, fusion = fitted.manifest.get("provenance", {}), fitted.manifest.get("fusion", {})
    result.oodserve_auroc = auroc(inside, outside)
    result.false_positives = int(verdicts.sum())
    result.fpr_at_005 = result.false_positives / len(test)
    result.splits = provenance.get("splits")
    result.minimum_alpha = provenance.get("minimum_alpha")
    result.fusion = f"{fusion.get('method')} {fusion.get('signals')}"
    result.signal_aurocs = {name: auroc(-inside_p[name], -outside_p[name]) for name in inside_p}
    if study:
        fused_signals = [name for name in fusion.get("signals", []) if name in inside_p] or list(inside_p)
        result.study = fisher_study(fit, test, ood, {name: inside_p[name] for name in fused_signals},
                                    {name: outside_p[name] for name in fused_signals}, seed)
        result.study["fused"] = result.oodserve_auroc
    return result


# ------------------------------------------------------------------------------------------------- study


def ecod_scorer(train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """PyOD's ECOD (3.x) score of rows scored one at a time, in numpy: per column the empirical left tail
    P(X <= x) and right tail P(X >= x) over the training rows and the row itself, and the sum over columns of
    the larger of -log left and -log right (PyOD's skew-side tail is one of the two, so never larger)."""
    count = len(train)
    columns = np.sort(train, axis=0)

    def score(rows: np.ndarray) -> np.ndarray:
        below = np.column_stack([np.searchsorted(columns[:, j], rows[:, j], side="right") for j in range(rows.shape[1])])
        above = count - np.column_stack([np.searchsorted(columns[:, j], rows[:, j], side="left") for j in range(rows.shape[1])])
        return np.maximum(-np.log((below + 1.0) / (count + 1.0)), -np.log((above + 1.0) / (count + 1.0))).sum(axis=1)

    return score


def extra_scorers(train: np.ndarray, seed: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The extra scores (higher = more OOD) fitted on `train`."""
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor

    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    standardised = (train - mean) / std
    forest = IsolationForest(random_state=seed).fit(standardised)
    lof = LocalOutlierFactor(n_neighbors=min(20, len(train) - 1), novelty=True).fit(standardised)
    return {"ECOD": ecod_scorer(train),
            "IForest": lambda rows: -forest.score_samples((rows - mean) / std),
            "LOF": lambda rows: -lof.score_samples((rows - mean) / std)}


def cross_conformal_p_values(fit: np.ndarray, rows: np.ndarray, seed: int, folds: int = STUDY_FOLDS) -> dict[str, np.ndarray]:
    """Cross-conformal p-values of `rows` for each extra score: each of `folds` parts of the fit rows is set aside
    in turn, the scorer fitted on the others; p = (1 + #{set-aside score >= row score, over all folds}) / (n + 1)."""
    parts = np.array_split(np.random.default_rng(seed).permutation(len(fit)), folds)
    counts = {name: np.zeros(len(rows)) for name in EXTRAS}
    for part in parts:
        scorers = extra_scorers(fit[np.setdiff1d(np.arange(len(fit)), part)], seed)
        for name, scorer in scorers.items():
            held_out = np.sort(scorer(fit[part]))
            counts[name] += len(held_out) - np.searchsorted(held_out, scorer(rows), side="left")
    return {name: (1.0 + count) / (len(fit) + 1.0) for name, count in counts.items()}


def fisher(p_values: list[np.ndarray]) -> np.ndarray:
    """Fisher's statistic -2 sum log p (higher = more OOD)."""
    return -2.0 * np.sum(np.log(np.clip(np.stack(p_values), 1e-300, 1.0)), axis=0)


def fisher_study(fit: np.ndarray, test: np.ndarray, ood: np.ndarray, inside_p: dict[str, np.ndarray],
                 outside_p: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """AUROC of Fisher over oodserve's fused signals, alone and with each extra signal (and all three)."""
    extra = cross_conformal_p_values(fit, np.concatenate([test, ood]), seed)
    extra_in = {name: p[: len(test)] for name, p in extra.items()}
    extra_out = {name: p[len(test) :] for name, p in extra.items()}
    base_in, base_out = list(inside_p.values()), list(outside_p.values())
    combined = {"fisher": auroc(fisher(base_in), fisher(base_out))}
    for name in EXTRAS:
        combined[f"+{name}"] = auroc(fisher([*base_in, extra_in[name]]), fisher([*base_out, extra_out[name]]))
    combined["+all"] = auroc(fisher([*base_in, *extra_in.values()]), fisher([*base_out, *extra_out.values()]))
    return {"signals": list(inside_p), "combined": combined,
            "alone": {name: auroc(-extra_in[name], -extra_out[name]) for name in EXTRAS}}


# ------------------------------------------------------------------------------------------------- summary


def _mean(values: list[float | None]) -> float | None:
    kept = [value for value in values if value is not None]
    return float(np.mean(kept)) if kept else None


def summarise(table: Table, splits: list[SplitResult]) -> dict[str, Any]:
    data = table.data
    peers = {name: float(np.mean([split.peers[name] for split in splits])) for name in (*PEERS, ECOD_BATCH)}
    oracle = max(PEERS, key=peers.__getitem__)
    scored = [split for split in splits if split.error is None]
    tested = sum(split.test_inliers for split in scored)
    false_positives = sum(split.false_positives or 0 for split in scored)
    return {
        "name": data.name, "description": data.description, "inliers": len(data.inliers), "features": data.inliers.shape[1],
        "labelled": data.labels is not None, "fit_rows": splits[0].fit_rows, "test_inliers": splits[0].test_inliers,
        "ood_rows": splits[0].ood_rows, "oodserve_auroc": _mean([split.oodserve_auroc for split in splits]),
        "oodserve_splits": len(scored), "refused": [split.error for split in splits if split.error is not None],
        "fpr_at_005": false_positives / tested if tested else None,
        "fpr_interval": clopper_pearson(false_positives, tested) if tested else None,
        "fit_seconds": _mean([split.fit_seconds for split in splits]), "peers": peers,
        "oracle": peers[oracle], "oracle_detector": oracle, "splits": [asdict(split) for split in splits],
    }


def targets(sets: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean AUROCs and the two targets of issue 30, on every table (refusals: not met) and on the tables scored."""

    def evaluate(chosen: list[dict[str, Any]]) -> dict[str, Any]:
        means = {name: float(np.mean([entry["peers"][name] for entry in chosen])) for name in PEERS}
        best = max(means, key=means.__getitem__)
        ours = float(np.mean([entry["oodserve_auroc"] for entry in chosen]))
        oracle = float(np.mean([entry["oracle"] for entry in chosen]))
        return {"tables": len(chosen), "oodserve": ours, "peers": means, "best_single": best, "best_single_mean": means[best],
                "ecod_batch": float(np.mean([entry["peers"][ECOD_BATCH] for entry in chosen])),
                "oracle": oracle, "vs_best_single_plus_0.005": ours >= means[best] + 0.005, "vs_oracle": ours >= oracle}

    complete = [entry for entry in sets if not entry["refused"]]
    scored = [entry for entry in sets if entry["oodserve_auroc"] is not None]
    summary: dict[str, Any] = {"tables": len(sets), "refused_tables": [entry["name"] for entry in sets if entry["refused"]]}
    if len(complete) == len(sets):
        summary["all"] = evaluate(sets)
    elif scored:
        summary["scored_only"] = evaluate(scored)
    return summary


def _render(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(header[column]), *(len(line[column]) for line in lines)) for column in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return [render(header), render(["-" * width for width in widths]), *(render(line) for line in lines)]


def _number(value: float | None) -> str:
    return "refused" if value is None else f"{value:.4f}"


def format_table(sets: list[dict[str, Any]], summary: dict[str, Any], minutes: float, splits: int) -> str:
    header = ["set", "fit x D", "oodserve", *PEERS, "oracle", ECOD_BATCH, "FPR@0.05 [95% CI]", "fit s", "note"]
    lines = []
    for entry in sets:
        interval = entry["fpr_interval"]
        fpr = "" if interval is None else f"{entry['fpr_at_005']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
        note = "" if not entry["refused"] else f"{len(entry['refused'])}/{len(entry['splits'])} refused: {entry['refused'][0][:90]}"
        lines.append([entry["name"], f"{entry['fit_rows']} x {entry['features']}", _number(entry["oodserve_auroc"]),
                      *(f"{entry['peers'][name]:.4f}" for name in PEERS), f"{entry['oracle']:.4f} {entry['oracle_detector']}",
                      f"{entry['peers'][ECOD_BATCH]:.4f}", fpr, f"{entry['fit_seconds']:.0f}", note])
    evaluated = summary.get("all") or summary.get("scored_only")
    if evaluated is not None:
        label = "mean" + ("" if "all" in summary else f" ({evaluated['tables']} scored)")
        lines.append([label, "", f"{evaluated['oodserve']:.4f}", *(f"{evaluated['peers'][name]:.4f}" for name in PEERS),
                      f"{evaluated['oracle']:.4f}", f"{evaluated['ecod_batch']:.4f}", "", "", ""])
    text = [f"oodserve fit (--minutes {minutes:g}) vs PyOD defaults, mean AUROC over {splits} split(s) of held-out inliers vs OOD",
            *_render(header, lines), ""]
    if summary["refused_tables"]:
        text.append(f"oodserve refused on {len(summary['refused_tables'])} of {summary['tables']} tables "
                    f"({', '.join(summary['refused_tables'])}): both targets NOT MET on all tables")
    if evaluated is not None:
        where = "all tables" if "all" in summary else f"the {evaluated['tables']} tables oodserve scored"
        met = {True: "met", False: "NOT MET"}
        text += [
            f"target 1 ({where}): oodserve mean {evaluated['oodserve']:.4f} vs best single PyOD ({evaluated['best_single']}) "
            f"{evaluated['best_single_mean']:.4f} + 0.005 = {evaluated['best_single_mean'] + 0.005:.4f}: "
            f"{met[evaluated['vs_best_single_plus_0.005']]}",
            f"target 2 ({where}): oodserve mean {evaluated['oodserve']:.4f} vs per-set oracle mean {evaluated['oracle']:.4f}: "
            f"{met[evaluated['vs_oracle']]}",
        ]
    return "\n".join(text)


def format_study(sets: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Per table the split means of the Fisher AUROCs, their means, and which extra signal earns its place
    (largest mean gain, counted only when it is at least 0.002 and it does not lose more than 0.01 on any table)."""
    columns = ["fused", "fisher", *(f"+{name}" for name in EXTRAS), "+all"]
    rows, per_set = [], {}
    for entry in sets:
        studies = [split["study"] for split in entry["splits"] if split.get("study")]
        if not studies:
            continue
        values = {"fused": float(np.mean([study["fused"] for study in studies]))}
        values |= {column: float(np.mean([study["combined"][column] for study in studies])) for column in columns[1:]}
        values |= {f"{name} alone": float(np.mean([study["alone"][name] for study in studies])) for name in EXTRAS}
        per_set[entry["name"]] = values
        rows.append([entry["name"], *(f"{value:.4f}" for value in values.values())])
    if not per_set:
        return "study: no table was scored by oodserve", {}
    keys = list(next(iter(per_set.values())))
    means = {key: float(np.mean([values[key] for values in per_set.values()])) for key in keys}
    rows.append(["mean", *(f"{means[key]:.4f}" for key in keys)])
    fit_rows = {entry["name"]: entry["fit_rows"] for entry in sets}
    large = np.array([fit_rows[name] >= LARGE_FIT_ROWS for name in per_set])
    gains: dict[str, dict[str, Any]] = {}
    for name in EXTRAS:
        deltas = np.array([values[f"+{name}"] - values["fisher"] for values in per_set.values()])
        gains[name] = {"mean_gain": float(deltas.mean()), "tables_up": int((deltas > 0).sum()), "tables_down": int((deltas < 0).sum()),
                       "worst": float(deltas.min()),
                       "mean_gain_large": float(deltas[large].mean()) if large.any() else None,
                       "mean_gain_small": float(deltas[~large].mean()) if (~large).any() else None}
    earning = [name for name, gain in gains.items() if gain["mean_gain"] >= 0.002 and gain["worst"] >= -0.01]
    winner = max(earning, key=lambda name: gains[name]["mean_gain"]) if earning else None
    text = ["Fisher study: AUROC of -2 sum log p over oodserve's fused signals ('fisher'), with each extra signal's "
            f"{STUDY_FOLDS}-fold cross-conformal p-value added, and the product's fused statistic ('fused'); split means",
            *_render(["set", *keys], rows), ""]
    for name, gain in gains.items():
        parts = [f"{gain[key]:+.4f} on the {int(count)} tables {where} {LARGE_FIT_ROWS} fit rows"
                 for key, count, where in (("mean_gain_large", large.sum(), "with >="), ("mean_gain_small", (~large).sum(), "below"))
                 if gain[key] is not None]
        text.append(f"+{name}: mean gain {gain['mean_gain']:+.4f} (up on {gain['tables_up']}, down on {gain['tables_down']} of "
                    f"{len(per_set)} tables, worst {gain['worst']:+.4f}; " + ", ".join(parts) + ")")
    text.append(f"earns its place (mean gain >= 0.002, no table down by more than 0.01): {winner or 'none'}")
    return "\n".join(text), {"per_set": per_set, "means": means, "gains": gains, "earns_its_place": winner}


# ------------------------------------------------------------------------------------------------- main


def product_version() -> str:
    """Where `fit_vectors` came from and, in a git checkout, its commit and whether the product files are modified."""
    import subprocess

    where = Path(fit_vectors.__code__.co_filename).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "models", "service"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{where} (not a git checkout)"
    return f"{where} at {commit}" + (f" with {len(changed.splitlines())} product files modified" if changed else "")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", default=[], help="table names, space- or comma-separated (default: all available)")
    parser.add_argument("--splits", type=int, default=3, help="seeded splits per table")
    parser.add_argument("--minutes", type=float, default=1.0, help="budget of each oodserve fit")
    parser.add_argument("--seed", type=int, default=0, help="the first split's seed")
    parser.add_argument("--out", type=Path, default=RESULTS / "tabular.json", help="JSON results (the table goes beside it as .txt)")
    parser.add_argument("--study", action="store_true", help="also run the Fisher extra-signal study")
    parser.add_argument("--study-out", type=Path, default=RESULTS / "tabular-study.txt", help="the study's text output")
    parser.add_argument("--list", action="store_true", help="print the table names and exit")
    arguments = parser.parse_args()
    if arguments.list:
        print("\n".join(table_names()))
        return
    names = [name for value in arguments.sets for name in value.split(",") if name] or table_names()
    unknown = sorted(set(names) - set(table_names()))
    if unknown:
        raise SystemExit(f"unknown tables {unknown}; known: {table_names()}")
    started = time.monotonic()
    sets, skipped = [], []
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            table = make_table(name)
            if table is None:
                skipped.append(name)
                print(f"{name}: not available on this machine, skipped", flush=True)
                continue
            splits = []
            for split in range(arguments.splits):
                result = run_split(table, arguments.seed + split, arguments.minutes, Path(work), arguments.study)
                splits.append(result)
                peers = " ".join(f"{key} {value:.4f}" for key, value in result.peers.items())
                ours = result.error or f"{result.oodserve_auroc:.4f} (fit {result.fit_seconds:.0f} s)"
                print(f"{name} seed {result.seed} ({result.fit_rows} fit rows): oodserve {ours} | {peers}", flush=True)
            sets.append(summarise(table, splits))
    summary = targets(sets)
    seconds = time.monotonic() - started
    table_text = format_table(sets, summary, arguments.minutes, arguments.splits) + f"\nproduct: {product_version()}"
    print(table_text)
    print(f"wall time {seconds / 60:.1f} min")
    report: dict[str, Any] = {"minutes": arguments.minutes, "splits": arguments.splits, "seed": arguments.seed, "seconds": seconds,
                              "product": product_version(),
                              "skipped": skipped, "summary": summary, "sets": sets, "table": table_text}
    if arguments.study:
        study_text, study = format_study(sets)
        print(study_text)
        report["study"] = study
        arguments.study_out.parent.mkdir(parents=True, exist_ok=True)
        arguments.study_out.write_text(f"benchmarks.tabular --study (--splits {arguments.splits} --minutes {arguments.minutes:g}); "
                                       f"product: {product_version()}\n" + study_text + "\n")
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    arguments.out.with_suffix(".txt").write_text(table_text + f"\nwall time {seconds / 60:.1f} min\n")


if __name__ == "__main__":
    main()
