"""onnxruntime sessions for a verified bundle: providers, threads, input/output name checks, batch runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodserve.bundle.loader import BundleError, VerifiedBundle
from oodserve.bundle.manifest import ModelSpec
from oodserve.config import Settings
from oodserve.runtime.providers import CUDA_PROVIDER, GpuRequiredError, available_providers, resolve_providers

logger = logging.getLogger("oodserve.runtime")


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created: provider order (None = default), GPU requirement, thread counts (0 = default)."""

    providers: tuple[str, ...] | None = None
    require_gpu: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False
    """onnxruntime's pool threads busy-wait for the next run when True; off, they sleep and leave the cores to
    the event loop (which shares the machine's few cores with inference)."""
    cuda_provider_options: tuple[tuple[str, str], ...] = ()
    """Options of onnxruntime's CUDA execution provider (for example ("use_tf32", "0") so convolutions and matrix
    products run in full fp32 like the CPU the bundle was calibrated on; ("cudnn_conv_algo_search", "DEFAULT"))."""
    allow_codec_mismatch: bool = False
    """Load a bundle whose signals this machine computes differently (for example another zlib behind the PNG
    length of input_complexity) with a warning instead of refusing it."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        """onnxruntime options from the settings."""
        return cls(
            providers=tuple(settings.providers) if settings.providers else None,
            require_gpu=settings.require_gpu,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            allow_spinning=settings.onnxruntime_spinning,
            cuda_provider_options=tuple(sorted((str(k), str(v)) for k, v in settings.cuda_provider_options.items())),
            allow_codec_mismatch=settings.allow_codec_mismatch,
        )

@dataclass(frozen=True)
class ModelSession:
    """One ONNX model ready to run: its session, the provider actually used, and its I/O names."""

    name: str
    file: str
    session: Any  # onnxruntime.InferenceSession (untyped package)
    active_provider: str
    providers: tuple[str, ...]
    input_name: str
    output_names: tuple[str, ...]


def _check_names(kind: str, declared: list[str], actual: list[str], file_name: str) -> None:
    if sorted(declared) != sorted(actual):
        raise BundleError(f"model file {file_name!r}: {kind} names are {actual}, the manifest declares {declared}")


def provider_entries(providers: list[str], cuda_options: tuple[tuple[str, str], ...]) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime's `providers` argument: names, with the CUDA provider as (name, options) when options are set."""
    return [(provider, dict(cuda_options)) if provider == CUDA_PROVIDER and cuda_options else provider for provider in providers]


def create_model_session(
    name: str, spec: ModelSpec, model_bytes: bytes, input_shape: list[int], providers: list[str], options: RuntimeOptions
) -> ModelSession:
    """Create one InferenceSession from verified bytes and check it against the manifest.

    Refuses (BundleError naming the file) a model whose input or output names differ from the
    manifest, or whose static per-instance input dimensions differ from the input spec.
    """
    import onnxruntime

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.log_severity_level = 3
    spinning = "1" if options.allow_spinning else "0"
    session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    session_options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    try:
        session = onnxruntime.InferenceSession(
            model_bytes, sess_options=session_options, providers=provider_entries(providers, options.cuda_provider_options)
        )
    except Exception as error:  # noqa: BLE001 - onnxruntime raises several exception types for bad models
        raise BundleError(f"model file {spec.file!r} cannot be loaded by onnxruntime: {error}") from error
    inputs = session.get_inputs()
    _check_names("input", spec.inputs, [node.name for node in inputs], spec.file)
    _check_names("output", spec.outputs, [node.name for node in session.get_outputs()], spec.file)
    if inputs[0].type != "tensor(float)":
        raise BundleError(
            f"model file {spec.file!r}: input {inputs[0].name!r} has type {inputs[0].type}, the service feeds tensor(float) (float32)"
        )
    static_shape = list(inputs[0].shape)[1:]
    if len(static_shape) != len(input_shape) or any(
        isinstance(actual, int) and actual != expected for actual, expected in zip(static_shape, input_shape)
    ):
        raise BundleError(
            f"model file {spec.file!r}: input {inputs[0].name!r} has per-instance shape {static_shape}, "
            f"the manifest input shape is {input_shape}"
        )
    active = tuple(session.get_providers())
    if options.require_gpu and CUDA_PROVIDER not in active:
        raise GpuRequiredError(f"OODSERVE_REQUIRE_GPU=true but model {name!r} runs on {list(active)} without {CUDA_PROVIDER}")
    logger.info("model %s (%s): active provider %s (session providers %s)", name, spec.file, active[0], list(active))
    return ModelSession(
        name=name,
        file=spec.file,
        session=session,
        active_provider=active[0],
        providers=active,
        input_name=inputs[0].name,
        output_names=tuple(node.name for node in session.get_outputs()),
    )


