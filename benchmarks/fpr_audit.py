"""The false-positive-rate audit of `oodserve fit` for vectors: is the verdict's FPR at alpha what the manifest says?

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.fpr_audit [--sets a,b] [--splits 100] [--minutes 0.05] [--out DIR]
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.fpr_audit --refits 100 --sets synthetic_mixture_2000

Splits mode (default). Per set and per split s (seeded by s): the inliers are permuted; `fit` rows go to `fit_vectors`
(which splits them again, or calibrates cross-conformally below 1,000 rows), the rest are held-out inliers scored
through the serving engine. Synthetic sets draw fresh fit rows and 20,000 fresh held-out rows every split instead: the
guarantee is an average over draws of the data, so permuting one fixed sample would measure the rate of that sample
only (an unlucky fixed draw of 100 rows read 0.067 at alpha 0.05 over 100 permutations). The realised FPR of the split
is the share of held-out inliers with p < alpha, at alpha 0.05 and 0.01. Over the splits: the mean FPR with its 95%
interval (mean +- 1.96 standard errors over splits: the splits are independent draws of everything, calibration
included), the share of splits above alpha, and for split calibration the calibration-conditional verdict (Bates et
al. 2023, delta 0.1) computed from the same p-values with the band a `--guarantee conditional` bundle would store
(`oodserve.models.build.conditional.conditional_band`): its share of splits above alpha must stay below delta (up to
the held-out set's own binomial noise, which the synthetic sets make small with 20,000 held-out rows), and its
detection rate on the set's OOD rows shows the price.

Refits mode (`--refits N`): one fixed split of the set (fit rows and held-out rows fixed), N fits with seeds 0..N-1
(so only the fit's own internal split and training change). The mean FPR should sit at or below the Beta mean of
the conformal p-value, #{c : (1 + c)/(m + 1) < alpha} / (m + 1) with m calibration rows: the expected FPR of p < alpha
when the calibration rows are exchangeable with the held-out rows. With the data fixed this is a check, not a theorem:
the average over refits is conditional on the one fit sample and the one held-out set (whose own binomial noise,
sqrt(alpha (1 - alpha) / held-out), the interval over refits does not include; the summary gives it as `held-out sd`).

The sets (nothing downloaded): synthetic Gaussian mixtures (large and small), scikit-learn's digits (class 0 held
out), breast cancer (benign inliers), wine (class 0 held out), digits subsampled to 150 rows, and, when the Debian
Fashion-MNIST package and shared MNIST are here, the SNGP embeddings of the shipped bundle (Fashion-MNIST test vs MNIST;
fitted label-free so that 100 fits fit in the session: the labelled path is audited on digits).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
from tqdm import tqdm

from benchmarks.byod import MNIST_DIR, _embeddings, _sklearn_holdout, make_chosen
from oodserve.engine import Engine
from oodserve.models.build.conditional import conditional_band
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, VectorSet, load_images
from oodserve.models.evaluation.metrics import auroc
from oodserve.models.fit.vectors import fit_vectors

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = (0.05, 0.01)
DELTA = 0.1


@dataclass(frozen=True)
class AuditSet:
    """Inliers (N, D) with optional labels, OOD rows (M, D) for the power figures, and how many inliers fit."""

    name: str
    inliers: np.ndarray
    labels: np.ndarray | None
    ood: np.ndarray
    fit_rows: int
    held_out_rows: int | None = None
    """Cap on the held-out inliers scored per split (None: all the rest)."""
    sampler: Callable[[np.random.Generator, int], np.ndarray] | None = None
    """For synthetic sets: draws fresh inliers, so the held-out set can be large."""


def _mixture(rng: np.random.Generator, count: int, dimensions: int = 8) -> np.ndarray:
    centres = np.random.default_rng(1234).normal(0.0, 3.0, size=(4, dimensions))
    which = rng.integers(0, 4, size=count)
    return centres[which] + rng.normal(size=(count, dimensions)) * (0.5 + 0.5 * which[:, None] / 3.0)


def _synthetic(name: str, fit_rows: int) -> AuditSet:
    rng = np.random.default_rng(99)
    ood = _mixture(rng, 2000) * 1.0 + rng.normal(0.0, 2.5, size=(2000, 8))
    return AuditSet(name, _mixture(rng, fit_rows), None, ood, fit_rows, 20000, sampler=_mixture)


def _holdout(loader: Callable[..., object], held_out: int, name: str, fit_rows: int, labelled: bool) -> AuditSet:
    """A scikit-learn set with class `held_out` as the OOD rows (`benchmarks.byod._sklearn_holdout`), `fit_rows` fitting."""
    data = _sklearn_holdout(loader, held_out, labelled, name)
    return AuditSet(name, data.inliers, data.labels, data.ood, fit_rows)


def audit_sets(names: list[str] | None) -> list[AuditSet]:
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine

    makers: dict[str, Callable[[], AuditSet]] = {
        "synthetic_mixture_2000": lambda: _synthetic("synthetic_mixture_2000", 2000),
        "synthetic_mixture_100": lambda: _synthetic("synthetic_mixture_100", 100),
        "digits_holdout_0": lambda: _holdout(load_digits, 0, "digits_holdout_0", 1200, True),
        "digits_holdout_0_150": lambda: _holdout(load_digits, 0, "digits_holdout_0_150", 150, False),
        "breast_cancer_benign": lambda: _holdout(load_breast_cancer, 0, "breast_cancer_benign", 200, False),
        "wine_holdout_0": lambda: _holdout(load_wine, 0, "wine_holdout_0", 80, True),
    }
    if (DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() and MNIST_DIR.exists():
        def embeddings() -> AuditSet:
            fashion = load_images(DEFAULT_FASHION_MNIST_DIR, "test")
            mnist = load_images(MNIST_DIR, "test").images[:2000]
            return AuditSet("fmnist_embeddings", _embeddings(fashion.images), None, _embeddings(mnist), 2000, 5000)

        makers["fmnist_embeddings"] = embeddings
    return make_chosen(makers, names)


@dataclass
class SplitOutcome:
    seed: int
    method: str
    calibration_rows: int
    held_out: int
    fpr: dict[str, float]
    conditional_fpr: dict[str, float] = field(default_factory=dict)
    detection: dict[str, float] = field(default_factory=dict)
    conditional_detection: dict[str, float] = field(default_factory=dict)
    auroc: float = float("nan")
    beta_mean: dict[str, float] = field(default_factory=dict)


def beta_mean(alpha: float, count: int) -> float:
    """Expected FPR of p < alpha for p = (1 + c) / (m + 1), c uniform on 0..m: #{c : (1 + c)/(m + 1) < alpha} / (m + 1)."""
    return float(np.sum((1.0 + np.arange(count + 1)) / (count + 1.0) < alpha) / (count + 1.0))


