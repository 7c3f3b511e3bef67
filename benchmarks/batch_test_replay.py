"""False alarms of the shipped bundle's batch typicality test on data exchangeable with its reference values, replayed
over many random batches, next to the Fashion-MNIST test file and MNIST (power).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.batch_test_replay [--batches 20000] [--scores-cache runs/replay-bpd.npz]

What is exchangeable with the reference: `models/bundles/fashion-mnist/batch_typicality.npz` holds `reference_bpd`, the
flow's bits/dim of the *fusion-calibration half* of the 10,000 calibration images of `oodserve.models.splits.bundle_split(60000,
seed=0)`, in the order the builder of the manifest's code_version (15729aa, models/bundle_builder/bundle.py) drew them:
one `default_rng(0)` first picks the 10,000 train-split images the signal parameters are fitted on, then permutes the
calibration indices and halves them (first half: signals, second: fusion = reference). Today's builder
(models/fit/images.py) would take `bundle_split`'s own halves instead, which differ: about half of today's
`signal_calibration` are reference images. This script reproduces the shipped halves, rescores the fusion half and refuses
to go on unless it gives the stored values in order. The entropy H of the statistic |mean(bpd) - H| is the mean bits/dim
of those 10,000 *train-split* images: a constant fixed before any held-out image is looked at, so it does not touch
validity. Two held-out sets of the training file were never trained on and are not reference values:
- `validation` (2,000): used only to early-stop and pick `best.pt` of each trainer and to choose the fusion rule;
- `signal_calibration` (5,000, the shipped first half): the per-signal conformal scores, not the batch test's.
Both come from the one seeded permutation of the training file that drew the reference, so they are exchangeable with it.

Replay: every set is scored once through `Engine.load(...).score` (1 onnxruntime thread); batches of M are then cut
from the scored bits/dim and passed to the engine's `BatchTypicalityTest.test` (the function `Engine.batch_test` calls).
Batches of a finite pool overlap if drawn freely; here each *partition* is a random permutation of the pool cut into
floor(n / M) disjoint batches, and many partitions are replayed. Within a partition the verdicts are independent given
the reference (i.i.d. pool); across partitions they share images, so the Clopper-Pearson interval over all replayed
batches (`ci_all_batches`) is too narrow. The reported `ci` is the exact interval for ONE partition's worth of batches
(n = floor(n_pool / M)) at the rate averaged over all partitions: each partition's count is Binomial(n, q), and the
average of identically distributed counts varies no more than one of them, so this interval is conservative.

The conformal guarantee P(p <= alpha) <= alpha is marginal over the draw of the reference. With the reference fixed (as
served), the false-alarm rate q is itself random across reference draws: with K = floor(5000 / M) reference batches, a
test batch is flagged when c = #{T_k >= T} <= j = ceil(alpha (K + 1)) - 2, so q ~ Beta(j + 1, K - j) under exact
exchangeability. `reference_band` gives its 2.5% / 97.5% quantiles: a rate inside the band is what a valid test with
this many reference batches can show for one reference draw. Results: benchmarks/results/batch-test-replay.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.hybrid_iresnet import MNIST_DIR
from oodserve.engine import Engine
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.splits import DataSplit, bundle_split
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.scoring.batch_typicality import BatchTypicalityTest
from oodserve.stats import beta_quantile, clopper_pearson

BUNDLE = Path("models/bundles/fashion-mnist")
BATCH_SIZES = (10, 100)
ALPHAS = (0.05, 0.01)
SCORE_BATCH = 256
REFERENCE_SIZE = 10000
"""Train-split images the shipped builder drew (first, from the same generator) to fit the signal parameters and H."""
CLAIM = {"set": "fashion_mnist_test", "batch_size": 10, "alpha": 0.05, "batches": 300, "rate": 0.093}
"""The measurement this replay checks: 300 batches of 10 of the test file, 0.093 flagged at alpha 0.05 (28 of 300)."""


def score_bits_per_dim(engine: Engine, images: np.ndarray) -> np.ndarray:
    """The batch test's signal (bits/dim) of uint8 images (N, H, W) through the serving engine, in batches of 256."""
    signal = engine.manifest.batch_typicality.signal
    parts = [
        engine.score(images[start : start + SCORE_BATCH, None].astype(np.float32)).signals[signal]
        for start in range(0, len(images), SCORE_BATCH)
    ]
    return np.concatenate(parts).astype(np.float64)


