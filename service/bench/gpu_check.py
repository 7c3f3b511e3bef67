"""GPU check of a bundle, run by `benchmarks/gpu_check.sh` in a venv with the `gpu` extra (no torch, no dev extras).

1. Every session of the bundle on CUDAExecutionProvider (a `oodserve serve` started with OODSERVE_REQUIRE_GPU=true
   must come up and report CUDA for every model on /v1/models).
2. GPU against CPU on the same images (10,000 Fashion-MNIST test, 10,000 MNIST test): the largest absolute and
   relative difference per signal, of the fused p-value, and how many verdicts change at alpha 0.05 / 0.01, for
   each CUDA provider setting tried (onnxruntime's defaults; TF32 off; TF32 off with the default cuDNN algorithm
   search). The bundle was calibrated on CPU, so the setting that agrees best is the one to serve with.
3. On GPU: the Fashion-MNIST test FPR and the MNIST detection rate at alpha 0.05 / 0.01.
4. Throughput: raw onnxruntime (the bundle's models one after another, with and without IO binding) at batch
   1..256, and the service over HTTP: `.npy` bodies of 1..256 images, and one image per request at c=1/16/64.

Prints a summary and writes everything to `--out` as JSON. `--allow-cpu` runs the same steps with CPU sessions
only (a dry run of the script on a machine without a GPU; the figures then say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from oodserve.bench.http_driver import ServerProcess
from oodserve.bench.load import LoadOptions, run_load
from oodserve.datasets import load_images
from oodserve.engine import Engine
from oodserve.runtime.providers import CPU_PROVIDER, CUDA_PROVIDER
from oodserve.runtime.sessions import RuntimeOptions

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROVIDER_SETTINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "onnxruntime defaults": (),
    "TF32 off": (("use_tf32", "0"),),
    "TF32 off, default cuDNN algorithm search": (("use_tf32", "0"), ("cudnn_conv_algo_search", "DEFAULT")),
}


def score_all(engine: Engine, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Signals, fused score and p-value of (N, 1, 28, 28) images, in batches of `batch`."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch):
        scores = engine.score(images[start : start + batch].astype(np.float32), alpha=0.05)
        for name, values in {**scores.signals, "__fused_score__": scores.fused_score, "__fused_p__": scores.fused_p_value}.items():
            parts.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
    return {name: np.concatenate(values) for name, values in parts.items()}


def compare(gpu: dict[str, np.ndarray], cpu: dict[str, np.ndarray]) -> dict[str, Any]:
    """Largest absolute / relative difference per signal and verdict changes at 0.05 and 0.01."""
    report: dict[str, Any] = {}
    for name in cpu:
        difference = np.abs(gpu[name] - cpu[name])
        finite = np.isfinite(difference)
        scale = np.maximum(np.abs(cpu[name]), 1e-12)
        report[name] = {
            "max_abs": float(difference[finite].max()) if finite.any() else None,
            "max_rel": float((difference[finite] / scale[finite]).max()) if finite.any() else None,
            "non_finite_mismatch": int(np.sum(np.isfinite(gpu[name]) != np.isfinite(cpu[name]))),
        }
    report["verdict_changes"] = {
        str(alpha): int(np.sum((gpu["__fused_p__"] < alpha) != (cpu["__fused_p__"] < alpha))) for alpha in (0.05, 0.01)
    }
    return report


def raw_throughput(engine: Engine, images: np.ndarray, seconds: float, io_binding: bool) -> dict[str, float]:
    """Images/s of the bundle's models run one after another on (B, 1, 28, 28) float32 batches."""
    results: dict[str, float] = {}
    sessions = list(engine.runner.sessions.values())
    for batch in BATCHES:
        x = np.ascontiguousarray(images[:batch].astype(np.float32))
        bindings = []
        if io_binding:
            import onnxruntime

            device = "cuda" if CUDA_PROVIDER in sessions[0].providers else "cpu"
            value = onnxruntime.OrtValue.ortvalue_from_numpy(x, device, 0)
            for model in sessions:
                binding = model.session.io_binding()
                binding.bind_ortvalue_input(model.input_name, value)
                for output in model.output_names:
                    binding.bind_output(output, "cpu")
                bindings.append((model, binding))

        def once(x: np.ndarray = x, bindings: list[Any] = bindings) -> None:
            if io_binding:
                for model, binding in bindings:
                    model.session.run_with_iobinding(binding)
                    binding.copy_outputs_to_cpu()
            else:
                for model in sessions:
                    model.session.run(None, {model.input_name: x})

        for _ in range(3):
            once()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            once()
            runs += 1
        results[str(batch)] = runs * batch / (time.perf_counter() - started)
    return results


