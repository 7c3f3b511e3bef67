"""The bundle manifest (manifest.json): a pydantic schema, version 1, with cross-reference checks."""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from oodserve.bundle.calibration import CONDITIONAL_KEY, FUSED_CALIBRATION_KEY, HELD_OUT_PREFIX, fold_name
from oodserve.bundle.preprocess import BackboneSpec
from oodserve.bundle.signals import PARAMETERS_FILE_KEY, SignalSource, signal_kinds

SCHEMA_VERSION = 1
MANIFEST_FILE_NAME = "manifest.json"
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class StrictModel(BaseModel):
    """Base: unknown keys are refused so a typo in a manifest is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(StrictModel):
    """Per-instance input: shape without the batch axis, dtype of the raw values, value range, layout, and
    for feature vectors (shape [D]) the names of the D features."""

    shape: list[int] = Field(min_length=1)
    dtype: Literal["uint8", "float32"]
    min: float
    max: float
    layout: str = "NCHW"
    features: list[str] | None = None
    resize: Literal["none", "resize", "center_crop"] | None = None
    """Image files (PNG/JPEG) of another size are brought to `shape` on decoding (backbone bundles declare this:
    `oodserve.bundle.preprocess`); None or "none" refuses them."""
    crop_fraction: float | None = Field(None, gt=0.0, le=1.0)

    @model_serializer(mode="wrap")
    def _omit_unset_resize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Bundles that declare no resize keep the manifest JSON they always had (no `resize`/`crop_fraction` keys)."""
        data: dict[str, Any] = handler(self)
        for key in ("resize", "crop_fraction"):
            if data.get(key, 0) is None:
                del data[key]
        return data

    @field_validator("shape")
    @classmethod
    def _positive_dimensions(cls, shape: list[int]) -> list[int]:
        if any(dimension <= 0 for dimension in shape):
            raise ValueError(f"every dimension must be positive, got {shape}")
        return shape

    @model_validator(mode="after")
    def _ordered_range(self) -> InputSpec:
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise ValueError(f"input range needs finite min < max, got min={self.min} max={self.max}")
        if self.features is not None and (len(self.shape) != 1 or len(self.features) != self.shape[0]):
            raise ValueError(f"features names one value per feature of a vector input: {len(self.features)} names for shape {self.shape}")
        return self


class ModelSpec(StrictModel):
    """One ONNX model of the bundle: its file and the exact names of its inputs and outputs."""

    file: str
    inputs: list[str] = Field(min_length=1, max_length=1)
    outputs: list[str] = Field(min_length=1)


class ClassifierSpec(StrictModel):
    """Which model output holds the (N, C) class logits used for `prediction`."""

    model: str
    logits: str


class SignalSpec(StrictModel):
    """One OOD signal: a registered kind applied to a model output (higher = more OOD)."""

    name: str = Field(pattern=_NAME_PATTERN)
    kind: str
    model: str
    output: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        known = signal_kinds()
        if kind not in known:
            raise ValueError(f"unknown signal kind {kind!r}; known kinds: {sorted(known)}")
        return kind