def disjoint_batches(count: int, size: int, partitions: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (partitions * floor(count / size), size): each partition a random permutation of range(count) cut into
    disjoint batches (the remainder of each permutation is left out)."""
    per_partition = count // size
    return np.concatenate([rng.permutation(count)[: per_partition * size].reshape(per_partition, size) for _ in range(partitions)])


def reference_band(reference_batches: int, alpha: float, level: float = 0.95) -> dict[str, float] | None:
    """Distribution of the conditional false-alarm rate q ~ Beta(j + 1, K - j) of the test `p < alpha` with K reference
    batches, over draws of an exchangeable reference: its mean and central `level` interval; None when nothing can be
    flagged (j < 0)."""
    j = math.ceil(alpha * (reference_batches + 1)) - 2
    if j < 0:
        return None
    a, b = j + 1, reference_batches - j
    tail = (1.0 - level) / 2.0
    return {"mean": a / (a + b), "low": beta_quantile(tail, a, b), "high": beta_quantile(1.0 - tail, a, b), "j": j}


def replay(test: BatchTypicalityTest, values: np.ndarray, size: int, alpha: float, batches: int, seed: int) -> dict:
    """Flag rate of `test` at `alpha` over at least `batches` disjoint-per-partition batches of `size` of `values`."""
    per_partition = len(values) // size
    partitions = math.ceil(batches / per_partition)
    indices = disjoint_batches(len(values), size, partitions, np.random.default_rng([seed, size]))
    results = [test.test(values[batch], alpha) for batch in indices]
    record: dict = {
        "batch_size": size,
        "alpha": alpha,
        "pool": len(values),
        "per_partition": per_partition,
        "partitions": partitions,
        "batches": len(indices),
        "reference_batches": results[0].reference_batches,
        "minimum_alpha": results[0].minimum_alpha,
    }
    if results[0].is_ood is None:
        return record | {"testable": False}
    flags = np.array([bool(result.is_ood) for result in results]).reshape(partitions, per_partition)
    flagged = int(flags.sum())
    rate = flagged / flags.size
    per_partition_rates = flags.mean(axis=1)
    effective = round(rate * per_partition)
    return record | {
        "testable": True,
        "flagged": flagged,
        "rate": rate,
        "ci": list(clopper_pearson(effective, per_partition)),
        "ci_counts": [effective, per_partition],
        "ci_all_batches": list(clopper_pearson(flagged, flags.size)),
        "partition_rate_sd": float(per_partition_rates.std(ddof=1)) if partitions > 1 else None,
        "reference_band": reference_band(results[0].reference_batches, alpha),
    }


def ks_two_sample(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov statistic with its asymptotic p-value (Kolmogorov's series)."""
    first, second = np.sort(first), np.sort(second)
    grid = np.concatenate([first, second])
    distance = float(
        np.max(np.abs(np.searchsorted(first, grid, "right") / len(first) - np.searchsorted(second, grid, "right") / len(second)))
    )
    effective = math.sqrt(len(first) * len(second) / (len(first) + len(second)))
    x = (effective + 0.12 + 0.11 / effective) * distance
    p_value = 1.0 if x < 0.2 else min(1.0, max(0.0, 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * x * x) for k in range(1, 101))))
    return {"statistic": distance, "p_value": p_value}


def describe(values: np.ndarray, reference: np.ndarray) -> dict:
    """Mean and sd of a set's bits/dim, its mean's difference from the reference mean (with the standard error) and KS."""
    difference = float(values.mean() - reference.mean())
    error = math.sqrt(values.var(ddof=1) / len(values) + reference.var(ddof=1) / len(reference))
    return {
        "n": len(values),
        "mean_bpd": float(values.mean()),
        "sd_bpd": float(values.std(ddof=1)),
        "mean_minus_reference": difference,
        "z": difference / error,
        "ks_vs_reference": ks_two_sample(values, reference),
    }