def service_rows(bundle: Path, images: np.ndarray, env: dict[str, str], seconds: float) -> dict[str, Any]:
    """Start `oodserve serve` (GPU required unless --allow-cpu), check its providers, measure it over HTTP."""
    import httpx


    rows: dict[str, Any] = {}
    with ServerProcess(bundle, env, Path(os.environ.get("GPU_CHECK_LOG", "/tmp/oodserve-gpu-check-serve.log"))) as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]
        rows["providers"] = {m["name"]: {name: spec["provider"] for name, spec in m["models"].items()} for m in models}
        with httpx.Client(timeout=120) as client:
            npy: dict[str, float] = {}
            for batch in BATCHES:
                buffer = io.BytesIO()
                np.save(buffer, images[:batch].astype(np.uint8))
                body = buffer.getvalue()
                for _ in range(3):
                    client.post(f"{server.url}/v1/score", content=body, headers={"content-type": "application/x-npy"}).raise_for_status()
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    client.post(f"{server.url}/v1/score", content=body, headers={"content-type": "application/x-npy"}).raise_for_status()
                    count += 1
                npy[str(batch)] = count * batch / (time.perf_counter() - started)
            rows["npy_one_client_images_per_s"] = npy
        single: dict[str, Any] = {}
        for concurrency in (1, 16, 64):
            report = run_load(LoadOptions(url=server.url, server_pid=server.process.pid, requests=max(400, concurrency * 40),
                                          concurrency=concurrency, max_seconds=seconds * 4, warmup_requests=100, body="npy"))
            latencies_ms = np.asarray(report.latencies) * 1000.0
            single[str(concurrency)] = {
                "images_per_s": sum(report.statuses.values()) / report.wall_seconds if report.wall_seconds else None,
                "p50_ms": float(np.percentile(latencies_ms, 50)) if latencies_ms.size else None,
                "p99_ms": float(np.percentile(latencies_ms, 99)) if latencies_ms.size else None,
                "errors": report.errors,
            }
        rows["single_image_requests"] = single
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/bundles/fashion-mnist"))
    parser.add_argument("--fashion-mnist", type=Path, default=Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")))
    parser.add_argument("--mnist", type=Path, default=Path(os.environ.get("MNIST_DIR", "../shared/data/mnist")))
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per throughput point")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on CPU sessions (no GPU figures)")
    arguments = parser.parse_args()
    import onnxruntime

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "available_providers": onnxruntime.get_available_providers(),
        "dry_run_on_cpu": arguments.allow_cpu,
    }
    try:
        report["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        report["nvidia_smi"] = f"unavailable: {error}"
    if not arguments.allow_cpu and hasattr(onnxruntime, "preload_dlls"):
        try:  # CUDA and cuDNN from NVIDIA's wheels, where they came that way (onnxruntime-gpu[cuda,cudnn])
            onnxruntime.preload_dlls()
        except Exception as error:  # noqa: BLE001 - a machine with system CUDA needs no preload
            report["preload_dlls"] = f"failed: {error}"
    gpu_provider = CPU_PROVIDER if arguments.allow_cpu else CUDA_PROVIDER
    if gpu_provider not in report["available_providers"]:
        raise SystemExit(f"{gpu_provider} is not available in onnxruntime {onnxruntime.__version__} ({report['available_providers']}); "
                         "install the `gpu` extra (onnxruntime-gpu) with CUDA and cuDNN libraries it can load")
    fashion = load_images(arguments.fashion_mnist, "test").images[:10000][:, None]
    mnist = load_images(arguments.mnist, "test").images[:10000][:, None]
    print(f"images: Fashion-MNIST {fashion.shape}, MNIST {mnist.shape}", flush=True)
    started = time.perf_counter()
    cpu = Engine.load(arguments.bundle, RuntimeOptions(providers=(CPU_PROVIDER,), intra_op_threads=0))
    reference = {"fashion": score_all(cpu, fashion), "mnist": score_all(cpu, mnist)}
    report["cpu_scoring_seconds"] = time.perf_counter() - started
    settings_report: dict[str, Any] = {}
    best, best_changes = None, None
    for label, options in PROVIDER_SETTINGS.items():
        try:
            engine = Engine.load(arguments.bundle, RuntimeOptions(providers=(gpu_provider,), require_gpu=not arguments.allow_cpu,
                                                                  cuda_provider_options=() if arguments.allow_cpu else options))
        except Exception as error:  # noqa: BLE001 - an option this onnxruntime does not know is a finding, not a crash
            settings_report[label] = {"error": str(error)}
            print(f"{label}: sessions refused: {error}", flush=True)
            continue
        started = time.perf_counter()
        scored = {"fashion": score_all(engine, fashion), "mnist": score_all(engine, mnist)}
        entry: dict[str, Any] = {
            "provider_options": dict(options),
            "active_providers": engine.runner.active_providers,
            "scoring_seconds": time.perf_counter() - started,
            "vs_cpu": {name: compare(scored[name], reference[name]) for name in scored},
            "fashion_test_fpr": {str(a): float(np.mean(scored["fashion"]["__fused_p__"] < a)) for a in (0.05, 0.01)},
            "mnist_flagged": {str(a): float(np.mean(scored["mnist"]["__fused_p__"] < a)) for a in (0.05, 0.01)},
        }
        changes = sum(entry["vs_cpu"][name]["verdict_changes"]["0.05"] for name in scored)
        settings_report[label] = entry
        worst = max(((name, signal, values["max_abs"]) for name in scored for signal, values in entry["vs_cpu"][name].items()
                     if signal != "verdict_changes" and values["max_abs"] is not None), key=lambda item: item[2])
        print(f"{label}: verdicts changed at 0.05: {changes} of 20000; largest difference {worst[2]:.3g} ({worst[1]}, {worst[0]}); "
              f"FPR 0.05/0.01 {entry['fashion_test_fpr']['0.05']:.4f}/{entry['fashion_test_fpr']['0.01']:.4f}", flush=True)
        if best_changes is None or changes < best_changes:
            best, best_changes = label, changes
            report["raw_images_per_s"] = raw_throughput(engine, fashion[:256], arguments.seconds, io_binding=False)
            report["raw_images_per_s_io_binding"] = raw_throughput(engine, fashion[:256], arguments.seconds, io_binding=True)
        if arguments.allow_cpu:
            break
    report["provider_settings"] = settings_report
    report["serving_setting"] = best
    if best is None:
        arguments.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        raise SystemExit(f"no CUDA provider setting gave sessions on {gpu_provider} (see {arguments.out}); is CUDA / cuDNN loadable?")
    serving_options: dict[str, str] = dict(PROVIDER_SETTINGS[best]) if best and not arguments.allow_cpu else {}
    env = {
        "OODSERVE_REQUIRE_GPU": "false" if arguments.allow_cpu else "true",
        "OODSERVE_CUDA_PROVIDER_OPTIONS": json.dumps(serving_options),
    }
    if arguments.allow_cpu:
        env["OODSERVE_PROVIDERS"] = CPU_PROVIDER
    report["service"] = service_rows(arguments.bundle, fashion[:256], env, arguments.seconds)
    print("raw images/s by batch:", {k: round(v) for k, v in report.get("raw_images_per_s", {}).items()}, flush=True)
    print("raw images/s by batch, IO binding:", {k: round(v) for k, v in report.get("raw_images_per_s_io_binding", {}).items()})
    print("service .npy images/s by batch:", {k: round(v) for k, v in report["service"]["npy_one_client_images_per_s"].items()})
    print("service single-image requests:", report["service"]["single_image_requests"])
    print("service providers:", report["service"]["providers"])
    arguments.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written {arguments.out}")


if __name__ == "__main__":
    main()