_BANDS: dict[int, np.ndarray] = {}


def _band(count: int) -> np.ndarray:
    if count not in _BANDS:
        _BANDS[count] = conditional_band(count, DELTA)
    return _BANDS[count]


def run_split(data: AuditSet, seed: int, minutes: float, work: Path, fit_seed: int | None = None) -> SplitOutcome:
    """Fit on a seeded draw of the inliers, score the held-out rest (or fresh draws) and the OOD rows."""
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(data.inliers))
    fit = order[: data.fit_rows]
    if data.sampler is not None:  # a fresh sample every split: the guarantee is over the draw of the data
        inliers = data.sampler(np.random.default_rng([seed, 5]), data.fit_rows)
        held_out = data.sampler(np.random.default_rng([seed, 11]), data.held_out_rows or 20000)
    else:  # a random split of a finite pool: the held-out rest is exchangeable with the fit rows
        inliers = data.inliers[fit]
        rest = order[data.fit_rows :]
        held_out = data.inliers[rest[: data.held_out_rows] if data.held_out_rows else rest]
    labels = data.labels[fit] if data.labels is not None else None
    class_names = [str(value) for value in range(int(data.labels.max()) + 1)] if data.labels is not None else None
    names = [f"f{index}" for index in range(data.inliers.shape[1])]
    result = fit_vectors(VectorSet(inliers, names, labels, class_names, data.name), work / "bundle", name="audit",
                         minutes=minutes, seed=seed if fit_seed is None else fit_seed, work=work / "bundle.work")
    engine = Engine.load(result.bundle)
    inside = engine.score(held_out.astype(np.float32))
    outside = engine.score(data.ood.astype(np.float32))
    calibration = engine.manifest.calibration
    count = int(engine.bundle.calibration.fused.size)
    outcome = SplitOutcome(seed, calibration.method, count, len(held_out),
                           fpr={str(alpha): float(np.mean(inside.fused_p_value < alpha)) for alpha in ALPHAS},
                           detection={str(alpha): float(np.mean(outside.fused_p_value < alpha)) for alpha in ALPHAS},
                           auroc=auroc(inside.fused_score, outside.fused_score),
                           beta_mean={str(alpha): beta_mean(alpha, count) for alpha in ALPHAS})
    if calibration.method == "split":
        band = _band(count)

        def conditional(p_values: np.ndarray) -> np.ndarray:
            return band[np.rint(p_values * (count + 1)).astype(np.int64) - 1]

        outcome.conditional_fpr = {str(alpha): float(np.mean(conditional(inside.fused_p_value) < alpha)) for alpha in ALPHAS}
        outcome.conditional_detection = {str(alpha): float(np.mean(conditional(outside.fused_p_value) < alpha)) for alpha in ALPHAS}
    return outcome