def shipped_calibration_halves(split: DataSplit, seed: int, reference_size: int = REFERENCE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(signal half, fusion half) of `split.calibration` as the shipped bundle's builder (code_version 15729aa) drew them:
    one `default_rng(seed)` picks the reference train images, then permutes the calibration indices, halved in that order."""
    rng = np.random.default_rng(seed)
    rng.choice(split.train, size=min(reference_size, len(split.train)), replace=False)
    signal, fusion = np.array_split(rng.permutation(split.calibration), 2)
    return signal, fusion


def load_scores(engine: Engine, split: DataSplit, cache: Path | None) -> dict[str, np.ndarray]:
    """Bits/dim of the validation and calibration images (in the order of `split`) and of both test files, from `cache`
    when it exists (written there otherwise)."""
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            return {name: stored[name] for name in stored.files}
    train = load_images(DEFAULT_FASHION_MNIST_DIR, "train").images
    sets = {
        "validation": train[split.validation],
        "calibration": train[split.calibration],
        "fashion_mnist_test": load_images(DEFAULT_FASHION_MNIST_DIR, "test").images,
        "mnist_test": load_images(MNIST_DIR, "test").images,
    }
    scores = {}
    for name, images in sets.items():
        started = time.process_time()
        scores[name] = score_bits_per_dim(engine, images)
        print(f"scored {name}: {len(images)} images, {time.process_time() - started:.1f} s CPU")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **scores)
    return scores


def bootstrap_threshold_before_6ed62fa(
    reference: np.ndarray, entropy_bpd: float, size: int, alpha: float, draws: int, seed: int = 0
) -> float:
    """The threshold of the batch test as it was before commit 6ed62fa (service/scoring/batch_typicality.py at 02fc48d):
    the ceil((1 - alpha)(B + 1))-th smallest |mean - H| of B batches drawn with replacement from the reference; a batch was
    flagged when its statistic exceeded it. Kept here only to say where the 0.093 came from."""
    rng = np.random.default_rng([seed, size])
    statistics = np.sort(np.abs(reference[rng.integers(0, len(reference), size=(draws, size))].mean(axis=1) - entropy_bpd))
    return float(statistics[min(math.ceil((1.0 - alpha) * (draws + 1)), draws) - 1])


def bootstrap_check(test: BatchTypicalityTest, scores: dict[str, np.ndarray], draws: int, batches: int, seed: int) -> dict:
    """The pre-6ed62fa bootstrap test at the claim's M and alpha: file-order batches of the test file and random disjoint
    batches (as `replay` draws them) of the test file and of the held-out training images."""
    size, alpha = CLAIM["batch_size"], CLAIM["alpha"]
    threshold = bootstrap_threshold_before_6ed62fa(test.reference_bits_per_dim, test.entropy_bpd, size, alpha, draws)

    def flags(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return np.abs(values[indices].mean(axis=1) - test.entropy_bpd) > threshold

    test_file = scores["fashion_mnist_test"]
    in_order = flags(test_file, np.arange(len(test_file) // size * size).reshape(-1, size))
    record: dict = {
        "batch_size": size,
        "alpha": alpha,
        "bootstrap_draws": draws,
        "threshold": threshold,
        "file_order_first_flagged": int(in_order[: CLAIM["batches"]].sum()),
        "file_order_all_flagged": int(in_order.sum()),
        "file_order_all": len(in_order),
    }
    for name in ("held_out_all", "fashion_mnist_test"):
        values = scores[name]
        partitions = math.ceil(batches / (len(values) // size))
        flagged = flags(values, disjoint_batches(len(values), size, partitions, np.random.default_rng([seed, size])))
        record[f"{name}_random_rate"] = float(flagged.mean())
    return record


def file_order_batches(test: BatchTypicalityTest, values: np.ndarray, size: int, alpha: float, first: int) -> dict:
    """Flags of consecutive batches of `size` in file order: of the first `first` batches and of all of them."""
    count = len(values) // size
    flags = [bool(test.test(values[start * size : (start + 1) * size], alpha).is_ood) for start in range(count)]
    return {
        "batch_size": size,
        "alpha": alpha,
        "first_flagged": int(sum(flags[:first])),
        "first": first,
        "all_flagged": int(sum(flags)),
        "all": count,
    }


def cell(record: dict) -> str:
    if not record["testable"]:
        return f"untestable (p >= {record['minimum_alpha']:.3f})"
    low, high = record["ci"]
    return f"{record['rate']:.4f} [{low:.3f}, {high:.3f}] ({record['flagged']}/{record['batches']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--batches", type=int, default=20000, help="at least this many replayed batches per set and batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scores-cache", type=Path, default=None, help="npz of the scored bits/dim (reused when it exists)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch-test-replay.json"))
    arguments = parser.parse_args()
    engine = Engine.load(arguments.bundle, RuntimeOptions(intra_op_threads=1, inter_op_threads=1))
    test = engine.batch_typicality
    reference = test.reference_bits_per_dim
    seed = int(engine.manifest.provenance.seed or 0)
    split = bundle_split(60000, seed=seed)
    signal_half, fusion_half = shipped_calibration_halves(split, seed)
    scored = load_scores(engine, split, arguments.scores_cache)
    by_index = dict(zip(split.calibration.tolist(), scored["calibration"]))
    rescored = np.array([by_index[index] for index in fusion_half.tolist()])
    difference = float(np.max(np.abs(rescored - reference)))
    print(f"shipped fusion half rescored against reference_bpd (in order): max |difference| {difference:.3g}")
    if difference > 1e-4:
        raise SystemExit(f"the reproduced fusion half does not give the bundle's reference_bpd (max |difference| {difference:.3g})")
    signal_values = np.array([by_index[index] for index in signal_half.tolist()])
    scores = {
        "validation": scored["validation"],
        "signal_calibration": signal_values,
        "held_out_all": np.concatenate([scored["validation"], signal_values]),
        "fashion_mnist_test": scored["fashion_mnist_test"],
        "mnist_test": scored["mnist_test"],
    }
    check = {
        "max_abs_difference": difference,
        "n": len(reference),
        "reference_images_in_todays_bundle_split_signal_calibration": int(np.intersect1d(fusion_half, split.signal_calibration).size),
    }

    replays = {
        name: [replay(test, values, size, alpha, arguments.batches, arguments.seed) for size in BATCH_SIZES for alpha in ALPHAS]
        for name, values in scores.items()
    }
    claim_failures = round(CLAIM["rate"] * CLAIM["batches"])
    file_order = file_order_batches(test, scores["fashion_mnist_test"], CLAIM["batch_size"], CLAIM["alpha"], CLAIM["batches"])
    every_held_out = np.concatenate([reference, scores["held_out_all"]])
    draws = engine.manifest.batch_typicality.n_bootstrap
    bootstrap = bootstrap_check(test, scores, draws, arguments.batches, arguments.seed)
    result = {
        "bundle": str(arguments.bundle),
        "entropy_bpd": test.entropy_bpd,
        "reference": {
            "set": "fusion half of bundle_split(60000, seed=0).calibration as drawn by the builder at 15729aa",
            "mean_bpd": float(reference.mean()),
            "sd_bpd": float(reference.std(ddof=1)),
            "rescored_check": check,
        },
        "sets": {name: describe(values, reference) for name, values in scores.items()},
        "test_file_vs_all_held_out_training": describe(scores["fashion_mnist_test"], every_held_out),
        "claim": CLAIM | {"ci": list(clopper_pearson(claim_failures, CLAIM["batches"])), "counts": [claim_failures, CLAIM["batches"]]},
        "test_file_in_file_order": file_order,
        "bootstrap_test_before_6ed62fa": bootstrap,
        "replays": replays,
        "method": "disjoint batches within each random partition, many partitions; ci = Clopper-Pearson 95% on one partition's "
        "batch count at the averaged rate (conservative), ci_all_batches treats every replayed batch as independent (too narrow); "
        "reference_band = 95% range of the false-alarm rate given one exchangeable reference draw, Beta(j + 1, K - j)",
    }
    columns = [(size, alpha) for size in BATCH_SIZES for alpha in ALPHAS]
    lines = [
        f"Batch typicality test of `{arguments.bundle}`: flagged rate over replayed batches (disjoint within each random partition), "
        "Clopper-Pearson 95% on one partition's batch count (conservative), (flagged/replayed). "
        f"Reference: {len(reference)} bits/dim of the fusion-calibration half, H = {test.entropy_bpd:.4f}.",
        "",
        "Exchangeable sets: `validation` = bundle_split(60000, seed=0).validation (early stopping and fusion choice only); "
        "`signal_calibration` = the shipped bundle's first calibration half, as its builder (15729aa) drew it, not today's "
        f"bundle_split().signal_calibration, which holds {check['reference_images_in_todays_bundle_split_signal_calibration']} of the "
        f"reference images (rescored reference matches the stored one to {difference:.1g}). An interval whose low end is above alpha "
        "would mean the test does not hold; the last row is the range a valid test shows for one fixed reference draw.",
        "",
        "| set | n | mean bpd | " + " | ".join(f"M={size}, alpha={alpha}" for size, alpha in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for name, records in replays.items():
        lines.append(
            f"| {name} | {len(scores[name])} | {scores[name].mean():.4f} | " + " | ".join(cell(record) for record in records) + " |"
        )
    bands = {(record["batch_size"], record["alpha"]): record.get("reference_band") for record in replays["validation"]}
    lines.append(
        "| exchangeable range (one reference draw) | | | "
        + " | ".join(
            f"mean {band['mean']:.4f}, 95% [{band['low']:.3f}, {band['high']:.3f}]" if band else "-" for band in (bands[c] for c in columns)
        )
        + " |"
    )
    low, high = result["claim"]["ci"]
    lines += [
        "",
        f"Claim checked: {CLAIM['rate']} of {CLAIM['batches']} test-file batches of {CLAIM['batch_size']} flagged at alpha "
        f"{CLAIM['alpha']} (Clopper-Pearson 95% [{low:.3f}, {high:.3f}]). Consecutive batches of the test file in file order, "
        f"this test: {file_order['first_flagged']}/{CLAIM['batches']} of the first {CLAIM['batches']}, "
        f"{file_order['all_flagged']}/{file_order['all']} of all. The bootstrap test served before commit 6ed62fa "
        f"({draws} draws): {bootstrap['file_order_first_flagged']}/{CLAIM['batches']} of the first {CLAIM['batches']} in file order, "
        f"{bootstrap['file_order_all_flagged']}/{bootstrap['file_order_all']} of all; random batches: test file "
        f"{bootstrap['fashion_mnist_test_random_rate']:.4f}, held-out training images {bootstrap['held_out_all_random_rate']:.4f}.",
        "",
        "| set | n | mean bpd | minus reference mean | z | KS vs reference (p) |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in result["sets"].items():
        lines.append(
            f"| {name} | {figures['n']} | {figures['mean_bpd']:.4f} | {figures['mean_minus_reference']:+.4f} | {figures['z']:+.2f} | "
            f"{figures['ks_vs_reference']['statistic']:.4f} ({figures['ks_vs_reference']['p_value']:.3g}) |"
        )
    shift = result["test_file_vs_all_held_out_training"]
    lines.append(
        f"| fashion_mnist_test vs all {len(every_held_out)} held-out training images | {shift['n']} | {shift['mean_bpd']:.4f} | "
        f"{shift['mean_minus_reference']:+.4f} | {shift['z']:+.2f} | {shift['ks_vs_reference']['statistic']:.4f} "
        f"({shift['ks_vs_reference']['p_value']:.3g}) |"
    )
    table = "\n".join(lines)
    result["table"] = table
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=1))
    arguments.out.with_suffix(".md").write_text(table + "\n")
    print(json.dumps(result["sets"], indent=1))
    print(table)


if __name__ == "__main__":
    main()