class CalibrationSpec(StrictModel):
    """How the bundle's p-values are calibrated, and the .npz of calibration scores (docs/pages/bundle.md).

    - method `split`: one 1-D float64 array per signal plus `__fused__`, from two disjoint held-out splits;
    - method `cross_conformal`: K = `folds` fold models; signals are named `<signal>.fold<k>` and the fusion names the
      `<signal>` part; per fold signal its standardising scores, `__held_out__.<fold signal>`, and `__fused__.fold<k>`
      (Vovk 2015; Barber et al. 2021; Hennhöfer and Preisach 2024);
    - guarantee `conditional` (split only) with `delta`: `__conditional__` (m + 1,) maps the fused p-value to one whose
      false-positive rate is at most alpha, for every alpha at once, with probability >= 1 - delta over the calibration
      draw (Bates et al. 2023).
    `statement` says the guarantee in words, `minimum_alpha` the smallest alpha that can flag an input.
    """

    file: str
    method: Literal["split", "cross_conformal"] = "split"
    folds: int | None = Field(None, ge=2, le=50)
    guarantee: Literal["marginal", "conditional"] = "marginal"
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    statement: str = ""
    minimum_alpha: float | None = Field(None, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationSpec:
        if (self.method == "cross_conformal") != (self.folds is not None):
            raise ValueError("calibration.folds is given exactly when calibration.method is 'cross_conformal'")
        if (self.guarantee == "conditional") != (self.delta is not None):
            raise ValueError("calibration.delta is given exactly when calibration.guarantee is 'conditional'")
        if self.guarantee == "conditional" and self.method != "split":
            raise ValueError("the conditional guarantee applies to split calibration only")
        return self

    def fold_names(self, name: str) -> list[str]:
        """The fold signals (or models) of `name`: `[name]` for split calibration."""
        return [name] if self.folds is None else [fold_name(name, fold) for fold in range(self.folds)]


class FusionSpec(StrictModel):
    """The fusion rule: method over the named signals, and why these signals."""

    method: Literal["fisher", "min_p"]
    signals: list[str] = Field(min_length=1)
    reason: str = ""


class SamplerSpec(StrictModel):
    """The flow's generative graph: standard-normal latents `input` (N, *latent_shape) -> images `output`."""

    file: str
    input: str
    output: str
    latent_shape: list[int] = Field(min_length=1)


class BatchTypicalitySpec(StrictModel):
    """Batch typicality test (Nalisnick et al. 2019b) over a bits/dim signal; `parameters_file` holds
    `reference_bpd`, held-out in-distribution bits/dim, partitioned into disjoint reference batches."""

    signal: str
    entropy_bpd: float
    parameters_file: str
    n_bootstrap: int = Field(2000, ge=100, le=100000, description="Unused since the test became conformal; kept so older bundles load.")


class Provenance(BaseModel):
    """Where the bundle came from; free-form extra keys are allowed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data: str
    seed: int | None = None
    code_version: str
    created: str


class Manifest(StrictModel):
    """manifest.json, schema version 1 (docs/pages/bundle.md describes every field)."""

    schema_version: int
    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(min_length=1)
    description: str = ""
    input: InputSpec
    labels: list[str] | None = None
    files: dict[str, str]
    models: dict[str, ModelSpec] = Field(min_length=1)
    classifier: ClassifierSpec | None = None
    signals: list[SignalSpec] = Field(min_length=1)
    calibration: CalibrationSpec
    fusion: FusionSpec
    default_alpha: float = Field(gt=0.0, lt=1.0)
    provenance: Provenance
    sampler: SamplerSpec | None = None
    batch_typicality: BatchTypicalitySpec | None = None
    backbone: BackboneSpec | None = None
    """A backbone bundle: the user's classifier composed with the heads, and its declared preprocessing."""

    @field_validator("schema_version")
    @classmethod
    def _supported_version(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {version}; this service reads schema_version {SCHEMA_VERSION}")
        return version

    @field_validator("files")
    @classmethod
    def _plain_names_and_hashes(cls, files: dict[str, str]) -> dict[str, str]:
        for file_name, digest in files.items():
            path = PurePosixPath(file_name)
            if path.is_absolute() or ".." in path.parts or "\\" in file_name or file_name in ("", "."):
                raise ValueError(f"file name {file_name!r} must be a relative path inside the bundle")
            if file_name == MANIFEST_FILE_NAME:
                raise ValueError(f"{MANIFEST_FILE_NAME} must not list itself in files")
            if not _SHA256_PATTERN.match(digest):
                raise ValueError(f"sha256 of {file_name!r} must be 64 lowercase hex digits, got {digest!r}")
        return files

    @model_validator(mode="after")
    def _cross_references(self) -> Manifest:
        def require_output(model: str, output: str, where: str) -> None:
            if model not in self.models:
                raise ValueError(f"{where} names model {model!r}, which is not in models {sorted(self.models)}")
            if output not in self.models[model].outputs:
                raise ValueError(
                    f"{where} names output {output!r} of model {model!r}, whose outputs are {self.models[model].outputs}"
                )

        for model_name, model in self.models.items():
            if model.file not in self.files:
                raise ValueError(f"model {model_name!r} file {model.file!r} is not listed in files")
        if self.calibration.file not in self.files:
            raise ValueError(f"calibration file {self.calibration.file!r} is not listed in files")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.classifier is not None:
            require_output(self.classifier.model, self.classifier.logits, "classifier")
        names = [signal.name for signal in self.signals]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"signal names must be unique, repeated: {duplicates}")
        reserved = [name for name in names if name.startswith(("__", HELD_OUT_PREFIX)) or name in (FUSED_CALIBRATION_KEY, CONDITIONAL_KEY)]
        if reserved:
            raise ValueError(f"signal names starting with '__' are reserved for calibration arrays: {reserved}")
        for signal in self.signals:
            where = f"signal {signal.name!r}"
            require_output(signal.model, signal.output, where)
            kind = signal_kinds()[signal.kind]
            missing = [key for key in kind.required_params if key not in signal.params]
            if missing:
                raise ValueError(f"{where} of kind {signal.kind!r} needs params {missing}")
            try:
                if kind.validate is not None:
                    kind.validate(signal.params, self.input.shape)
                extra_sources = kind.extra_sources(signal.params)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
            for source in extra_sources:
                require_output(source.model, source.output, where)
            parameters_file = signal.params.get(PARAMETERS_FILE_KEY)
            if parameters_file is not None and parameters_file not in self.files:
                raise ValueError(f"{where}: parameters file {parameters_file!r} is not listed in files")
        if self.sampler is not None and self.sampler.file not in self.files:
            raise ValueError(f"sampler file {self.sampler.file!r} is not listed in files")
        if self.batch_typicality is not None:
            test = self.batch_typicality
            kinds = {signal.name: signal.kind for signal in self.signals}
            if kinds.get(test.signal) != "bits_per_dim":
                raise ValueError(f"batch_typicality.signal {test.signal!r} must name a signal of kind 'bits_per_dim'")
            if test.parameters_file not in self.files:
                raise ValueError(f"batch_typicality parameters file {test.parameters_file!r} is not listed in files")
        groups = self.signal_groups()
        if sorted(sum(groups.values(), [])) != sorted(names):
            strays = sorted(set(names) - set(sum(groups.values(), [])))
            raise ValueError(f"a cross-conformal bundle names every signal <signal>.fold<k> for k < {self.calibration.folds}, "
                             f"each signal in every fold; these do not fit: {strays}")
        unknown = [name for name in self.fusion.signals if name not in groups]
        if unknown:
            raise ValueError(f"fusion names unknown signals {unknown}; declared signals: {sorted(groups)}")
        if len(set(self.fusion.signals)) != len(self.fusion.signals):
            raise ValueError("fusion signals must be unique")
        return self

    def signal_groups(self) -> dict[str, list[str]]:
        """Reported signal -> the declared signals it is computed from: itself for split calibration, its K fold
        signals `<signal>.fold<k>` (all present) for a cross-conformal bundle."""
        names = [signal.name for signal in self.signals]
        if self.calibration.folds is None:
            return {name: [name] for name in names}
        suffix = ".fold0"
        bases = [name[: -len(suffix)] for name in names if name.endswith(suffix)]
        return {base: self.calibration.fold_names(base) for base in bases if all(n in names for n in self.calibration.fold_names(base))}

    def signal_sources(self) -> dict[str, list[SignalSource]]:
        """For each ONNX model the outputs that signals or the classifier read (all declared models appear)."""
        needed: dict[str, list[SignalSource]] = {name: [] for name in self.models}
        for signal in self.signals:
            for source in [SignalSource(signal.model, signal.output), *signal_kinds()[signal.kind].extra_sources(signal.params)]:
                if source not in needed[source.model]:
                    needed[source.model].append(source)
        if self.classifier is not None:
            source = SignalSource(self.classifier.model, self.classifier.logits)
            if source not in needed[source.model]:
                needed[source.model].append(source)
        return needed