def summarise(name: str, outcomes: list[SplitOutcome], mode: str) -> dict[str, object]:
    """Mean FPR over splits with its 95% interval, shares above alpha, conditional figures, Beta means."""
    summary: dict[str, object] = {"set": name, "mode": mode, "splits": len(outcomes), "method": outcomes[0].method,
                                  "calibration_rows": int(np.median([o.calibration_rows for o in outcomes])),
                                  "held_out": int(np.median([o.held_out for o in outcomes])),
                                  "auroc": float(np.mean([o.auroc for o in outcomes]))}
    for alpha in map(str, ALPHAS):
        rates = np.array([o.fpr[alpha] for o in outcomes])
        half = 1.96 * rates.std(ddof=1) / np.sqrt(len(rates)) if len(rates) > 1 else float("nan")
        entry: dict[str, object] = {
            "mean_fpr": float(rates.mean()), "half_width": float(half), "share_above_alpha": float(np.mean(rates > float(alpha))),
            "sd_over_splits": float(rates.std(ddof=1)) if len(rates) > 1 else float("nan"),
            "beta_mean": float(np.mean([o.beta_mean[alpha] for o in outcomes])),
            "detection": float(np.mean([o.detection[alpha] for o in outcomes])),
            "held_out_sd": float(np.sqrt(float(alpha) * (1 - float(alpha)) / np.median([o.held_out for o in outcomes]))),
            "met": bool(rates.mean() <= float(alpha) + half),
        }
        if outcomes[0].conditional_fpr:
            conditional = np.array([o.conditional_fpr[alpha] for o in outcomes])
            entry |= {"conditional_mean_fpr": float(conditional.mean()),
                      "conditional_share_above_alpha": float(np.mean(conditional > float(alpha))),
                      "conditional_detection": float(np.mean([o.conditional_detection[alpha] for o in outcomes]))}
        summary[alpha] = entry
    return summary


