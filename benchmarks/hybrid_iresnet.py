"""The hybrid i-ResNet bundles measured through the HTTP API: test bits/dim (dequantised, from training),
accuracy, every signal's and the fused MNIST AUROC, AUROC against Fashion-MNIST with additive Gaussian
noise (sigma in pixel units), the verdict's false-positive rate on the 10,000 test images at alpha 0.05
and 0.01 with Clopper-Pearson intervals, and ONNX milliseconds per image. `--checkpoint NAME=best.pt` measures
a hybrid run without a bundle (bits/dim, accuracy, ms/image).

    .venv/bin/python -m benchmarks.hybrid_iresnet --bundle hybrid=models/bundles/fashion-mnist-iresnet [--bundle ...] \
        --out benchmarks/results/hybrid-iresnet.json

Each bundle is served by `oodserve serve` in its own process; images go as `.npy` bodies of 250.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
from tqdm import tqdm

from oodserve.bench.http_driver import ServerProcess
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.evaluation.metrics import auroc, clopper_pearson
from oodserve.models.fit.images import read_metrics
from oodserve.models.flows.export import export_checkpoint, onnx_latency_per_image_ms

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
NOISE_SIGMAS = (8, 16, 32)
REQUEST_SIZE = 250


def with_gaussian_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """uint8 images plus N(0, sigma^2) per pixel (pixel units), rounded and clipped to 0..255."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=images.shape)
    return np.clip(np.rint(images.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def score_over_http(client: httpx.Client, url: str, images: np.ndarray, alpha: float, what: str) -> dict[str, np.ndarray]:
    """Every image (N, 1, H, W) uint8 through POST /v1/score as .npy bodies: fused score, p-value, verdict,
    raw signal scores and predicted class, each (N,)."""
    rows: list[dict] = []
    for start in tqdm(range(0, len(images), REQUEST_SIZE), desc=what, leave=False):
        body = images[start : start + REQUEST_SIZE]
        buffer = io.BytesIO()
        np.save(buffer, body)
        response = client.post(f"{url}/v1/score", params={"alpha": alpha}, content=buffer.getvalue(),
                               headers={"content-type": "application/x-npy"})
        response.raise_for_status()
        rows.extend(response.json()["results"])
    out = {
        "score": np.array([row["score"] for row in rows]),
        "p_value": np.array([row["p_value"] for row in rows]),
        "is_ood": np.array([row["is_ood"] for row in rows]),
        **{f"signal:{name}": np.array([row["signals"][name] for row in rows]) for name in rows[0]["signals"]},
    }
    if "prediction" in rows[0]:
        out["predicted"] = np.array([row["prediction"]["class_index"] for row in rows])
    return out


def onnx_test_figures(path: Path, test: np.ndarray, labels: np.ndarray, seed: int = 0, threads: int = 2) -> dict[str, float]:
    """A hybrid flow graph (input pixels 0..255, evaluated at (x + 0.5) / 256) on the test images: mean bits/dim at
    the bin centres and accuracy of its logits, and dequantised bits/dim: fed x + v - 0.5 with v ~ U[0, 1) (one draw
    per pixel) the graph sees (x + v) / 256, the bound flow papers publish."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    dimension = int(np.prod(test.shape[1:]))
    rng = np.random.default_rng(seed)

    def bits(log_prob: np.ndarray) -> float:
        return float(np.sum(-(log_prob.astype(np.float64) - dimension * np.log(256.0)) / (dimension * np.log(2.0))))

    sums = {"bin_centre": 0.0, "dequantized": 0.0, "correct": 0.0}
    for start in tqdm(range(0, len(test), 250), desc="test bits/dim (ONNX)", leave=False):
        batch = test[start : start + 250].astype(np.float32)
        log_prob, logits = session.run(["log_prob", "logits"], {"x": batch})
        sums["bin_centre"] += bits(log_prob)
        sums["correct"] += float(np.sum(logits.argmax(axis=1) == labels[start : start + 250]))
        sums["dequantized"] += bits(session.run(["log_prob"], {"x": batch + rng.random(batch.shape, dtype=np.float32) - 0.5})[0])
    return {"bin_centre": sums["bin_centre"] / len(test), "dequantized": sums["dequantized"] / len(test),
            "accuracy": sums["correct"] / len(test)}


def measure_checkpoint(name: str, checkpoint: Path, test: np.ndarray, labels: np.ndarray) -> dict:
    """A `train flow --hybrid` checkpoint without a bundle: exported, then test bits/dim, accuracy and ms/image."""
    import tempfile


    with tempfile.TemporaryDirectory() as directory:
        path, _ = export_checkpoint(checkpoint, Path(directory) / "flow.onnx")
        return {"checkpoint": str(checkpoint), "training": read_metrics(checkpoint), "test_images": len(test),
                "test_onnx": onnx_test_figures(path, test, labels),
                "onnx_ms_per_image_batch64_1thread": onnx_latency_per_image_ms(path, repeats=10)}


def measure(name: str, bundle: Path, test: np.ndarray, labels: np.ndarray, mnist: np.ndarray, noise_limit: int) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    training = manifest["provenance"]["training"]["flow"]
    environment = {"OODSERVE_INTRA_OP_THREADS": "2", "OODSERVE_REQUEST_TIMEOUT_SECONDS": "600"}
    with ServerProcess(bundle, environment, None) as server, httpx.Client(timeout=600) as client:
        inside = score_over_http(client, server.url, test, 0.05, f"{name}: Fashion-MNIST test, alpha 0.05")
        sets = {"mnist": score_over_http(client, server.url, mnist, 0.05, f"{name}: MNIST")}
        for sigma in NOISE_SIGMAS:
            noisy = with_gaussian_noise(test[:noise_limit], sigma, seed=sigma)
            sets[f"noise_sigma_{sigma}"] = score_over_http(client, server.url, noisy, 0.05, f"{name}: noise sigma {sigma}")
    signal_names = [key.split(":", 1)[1] for key in inside if key.startswith("signal:")]
    inside_noise = {key: values[:noise_limit] for key, values in inside.items()}
    auroc_rows = {}
    for set_name, scores in sets.items():
        reference = inside_noise if set_name.startswith("noise") else inside
        auroc_rows[set_name] = {"fused": auroc(reference["score"], scores["score"]),
                                **{signal: auroc(reference[f"signal:{signal}"], scores[f"signal:{signal}"]) for signal in signal_names}}
    fused_signals = manifest["fusion"]["signals"]
    single = {signal: value for signal, value in auroc_rows["mnist"].items() if signal not in ("fused", "bits_per_dim")}
    best_signal = max(single, key=single.__getitem__)
    # the verdict at alpha 0.01 is p < 0.01 of the same p-values (is_ood = p < alpha): counted from the first pass
    false_positives = {"0.05": int(inside["is_ood"].sum()), "0.01": int((inside["p_value"] < 0.01).sum())}
    return {
        "bundle": str(bundle),
        "fusion": {"method": manifest["fusion"]["method"], "signals": fused_signals},
        "training": {key: training.get(key) for key in ("test_bpd_dequantized", "test_bpd", "test_accuracy", "train_minutes", "steps",
                                                         "epochs_completed", "parameters", "nll_weight", "stop_reason")},
        "test_images": len(test),
        "test_onnx": onnx_test_figures(bundle / manifest["models"]["flow"]["file"], test, labels),
        "accuracy_over_http": float(np.mean(inside["predicted"] == labels)) if "predicted" in inside else None,
        "auroc": auroc_rows,
        "best_single_signal_mnist": {"signal": best_signal, "auroc": single[best_signal]},
        "fpr": {alpha: {"false_positives": count, "rate": count / len(test), "interval": clopper_pearson(count, len(test))}
                for alpha, count in false_positives.items()},
        "onnx_ms_per_image_batch64_1thread": onnx_latency_per_image_ms(bundle / manifest["models"]["flow"]["file"], repeats=10),
    }


def markdown(results: dict[str, dict]) -> str:
    lines = ["| model | test bpd (dequantised) | accuracy | best single signal, MNIST AUROC | fused MNIST AUROC | "
             "FPR at 0.05 / 0.01 | AUROC noise sigma 8 / 16 / 32 (fused) | ms/image ONNX |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        if "auroc" not in row:  # a checkpoint measured without a bundle
            lines.append(f"| {name} | {row['test_onnx']['dequantized']:.3f} | {row['test_onnx']['accuracy']:.4f} | | | | | "
                         f"{row['onnx_ms_per_image_batch64_1thread']:.2f} |")
            continue
        noise = " / ".join(f"{row['auroc'][f'noise_sigma_{sigma}']['fused']:.3f}" for sigma in NOISE_SIGMAS)
        best = row["best_single_signal_mnist"]
        lines.append(f"| {name} | {row['test_onnx']['dequantized']:.3f} | {row['accuracy_over_http']:.4f} | "
                     f"{best['signal']} {best['auroc']:.4f} | {row['auroc']['mnist']['fused']:.4f} | "
                     f"{row['fpr']['0.05']['rate']:.4f} / {row['fpr']['0.01']['rate']:.4f} | {noise} | "
                     f"{row['onnx_ms_per_image_batch64_1thread']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", default=[], help="NAME=DIR; repeatable")
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=best.pt of a hybrid run without a bundle; repeatable")
    parser.add_argument("--limit", type=int, default=None, help="at most this many test and MNIST images (default all 10,000)")
    parser.add_argument("--noise-limit", type=int, default=2000, help="test images per noise level")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hybrid-iresnet.json"))
    arguments = parser.parse_args()
    test_file = load_images(DEFAULT_FASHION_MNIST_DIR, "test")
    assert test_file.labels is not None
    test, labels = test_file.images[: arguments.limit, None], test_file.labels[: arguments.limit]
    mnist = load_images(MNIST_DIR, "test").images[: arguments.limit, None]
    results = {}
    for item in arguments.bundle:
        name, directory = item.split("=", 1)
        results[name] = measure(name, Path(directory), test, labels, mnist, arguments.noise_limit)
        print(json.dumps(results[name], indent=1))
    for item in arguments.checkpoint:
        name, path = item.split("=", 1)
        results[name] = measure_checkpoint(name, Path(path), test, labels)
        print(json.dumps(results[name], indent=1))
    table = markdown(results)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps({"results": results, "table": table}, indent=1))
    arguments.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