InferenceObserver = Callable[[int, dict[str, float]], None]
"""Receives (instances in the batch, onnxruntime seconds per model name) after each ModelRunner.run."""


class ModelRunner:
    """All sessions of one bundle; runs a batch through every model and returns outputs[model][output]."""

    def __init__(self, sessions: Mapping[str, ModelSession]) -> None:
        self.sessions = dict(sessions)
        self.observer: InferenceObserver | None = None
        """Called after every `run` with (instances, seconds per model); set by ServiceMetrics.track_registry."""
        self._mean_seconds: dict[str, float] = {}
        """Running mean of each model's run time: decides which model keeps the calling thread side by side."""

    @classmethod
    def for_bundle(cls, bundle: VerifiedBundle, options: RuntimeOptions) -> ModelRunner:
        """Create a session per manifest model with the resolved providers and thread settings."""
        providers = resolve_providers(options.providers, available_providers(), options.require_gpu)
        sessions = {
            name: create_model_session(name, spec, bundle.model_bytes[name], bundle.manifest.input.shape, providers, options)
            for name, spec in bundle.manifest.models.items()
        }
        return cls(sessions)

    @property
    def active_providers(self) -> dict[str, str]:
        """Model name -> the provider onnxruntime actually uses for it."""
        return {name: model.active_provider for name, model in self.sessions.items()}

    def run(self, images: np.ndarray, helper: Executor | None = None) -> dict[str, dict[str, np.ndarray]]:
        """images: (N, *input_shape) float32 raw scale -> outputs[model][output], each with leading axis N.

        With `helper` (an executor with an idle thread) the models run side by side: the slowest one
        (by the running mean of its past run times) in this thread, the others in the helper thread;
        onnxruntime releases the GIL, so a lone request on an otherwise idle machine uses two cores.
        """
        batch = np.ascontiguousarray(images, dtype=np.float32)
        names = list(self.sessions)
        if helper is not None and len(names) > 1:
            slowest = max(names, key=lambda name: self._mean_seconds.get(name, 0.0))
            others = helper.submit(self._run_models, [name for name in names if name != slowest], batch)
            outputs, seconds_per_model = self._run_models([slowest], batch)
            other_outputs, other_seconds = others.result()
            outputs |= other_outputs
            outputs = {name: outputs[name] for name in names}  # manifest order, as without a helper
            seconds_per_model |= other_seconds
        else:
            outputs, seconds_per_model = self._run_models(names, batch)
        for name, seconds in seconds_per_model.items():
            previous = self._mean_seconds.get(name)
            self._mean_seconds[name] = seconds if previous is None else 0.9 * previous + 0.1 * seconds
        if self.observer is not None:
            self.observer(int(batch.shape[0]), seconds_per_model)
        return outputs

    def _run_models(self, names: list[str], batch: np.ndarray) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
        """Run the named models one after another on `batch`: (outputs per model, seconds per model)."""
        outputs: dict[str, dict[str, np.ndarray]] = {}
        seconds_per_model: dict[str, float] = {}
        for name in names:
            model = self.sessions[name]
            started = time.perf_counter()
            values = model.session.run(list(model.output_names), {model.input_name: batch})
            seconds_per_model[name] = time.perf_counter() - started
            outputs[name] = dict(zip(model.output_names, values))
        return outputs, seconds_per_model
