"""The scoring engine: one verified bundle, its onnxruntime sessions and calibration, and `score_batch`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from oodserve.bundle.loader import BundleError, VerifiedBundle, load_bundle
from oodserve.bundle.manifest import Manifest
from oodserve.runtime.sampler import Sampler
from oodserve.runtime.sessions import ModelRunner, RuntimeOptions
from oodserve.scoring.batch_typicality import BatchTypicalityResult, BatchTypicalityTest
from oodserve.scoring.inputs import InputError
from oodserve.scoring.pipeline import BatchScores, Calibration, FusionRule, InstanceResult, SignalDefinition, prepare_signals, score_outputs
from oodserve.scoring.signals import SIGNAL_KINDS, SignalSource

logger = logging.getLogger("oodserve.engine")


def check_signal_environment(bundle: VerifiedBundle, allow_mismatch: bool) -> None:
    """BundleError (or a warning when `allow_mismatch`) for a signal this machine would compute otherwise than the fit did."""
    for signal in bundle.manifest.signals:
        check = SIGNAL_KINDS[signal.kind].check_environment
        if check is None:
            continue
        problem = check(signal.params, bundle.signal_arrays.get(signal.name, {}))
        if problem is None:
            continue
        message = f"bundle {bundle.manifest.name!r}, signal {signal.name!r}: {problem}"
        if not allow_mismatch:
            raise BundleError(message + "; refit the bundle here, or set OODSERVE_ALLOW_CODEC_MISMATCH=true to serve it anyway")
        logger.warning("%s (served anyway: OODSERVE_ALLOW_CODEC_MISMATCH=true)", message)


class Engine:
    """Holds one bundle's sessions and sorted calibration scores and turns image batches into verdicts.

    Thread-safe for concurrent `score` calls (onnxruntime sessions are; the rest is pure numpy).
    """

    def __init__(self, bundle: VerifiedBundle, runner: ModelRunner, sampler: Sampler | None = None) -> None:
        self.bundle = bundle
        self.sampler = sampler
        self.manifest: Manifest = bundle.manifest
        self.runner = runner
        self.scores_observer: Callable[[BatchScores], None] | None = None
        """Called with the scores of every scored onnxruntime batch (a merged run, whatever requests it serves);
        set by ServiceMetrics.track_registry after the warm-up."""
        self.signal_definitions = tuple(
            SignalDefinition(
                name=signal.name,
                kind=signal.kind,
                source=SignalSource(signal.model, signal.output),
                params=signal.params,
                arrays=bundle.signal_arrays.get(signal.name, {}),
            )
            for signal in self.manifest.signals
        )
        self.calibration = Calibration.of(bundle.calibration, self.manifest.signal_groups())
        """The bundle's calibration scores with their conformal p-values (all signals in one search)."""
        self.fusion = FusionRule(method=self.manifest.fusion.method, signals=tuple(self.manifest.fusion.signals))
        classifier = self.manifest.classifier
        self.classifier_logits = SignalSource(classifier.model, classifier.logits) if classifier is not None else None
        test = self.manifest.batch_typicality
        self.batch_typicality = (
            BatchTypicalityTest(bundle.batch_reference_bpd, test.entropy_bpd)
            if test is not None and bundle.batch_reference_bpd is not None
            else None
        )

    @classmethod
    def load(cls, directory: Path | str, options: RuntimeOptions | None = None) -> Engine:
        """Verify the bundle at `directory` (sha256 of every file), create its sessions, build the engine."""
        bundle = load_bundle(directory)
        options = options or RuntimeOptions()
        check_signal_environment(bundle, options.allow_codec_mismatch)
        runner = ModelRunner.for_bundle(bundle, options)
        engine = cls(bundle, runner, Sampler.for_bundle(bundle, options))
        logger.info(
            "bundle %s %s loaded from %s: models %s, signals %s, fusion %s",
            engine.name,
            engine.version,
            directory,
            engine.runner.active_providers,
            [definition.name for definition in engine.signal_definitions],
            engine.fusion.method,
        )
        return engine

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def reported_signals(self) -> tuple[str, ...]:
        """The signals every scored batch reports (`BatchScores.signals`): the declared signals, or of a cross-conformal
        bundle the signals its fold signals are computed for."""
        return tuple(self.calibration.groups)

    @property
    def default_alpha(self) -> float:
        return self.manifest.default_alpha

    @property
    def minimum_alpha(self) -> float:
        """The smallest fused p-value this bundle can give, 1 / (n + 1) for n fused calibration scores (the smallest
        calibration-conditional p-value under that guarantee): an alpha at or below it would flag nothing."""
        return self.bundle.calibration.minimum_p_value

    def check_alpha(self, alpha: float | None) -> None:
        """InputError `alpha_below_resolution` for an alpha at or below `minimum_alpha` (nothing could be flagged)."""
        if alpha is not None and alpha <= self.minimum_alpha:
            raise InputError(
                "alpha_below_resolution",
                f"alpha {alpha:g} is not above the smallest p-value bundle {self.name!r} can give: with "
                f"{self.bundle.calibration.fused.size} calibration scores alpha must be above {self.minimum_alpha:.6g}",
            )

    def score(self, images: np.ndarray, alpha: float | None = None) -> BatchScores:
        """images: (N, *input_shape) float32 raw scale, already validated -> BatchScores of arrays (N,)."""
        return self.score_model_outputs(images, self.runner.run(images), alpha)

    def prepare_signals(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The input-only parts of the signals (for example PNG lengths) of images (N, *input_shape): no model
        output needed, so the batcher computes them beside the models when a helper thread is free."""
        return prepare_signals(self.signal_definitions, np.asarray(images, dtype=np.float64))

    def score_model_outputs(
        self,
        images: np.ndarray,
        outputs: dict[str, dict[str, np.ndarray]],
        alpha: float | None = None,
        prepared: dict[str, np.ndarray] | None = None,
    ) -> BatchScores:
        """Verdicts for images (N, *input_shape) whose model outputs (leading axis N) are already computed, and
        optionally `prepare_signals` of them; the dynamic batcher runs many requests' images at once and scores
        them here."""
        level = self.default_alpha if alpha is None else float(alpha)
        scores = score_outputs(
            self.signal_definitions,
            self.calibration,
            self.fusion,
            outputs,
            np.asarray(images, dtype=np.float64),
            level,
            self.classifier_logits,
            prepared,
        )
        if self.scores_observer is not None:
            try:
                self.scores_observer(scores)
            except Exception:  # a metrics failure must not fail the requests of this batch
                logger.exception("the scores observer of bundle %s failed", self.name)
        return scores

    def score_batch(self, images: np.ndarray, alpha: float | None = None) -> list[InstanceResult]:
        """One InstanceResult per image, in input order; alpha defaults to the manifest's default_alpha."""
        return self.score(images, alpha).to_instance_results(self.manifest.labels)

    def batch_test(self, scores: BatchScores) -> BatchTypicalityResult | None:
        """The batch typicality test (Nalisnick et al. 2019b) on a scored batch of M >= 2, else None."""
        test = self.manifest.batch_typicality
        if self.batch_typicality is None or test is None or scores.is_ood.size < 2:
            return None
        return self.batch_typicality.test(scores.signals[test.signal], scores.alpha)

    def warm_up(self, batch_size: int = 8) -> None:
        """Run the full scoring path once on a mid-grey batch so the first request pays no set-up cost."""
        spec = self.manifest.input
        middle = np.rint((spec.min + spec.max) / 2.0) if spec.dtype == "uint8" else (spec.min + spec.max) / 2.0
        images = np.full((batch_size, *spec.shape), middle, dtype=np.float32)
        self.score_batch(images)
        logger.info("bundle %s warmed up with a batch of %d", self.name, batch_size)

    @property
    def provider_summary(self) -> str:
        """The active provider of the bundle's sessions (comma-joined when they differ)."""
        return ",".join(sorted(set(self.runner.active_providers.values())))


class NotReadyError(RuntimeError):
    """The service has not loaded and warmed up its bundles yet (or is shutting down)."""


class UnknownModelError(LookupError):
    """No served model has the requested name (code `model_not_found`) or version (`version_not_found`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EngineRegistry:
    """The engines this process serves, by bundle name; the first one is the default model."""

    def __init__(self, engines: list[Engine]) -> None:
        if not engines:
            raise ValueError("at least one engine is needed")
        self.engines: dict[str, Engine] = {}
        for engine in engines:
            if engine.name in self.engines:
                raise BundleError(f"two bundles are named {engine.name!r}; bundle names must be unique")
            self.engines[engine.name] = engine
        self.default_name = engines[0].name

    @property
    def default(self) -> Engine:
        return self.engines[self.default_name]

    def get(self, name: str) -> Engine | None:
        return self.engines.get(name)

    def require(self, name: str, version: str | None = None) -> Engine:
        """The engine serving `name` (and `version` when given); UnknownModelError naming what is served."""
        engine = self.engines.get(name)
        if engine is None:
            raise UnknownModelError("model_not_found", f"no model named {name!r}; served models: {sorted(self.engines)}")
        if version is not None and version != engine.version:
            raise UnknownModelError("version_not_found", f"model {name!r} has version {engine.version!r}, not {version!r}")
        return engine

    def __iter__(self) -> Iterator[Engine]:
        return iter(self.engines.values())


def load_registry(bundle_directories: list[Path], options: RuntimeOptions) -> EngineRegistry:
    """Load and verify every bundle (the first is the default model)."""
    return EngineRegistry([Engine.load(directory, options) for directory in bundle_directories])
