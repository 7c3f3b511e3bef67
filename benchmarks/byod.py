"""Bring-your-own-data benchmark for vector bundles: `oodserve fit` on data sets made here, scored through
the serving engine, next to PyOD detectors fitted on the same rows (`--peers`).

    .venv/bin/python -m benchmarks.byod --peers [--minutes 2] [--sets digits_holdout_0,...] [--out FILE.json]

Per data set: the inliers are split 70/30 (seeded); `oodserve fit` gets the 70% (it splits them again
into train / validation / calibration itself), and each peer (PyOD KNN, LOF, IForest, ECOD, OCSVM with
default settings, on features standardised with the same 70%) is fitted on all of the same 70%. Both are
scored on the held-out 30% of inliers against the set's OOD rows: AUROC of the continuous score (oodserve:
the fused statistic), and oodserve's verdict false-positive rate at alpha 0.05 on the held-out inliers with
its Clopper-Pearson 95% interval.

Data sets (nothing downloaded): scikit-learn's bundled digits and breast cancer with a class held out;
Fashion-MNIST SNGP embeddings of the shipped bundle against MNIST embeddings and with a held-out class;
Fashion-MNIST pixels pooled to 7x7 against MNIST. scikit-learn's wine (178 rows) and iris (150) are below
the 200 rows `oodserve fit` requires and are left out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import orjson

from oodserve.engine import Engine
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, VectorSet, load_images
from oodserve.models.evaluation.metrics import auroc, clopper_pearson
from oodserve.models.fit.vectors import fit_vectors

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
SHIPPED_SNGP = Path(__file__).resolve().parents[1] / "models" / "bundles" / "fashion-mnist" / "sngp.onnx"
PEERS = ("KNN", "LOF", "IForest", "ECOD", "OCSVM")
SetType = TypeVar("SetType")


@dataclass(frozen=True)
class VectorBenchmarkSet:
    """Inlier features (N, D) with optional labels, and OOD features (M, D)."""

    name: str
    inliers: np.ndarray
    labels: np.ndarray | None
    ood: np.ndarray
    description: str


def _sklearn_holdout(loader: Callable[..., object], held_out: int, labelled: bool, name: str) -> VectorBenchmarkSet:
    bunch = loader()
    features, targets = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)  # type: ignore[attr-defined]
    inside = targets != held_out
    labels = np.unique(targets[inside], return_inverse=True)[1] if labelled else None
    return VectorBenchmarkSet(name, features[inside], labels, features[~inside], f"class {held_out} held out as OOD")


def _embeddings(images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(SHIPPED_SNGP), providers=["CPUExecutionProvider"])
    chunks = [session.run(["features"], {"x": images[start : start + 1000, None].astype(np.float32)})[0]
              for start in range(0, len(images), 1000)]
    return np.concatenate(chunks).astype(np.float64)


def _pooled(images: np.ndarray, factor: int = 4) -> np.ndarray:
    count, height, width = images.shape
    return images.reshape(count, height // factor, factor, width // factor, factor).mean(axis=(2, 4)).reshape(count, -1)


def benchmark_sets(names: list[str] | None = None) -> list[VectorBenchmarkSet]:
    """The vector data sets this machine can make (the image-derived ones need the Debian and shared data)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    makers: dict[str, Callable[[], VectorBenchmarkSet]] = {
        "digits_holdout_0": lambda: _sklearn_holdout(load_digits, 0, True, "digits_holdout_0"),
        "digits_holdout_7": lambda: _sklearn_holdout(load_digits, 7, True, "digits_holdout_7"),
        "breast_cancer_benign": lambda: _sklearn_holdout(load_breast_cancer, 0, False, "breast_cancer_benign"),
        "breast_cancer_malignant": lambda: _sklearn_holdout(load_breast_cancer, 1, False, "breast_cancer_malignant"),
    }
    if (DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() and MNIST_DIR.exists():
        def fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            fashion_test = load_images(DEFAULT_FASHION_MNIST_DIR, "test")
            return fashion_test.images, np.asarray(fashion_test.labels), load_images(MNIST_DIR, "test").images

        def embeddings_vs_mnist() -> VectorBenchmarkSet:
            images, labels, mnist = fashion()
            return VectorBenchmarkSet("fmnist_embeddings_vs_mnist", _embeddings(images), labels, _embeddings(mnist[:3000]),
                                      "SNGP features (128-d) of the shipped bundle: Fashion-MNIST test vs MNIST test")

        def embeddings_holdout() -> VectorBenchmarkSet:
            images, labels, _ = fashion()
            features, inside = _embeddings(images), labels != 6
            relabelled = np.unique(labels[inside], return_inverse=True)[1]
            return VectorBenchmarkSet("fmnist_embeddings_holdout_shirt", features[inside], relabelled, features[~inside],
                                      "SNGP features of Fashion-MNIST, class 6 (shirt) held out")

        def pixels_vs_mnist() -> VectorBenchmarkSet:
            images, _, mnist = fashion()
            return VectorBenchmarkSet("fmnist_pixels7x7_vs_mnist", _pooled(images), None, _pooled(mnist[:3000]),
                                      "Fashion-MNIST pixels average-pooled to 7x7 (49 features) vs MNIST, unlabelled")

        makers.update({"fmnist_embeddings_vs_mnist": embeddings_vs_mnist, "fmnist_embeddings_holdout_shirt": embeddings_holdout,
                       "fmnist_pixels7x7_vs_mnist": pixels_vs_mnist})
    return make_chosen(makers, names)


def make_chosen(makers: dict[str, Callable[[], SetType]], names: list[str] | None) -> list[SetType]:
    """Make the named sets (all by default); SystemExit naming the unknown ones and what is available."""
    chosen = names or list(makers)
    unknown = sorted(set(chosen) - set(makers))
    if unknown:
        raise SystemExit(f"unknown or unavailable sets {unknown}; available: {sorted(makers)}")
    return [makers[name]() for name in chosen]


@dataclass
class SetResult:
    name: str
    description: str
    rows: int
    features: int
    labelled: bool
    test_inliers: int
    ood_rows: int
    oodserve_auroc: float
    fpr_at_005: float
    fpr_interval: tuple[float, float]
    calibration_rows: int
    fusion: str
    fit_seconds: float
    peers: dict[str, float]
    signal_aurocs: dict[str, float]
    """AUROC of each signal alone (through its conformal p-value): what the fusion chose from."""


def score_with_engine(bundle: Path, features: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(fused statistic, is_ood, every signal's p-value) of every row through the serving engine, in batches of 256."""

    engine = Engine.load(bundle)
    scores, verdicts, p_values = [], [], []
    for start in range(0, len(features), 256):
        batch = engine.score(features[start : start + 256].astype(np.float32), alpha)
        scores.append(batch.fused_score)
        verdicts.append(batch.is_ood)
        p_values.append(batch.p_values)
    return np.concatenate(scores), np.concatenate(verdicts), {name: np.concatenate([p[name] for p in p_values]) for name in p_values[0]}


def peer_aurocs(train: np.ndarray, test: np.ndarray, ood: np.ndarray, seed: int) -> dict[str, float]:
    """AUROC of each PyOD detector (default settings) fitted on standardised training rows."""
    from pyod.models.ecod import ECOD
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN
    from pyod.models.lof import LOF
    from pyod.models.ocsvm import OCSVM

    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def standardise(values: np.ndarray) -> np.ndarray:
        return (values - mean) / std

    detectors = {"KNN": KNN(), "LOF": LOF(), "IForest": IForest(random_state=seed), "ECOD": ECOD(), "OCSVM": OCSVM()}
    results = {}
    scored = standardise(np.concatenate([test, ood]))  # one call: ECOD ranks the rows it is given among themselves
    for name, detector in detectors.items():
        detector.fit(standardise(train))
        scores = detector.decision_function(scored)
        results[name] = auroc(scores[: len(test)], scores[len(test) :])
    return results


def run_set(data: VectorBenchmarkSet, minutes: float, peers: bool, seed: int, work: Path) -> SetResult:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.inliers))
    cut = int(round(0.7 * len(order)))
    fit_rows, test_rows = np.sort(order[:cut]), np.sort(order[cut:])
    names = [f"f{index}" for index in range(data.inliers.shape[1])]
    labels = data.labels[fit_rows] if data.labels is not None else None
    class_names = [str(label) for label in np.unique(data.labels)] if data.labels is not None else None
    started = time.monotonic()
    result = fit_vectors(VectorSet(data.inliers[fit_rows], names, labels, class_names, data.name), work / data.name,
                         name=data.name.replace("_", "-"), minutes=minutes, seed=seed, work=work / f"{data.name}.work")
    seconds = time.monotonic() - started
    inside_scores, inside_verdicts, inside_p = score_with_engine(result.bundle, data.inliers[test_rows])
    ood_scores, _, ood_p = score_with_engine(result.bundle, data.ood)
    # a smaller p-value is more OOD; ties in p-values (finite calibration) are left to AUROC's half credit
    signal_aurocs = {name: auroc(-inside_p[name], -ood_p[name]) for name in inside_p}
    false_positives = int(inside_verdicts.sum())
    peer_results = peer_aurocs(data.inliers[fit_rows], data.inliers[test_rows], data.ood, seed) if peers else {}
    return SetResult(
        data.name, data.description, len(data.inliers), data.inliers.shape[1], data.labels is not None, len(test_rows), len(data.ood),
        auroc(inside_scores, ood_scores), false_positives / len(test_rows), clopper_pearson(false_positives, len(test_rows)),
        result.manifest["provenance"]["splits"]["fusion_calibration"],
        f"{result.manifest['fusion']['method']} {result.manifest['fusion']['signals']}", seconds, peer_results, signal_aurocs,
    )


def format_results(results: list[SetResult], minutes: float) -> str:
    peers = [name for name in PEERS if any(name in result.peers for result in results)]
    header = ["set", "rows x D", "labels", "oodserve AUROC", *peers, "FPR@0.05 [95% CI]", "fit s", "fusion"]
    lines = []
    for result in results:
        low, high = result.fpr_interval
        lines.append([
            result.name, f"{result.rows} x {result.features}", "yes" if result.labelled else "no", f"{result.oodserve_auroc:.4f}",
            *(f"{result.peers[name]:.4f}" for name in peers), f"{result.fpr_at_005:.3f} [{low:.3f}, {high:.3f}]",
            f"{result.fit_seconds:.0f}", result.fusion,
        ])
    means = ["mean", "", "", f"{np.mean([r.oodserve_auroc for r in results]):.4f}",
             *(f"{np.mean([r.peers[name] for r in results]):.4f}" for name in peers), "", "", ""]
    lines.append(means)
    widths = [max(len(header[column]), *(len(line[column]) for line in lines)) for column in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    title = f"oodserve fit (--minutes {minutes:g}) vs PyOD defaults on standardised features; AUROC of held-out inliers vs OOD"
    return "\n".join([title, render(header), render(["-" * width for width in widths]), *(render(line) for line in lines)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="budget of each oodserve fit")
    parser.add_argument("--peers", action="store_true", help="also fit the PyOD detectors on the same rows")
    parser.add_argument("--sets", default="", help="comma-separated set names (default: all available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    arguments = parser.parse_args()
    names = [name for name in arguments.sets.split(",") if name] or None
    results = []
    with tempfile.TemporaryDirectory() as work:
        for data in benchmark_sets(names):
            results.append(run_set(data, arguments.minutes, arguments.peers, arguments.seed, Path(work)))
            peers = " ".join(f"{k} {v:.4f}" for k, v in results[-1].peers.items())
            signals = " ".join(f"{k} {v:.4f}" for k, v in results[-1].signal_aurocs.items())
            print(f"{data.name}: oodserve {results[-1].oodserve_auroc:.4f} {peers}\n  signals alone: {signals}", flush=True)
    table = format_results(results, arguments.minutes)
    print(table)
    if arguments.out is not None:
        arguments.out.write_bytes(orjson.dumps({"minutes": arguments.minutes, "results": [asdict(r) for r in results], "table": table},
                                               option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


if __name__ == "__main__":
    main()
