"""Drift benchmark: false alarms of the online tests on clean streams, detection delay after a shift, and
the cost per input on the hot path, on the shipped Fashion-MNIST bundle's fused statistic.

    .venv/bin/python -m benchmarks.drift [--replays 1000] [--out benchmarks/results/drift.json]

Scores come from the serving engine (`Engine.score(...).fused_score`) once, then streams are replayed
offline through `oodserve.drift` (the code the server runs):

- Null: calibration and stream drawn i.i.d. (with replacement, so with many ties) from the fused scores of
  the 2,000 validation images of the training file (never trained on), so they are exchangeable by
  construction: the share of streams whose martingale ever reaches 1/delta must stay below
  delta. The same streams against the calibration alone (`grow=False`, p-values i.i.d. given it but not
  uniform) are measured beside. The Fashion-MNIST test file is reported separately (shuffled, against the
  bundle's real calibration): it is slightly shifted from the training file.
- Delay: a clean prefix of test images, then each input is MNIST (or rotated clothing) with probability q;
  inputs after the change until each test alarms, and until today's OOD-rate rule would (its 5-minute rate
  above 3 x alpha held for 10 minutes, replayed at an assumed 10 inputs per second: a 3,000-input window
  that must stay above for 6,000 inputs).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import orjson

from oodserve.drift.conformal_martingale import MixturePowerMartingale, OnlineConformalPValues, ShiryaevRoberts
from oodserve.drift.monitor import DriftMonitor, DriftSettings
from oodserve.drift.replay import first_crossing, null_replays, ood_rate_rule_delay, shuffle_replays
from oodserve.engine import Engine
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.perturbations import rotate_90
from oodserve.models.splits import bundle_split
from oodserve.scoring.conformal import conformal_p_values

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "bundles" / "fashion-mnist"
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
ALPHA = 0.05


def fused_scores(cache: Path) -> dict[str, np.ndarray]:
    """Fused statistics of every image set through the engine (cached in `cache`)."""
    if cache.exists():
        with np.load(cache) as stored:
            return {key: stored[key] for key in stored.files}

    engine = Engine.load(BUNDLE)
    train = load_images(DEFAULT_FASHION_MNIST_DIR, "train").images
    split = bundle_split(len(train))
    test = load_images(DEFAULT_FASHION_MNIST_DIR, "t10k").images
    sets = {
        "held_out": train[split.validation],
        "test": test,
        "mnist": load_images(MNIST_DIR, "t10k").images,
        "rotated": rotate_90(test, np.random.default_rng(0)),
    }
    scores = {"calibration": np.asarray(engine.bundle.calibration.fused)}
    for name, images in sets.items():
        batches = [images[start : start + 500, None].astype(np.float32) for start in range(0, len(images), 500)]
        scores[name] = np.concatenate([engine.score(batch, ALPHA).fused_score for batch in batches])
        print(f"scored {name}: {len(images)} images", flush=True)
    np.savez(cache, **scores)
    return scores


def delay_replays(scores: dict[str, np.ndarray], shifted: str, fraction: float, replays: int, delta: float, change_threshold: float,
                  seed: int, clean: int = 2000, after: int = 20000) -> dict[str, object]:
    calibration, test = scores["calibration"], scores["test"]
    sorted_calibration = np.sort(calibration)
    delays: dict[str, list[float]] = {"martingale": [], "change": [], "ood_rate_rule": []}
    early = {name: 0 for name in delays}
    for replay in range(replays):
        rng = np.random.default_rng([seed, 20_000 + replay])
        prefix = rng.choice(test, clean)
        mixed = np.where(rng.random(after) < fraction, rng.choice(scores[shifted], after), rng.choice(test, after))
        stream = np.concatenate([prefix, mixed])
        online = OnlineConformalPValues(calibration, rng)
        p_values = np.concatenate([online.p_values(stream[start : start + 2000]) for start in range(0, len(stream), 2000)])
        martingale, change = MixturePowerMartingale(), ShiryaevRoberts()
        martingale_path, change_path = martingale.update(p_values), change.update(p_values)
        for name, path, level in (("martingale", martingale_path, -math.log(delta)), ("change", change_path, math.log(change_threshold))):
            crossing = first_crossing(path, level)
            # an alarm inside the clean prefix is a false alarm: counted as delay 0; none at all: censored at `after`
            delays[name].append(math.inf if crossing is None else max(crossing - clean, 0))
            early[name] += crossing is not None and crossing < clean
        rule = ood_rate_rule_delay(conformal_p_values(sorted_calibration, stream) < ALPHA, clean)
        delays["ood_rate_rule"].append(math.inf if rule is None else max(rule, 0))
        early["ood_rate_rule"] += rule is not None and rule < 0
    summary = {}
    for name, values in delays.items():
        array = np.asarray(values)
        finite = np.where(np.isinf(array), after, array)  # quantiles with misses censored at `after`
        summary[name] = {"median": float(np.median(finite)), "p90": float(np.quantile(finite, 0.9)),
                         "missed": int(np.isinf(array).sum()), "alarms_before_the_change": early[name], "replays": replays}
    return summary


def hot_path_microseconds(calibration: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """DriftMonitor.observe per input for requests of 1, 8 and 64 inputs (median of 5 rounds)."""
    result = {}
    for batch in (1, 8, 64):
        rounds = []
        for round_index in range(5):
            monitor = DriftMonitor(DriftSettings(seed=round_index))
            requests = np.random.default_rng(round_index).choice(test, (4000 // batch, batch))
            for request in requests[:20]:
                monitor.observe("m", "s", calibration, request)
            began = time.perf_counter()
            for request in requests[20:]:
                monitor.observe("m", "s", calibration, request)
            rounds.append((time.perf_counter() - began) / ((len(requests) - 20) * batch) * 1e6)
        result[f"batch_{batch}"] = float(np.median(rounds))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=1000)
    parser.add_argument("--delay-replays", type=int, default=200)
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--change-threshold", type=float, default=1e8)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/oodserve-drift-scores.npz"))
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    scores = fused_scores(arguments.cache)
    report: dict[str, object] = {"delta": arguments.delta, "change_threshold": arguments.change_threshold, "alpha": ALPHA}
    began = time.monotonic()
    report["null_held_out"] = null_replays(scores["held_out"], arguments.replays, 10_000, len(scores["calibration"]), arguments.delta, 0)
    print("null (held-out training images, i.i.d. resampled):", report["null_held_out"], f"{time.monotonic() - began:.0f}s", flush=True)
    report["test_file"] = shuffle_replays(scores["calibration"], scores["test"], min(arguments.replays, 200), arguments.delta, 0)
    print("Fashion-MNIST test file against the bundle's calibration:", report["test_file"], flush=True)
    delays = {}
    for shifted, fraction in (("mnist", 1.0), ("mnist", 0.3), ("mnist", 0.1), ("mnist", 0.03), ("rotated", 1.0), ("rotated", 0.3)):
        key = f"{shifted}_{fraction:g}"
        delays[key] = delay_replays(scores, shifted, fraction, arguments.delay_replays, arguments.delta, arguments.change_threshold, 0)
        print(f"delay {key}:", delays[key], flush=True)
    report["delay"] = delays
    report["hot_path_us_per_input"] = hot_path_microseconds(scores["calibration"], scores["test"])
    print("hot path (us per input):", report["hot_path_us_per_input"], flush=True)
    if arguments.out is not None:
        arguments.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


if __name__ == "__main__":
    main()
