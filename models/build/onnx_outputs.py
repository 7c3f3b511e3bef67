"""Run a bundle's ONNX models over a data set in batches (onnxruntime, CPU), with progress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from oodserve.bundle.manifest import ModelSpec


def open_sessions(model_files: dict[str, Path], threads: int = 2) -> dict[str, ort.InferenceSession]:
    """One CPU session per model name."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return {
        name: ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        for name, path in model_files.items()
    }


def run_models(
    sessions: dict[str, ort.InferenceSession], images: np.ndarray, batch_size: int = 500, description: str = ""
) -> dict[str, dict[str, np.ndarray]]:
    """outputs[model][output] for inputs (N, *input shape) fed as float32; greyscale images (N, H, W) get
    their channel axis (N, 1, H, W)."""
    pixels = np.asarray(images, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels[:, None]
    collected: dict[str, dict[str, list[np.ndarray]]] = {
        name: {output.name: [] for output in session.get_outputs()} for name, session in sessions.items()
    }
    for start in tqdm(range(0, len(pixels), batch_size), desc=description or "onnx", leave=False, unit="batch"):
        batch = pixels[start : start + batch_size]
        for name, session in sessions.items():
            names = [output.name for output in session.get_outputs()]
            for output_name, value in zip(names, session.run(names, {"x": batch})):
                collected[name][output_name].append(value)
    return {
        name: {output: np.concatenate(chunks) for output, chunks in outputs.items()}
        for name, outputs in collected.items()
    }


class OnnxModels:
    """A bundle's exported models run by onnxruntime for the calibration (`oodserve.models.build.calibrate.BundleModels`):
    inputs in batches of `batch_size`, signals read the raw inputs as float64."""

    def __init__(self, model_files: dict[str, Path], threads: int = 2, batch_size: int = 500) -> None:
        self.sessions = open_sessions(model_files, threads=threads)
        self.files = dict(model_files)
        self.batch_size = batch_size

    def outputs(self, inputs: np.ndarray, what: str) -> dict[str, dict[str, np.ndarray]]:
        return run_models(self.sessions, inputs, batch_size=self.batch_size, description=what)

    def signal_inputs(self, inputs: np.ndarray) -> np.ndarray:
        return np.asarray(inputs, dtype=np.float64)

    def output_names(self, model: str) -> list[str]:
        return [output.name for output in self.sessions[model].get_outputs()]

    def specs(self) -> dict[str, ModelSpec]:
        """The manifest's `models` entries: each model's file and its input and output names."""
        return {
            model: ModelSpec(file=path.name, inputs=[i.name for i in self.sessions[model].get_inputs()], outputs=self.output_names(model))
            for model, path in self.files.items()
        }