def format_summaries(summaries: list[dict[str, object]]) -> str:
    lines = [f"{'set':<24} {'mode':<7} {'method':<15} {'splits':>6} {'m':>6} {'held':>6}  "
             "alpha  mean FPR [95% CI]           above  Beta mean  met   cond. FPR  cond. above  detect  cond. detect"]
    for summary in summaries:
        for alpha in map(str, ALPHAS):
            entry = summary[alpha]
            assert isinstance(entry, dict)
            low, high = entry["mean_fpr"] - entry["half_width"], entry["mean_fpr"] + entry["half_width"]
            conditional = (f"{entry['conditional_mean_fpr']:9.4f}  {entry['conditional_share_above_alpha']:11.2f}"
                           if "conditional_mean_fpr" in entry else f"{'-':>9}  {'-':>11}")
            conditional_detection = f"{entry['conditional_detection']:12.3f}" if "conditional_detection" in entry else f"{'-':>12}"
            head = (f"{summary['set']:<24} {summary['mode']:<7} {summary['method']:<15} {summary['splits']:>6} "
                    f"{summary['calibration_rows']:>6} {summary['held_out']:>6}")
            rates = f"{alpha:<5}  {entry['mean_fpr']:.4f} [{low:.4f}, {high:.4f}]  {entry['share_above_alpha']:5.2f}"
            verdict = f"{entry['beta_mean']:9.4f}  {'yes' if entry['met'] else 'NO':<4}"
            lines.append(f"{head}  {rates}  {verdict}  {conditional}  {entry['detection']:6.3f}  {conditional_detection}")
    return "\n".join(lines)


def format_markdown(summaries: list[dict[str, object]]) -> str:
    """The summary as the docs' table: one row per set and alpha."""
    header = ("| set | mode | method | runs | m | held-out | alpha | mean FPR [95% CI] | Beta mean | met "
              "| conditional FPR (share of runs above alpha) | detected: marginal / conditional | AUROC |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for summary in summaries:
        for alpha in map(str, ALPHAS):
            entry = summary[alpha]
            assert isinstance(entry, dict)
            half, mean = entry["half_width"], entry["mean_fpr"]
            conditional = (f"{entry['conditional_mean_fpr']:.4f} ({entry['conditional_share_above_alpha']:.2f})"
                           if "conditional_mean_fpr" in entry else "-")
            detected = f"{entry['detection']:.3f}"
            if "conditional_detection" in entry:
                detected += f" / {entry['conditional_detection']:.3f}"
            cells = [summary["set"], summary["mode"], summary["method"], summary["splits"], summary["calibration_rows"],
                     summary["held_out"], alpha, f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]", f"{entry['beta_mean']:.4f}",
                     "yes" if entry["met"] else "**no**", conditional, detected, f"{summary['auroc']:.3f}"]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=lambda text: [name for name in text.split(",") if name], default=None)
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--refits", type=int, default=0, help="refits mode: N fits on one fixed split")
    parser.add_argument("--minutes", type=float, default=0.05, help="fit budget (the guarantee does not depend on model quality)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fpr-audit")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "refits" if args.refits else "splits"
    summaries = []
    for data in audit_sets(args.sets):
        path = args.out / f"{data.name}-{mode}.json"
        done: list[SplitOutcome] = []
        if path.exists():  # resume
            done = [SplitOutcome(**row) for row in orjson.loads(path.read_bytes())["outcomes"]]
        total = args.refits or args.splits
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as scratch, tqdm(total=total, initial=len(done), desc=data.name, unit="fit") as progress:
            for index in range(len(done), total):
                seed, fit_seed = (0, index) if args.refits else (index, None)
                done.append(run_split(data, seed, args.minutes, Path(scratch) / str(index), fit_seed))
                progress.update(1)
                path.write_bytes(orjson.dumps({"set": data.name, "mode": mode, "outcomes": [asdict(o) for o in done]},
                                              option=orjson.OPT_SERIALIZE_NUMPY))
        summary = summarise(data.name, done, mode) | {"seconds": time.monotonic() - started}
        summaries.append(summary)
        print(format_summaries([summary]), flush=True)
    table = format_summaries(summaries)
    (args.out / f"summary-{mode}.txt").write_text(table + "\n")
    (args.out / f"summary-{mode}.json").write_bytes(orjson.dumps(summaries, option=orjson.OPT_INDENT_2))
    (args.out / f"summary-{mode}.md").write_text(format_markdown(summaries) + "\n")
    print(table)


if __name__ == "__main__":
    main()
