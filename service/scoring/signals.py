"""OOD signal kinds: pure numpy functions of model outputs and raw inputs, one (N,) float64 score each.

Every signal is oriented so that higher means more out-of-distribution. A kind is registered
once in `SIGNAL_KINDS` (use `register_signal_kind`); a manifest that names an unknown kind or
leaves out a required parameter is refused when the bundle loads.

Conventions shared with the exported models (design.md section 3): a flow's `log_prob` is the
log-density in nats of u = (x + 0.5) / 256 on [0, 1]^D, D = prod(per-instance input shape).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

ModelOutputs = Mapping[str, Mapping[str, np.ndarray]]
"""outputs[model_name][output_name] -> array with a leading batch axis N."""


@dataclass(frozen=True)
class SignalSource:
    """Which ONNX model output a signal reads (the manifest's `model` and `output`)."""

    model: str
    output: str


SignalFunction = Callable[[ModelOutputs, np.ndarray, SignalSource, Mapping[str, Any]], np.ndarray]
"""compute(outputs, images (N, *input_shape) float raw scale, source, params) -> (N,) float64."""


@dataclass(frozen=True)
class SignalKind:
    """A registered signal kind: its computation and what a manifest entry must provide.

    required_params: names that must appear in the signal's `params`.
    extra_sources: model outputs read besides the signal's own (for example a background model).
    validate: optional check of (params, per-instance input shape); raises ValueError with a message.
    """

    name: str
    compute: SignalFunction
    description: str
    required_params: tuple[str, ...] = ()
    extra_sources: Callable[[Mapping[str, Any]], list[SignalSource]] = field(default=lambda params: [])
    validate: Callable[[Mapping[str, Any], Sequence[int]], None] | None = None


SIGNAL_KINDS: dict[str, SignalKind] = {}


def register_signal_kind(
    name: str,
    *,
    description: str,
    required_params: tuple[str, ...] = (),
    extra_sources: Callable[[Mapping[str, Any]], list[SignalSource]] | None = None,
    validate: Callable[[Mapping[str, Any], Sequence[int]], None] | None = None,
) -> Callable[[SignalFunction], SignalFunction]:
    """Decorator adding a signal kind to `SIGNAL_KINDS` (refuses a duplicate name)."""

    def decorator(compute: SignalFunction) -> SignalFunction:
        if name in SIGNAL_KINDS:
            raise ValueError(f"signal kind {name!r} is already registered")
        SIGNAL_KINDS[name] = SignalKind(
            name=name,
            compute=compute,
            description=description,
            required_params=required_params,
            extra_sources=extra_sources or (lambda params: []),
            validate=validate,
        )
        return compute

    return decorator


def per_instance_values(array: np.ndarray, what: str) -> np.ndarray:
    """Flatten a model output of shape (N,) or (N, 1, ...) to (N,) float64; refuses (N, K>1)."""
    values = np.asarray(array, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError(f"{what}: expected one value per instance, got a scalar")
    flat = values.reshape(values.shape[0], -1)
    if flat.shape[1] != 1:
        raise ValueError(f"{what}: expected one value per instance, got shape {list(values.shape)}")
    return flat[:, 0]


def read_output(outputs: ModelOutputs, source: SignalSource) -> np.ndarray:
    """The array outputs[source.model][source.output]."""
    return np.asarray(outputs[source.model][source.output])


def _require_number(params: Mapping[str, Any], key: str, *, positive: bool = False) -> None:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"params.{key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"params.{key} must be > 0, got {value!r}")


def dimensions_of(images: np.ndarray) -> int:
    """D = number of values per instance of an (N, *input_shape) batch."""
    return int(np.prod(images.shape[1:]))


def bits_per_dim_from_log_prob(log_prob_nats: np.ndarray, dimensions: int) -> np.ndarray:
    """Discrete 8-bit bits/dim: bpd = -(log p(u) - D ln 256) / (D ln 2); log p(u) in nats on [0,1]^D."""
    log_prob = np.asarray(log_prob_nats, dtype=np.float64)
    return -(log_prob - dimensions * math.log(256.0)) / (dimensions * math.log(2.0))


def png_length_bits(images: np.ndarray) -> np.ndarray:
    """L(x) of Serra et al. 2020: 8 * bytes of the lossless PNG of each 8-bit greyscale image.

    images: (N, H, W) or (N, 1, H, W) in raw 0..255 scale (rounded and clipped to uint8).
    Pillow, optimize off, zlib level 6 (Pillow's default). Returns (N,) float64 bits.
    """
    pixels = np.asarray(images, dtype=np.float64)
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 3:
        raise ValueError(f"PNG length needs (N, H, W) or (N, 1, H, W) images, got shape {list(pixels.shape)}")
    as_bytes = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    lengths = np.empty(as_bytes.shape[0], dtype=np.float64)
    for index, image in enumerate(as_bytes):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
        lengths[index] = 8.0 * buffer.getbuffer().nbytes
    return lengths


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, numerically stable, float64."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - np.max(values, axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / np.sum(exponentials, axis=1, keepdims=True)


@register_signal_kind("bits_per_dim", description="bits/dim of the flow's discrete likelihood (higher = less likely)")
def bits_per_dim_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """bpd(x) from the source log_prob (nats). (N,) float64."""
    log_prob = per_instance_values(read_output(outputs, source), f"{source.model}.{source.output}")
    return bits_per_dim_from_log_prob(log_prob, dimensions_of(images))


def _validate_typicality(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    _require_number(params, "entropy_bpd")


@register_signal_kind(
    "typicality",
    description="|bpd(x) - H_train| (Nalisnick et al. 2019b): distance from the typical set",
    required_params=("entropy_bpd",),
    validate=_validate_typicality,
)
def typicality_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """|bpd(x) - params.entropy_bpd|, the training entropy in bits/dim. (N,) float64."""
    return np.abs(bits_per_dim_signal(outputs, images, source, params) - float(params["entropy_bpd"]))


def _background_sources(params: Mapping[str, Any]) -> list[SignalSource]:
    return [SignalSource(str(params["background_model"]), str(params["background_output"]))]


def _validate_likelihood_ratio(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    for key in ("background_model", "background_output"):
        if not isinstance(params.get(key), str):
            raise ValueError(f"params.{key} must be a string, got {params.get(key)!r}")


@register_signal_kind(
    "likelihood_ratio",
    description="-(log p(x) - log p_bg(x)) in nats (Ren et al. 2019): negated likelihood ratio",
    required_params=("background_model", "background_output"),
    extra_sources=_background_sources,
    validate=_validate_likelihood_ratio,
)
def likelihood_ratio_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """-(log p(x) - log p_bg(x)), both log-densities in nats. (N,) float64."""
    foreground = per_instance_values(read_output(outputs, source), f"{source.model}.{source.output}")
    background_source = _background_sources(params)[0]
    background = per_instance_values(
        read_output(outputs, background_source), f"{background_source.model}.{background_source.output}"
    )
    return -(foreground - background)


def _validate_input_complexity(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    shape = list(input_shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)):
        raise ValueError(f"input_complexity needs greyscale images of shape [H, W] or [1, H, W], input shape is {shape}")


@register_signal_kind(
    "input_complexity",
    description="-log2 p(x) - L(x), L = PNG length in bits (Serra et al. 2020)",
    validate=_validate_input_complexity,
)
def input_complexity_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """bpd(x) * D - L(x) in bits. (N,) float64."""
    bits = bits_per_dim_signal(outputs, images, source, params) * dimensions_of(images)
    return bits - png_length_bits(images)


def _validate_model_output(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    if "sign" in params:
        _require_number(params, "sign")
    if "center" in params:
        _require_number(params, "center")
    if "scale" in params:
        _require_number(params, "scale", positive=True)
    if "two_sided" in params and not isinstance(params["two_sided"], bool):
        raise ValueError(f"params.two_sided must be true or false, got {params['two_sided']!r}")


@register_signal_kind(
    "model_output",
    description="a scalar model output: sign * (y - center), or |y - center| / scale when two_sided",
    validate=_validate_model_output,
)
def model_output_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """Generic scalar output y (for example SNGP variance). params: sign=1, center=0, two_sided=false, scale=1."""
    values = per_instance_values(read_output(outputs, source), f"{source.model}.{source.output}")
    center = float(params.get("center", 0.0))
    if params.get("two_sided", False):
        return np.abs(values - center) / float(params.get("scale", 1.0))
    return float(params.get("sign", 1.0)) * (values - center)


@register_signal_kind("max_softmax", description="1 - max softmax probability of the classifier logits")
def max_softmax_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """1 - max_c softmax(logits)_c; the source is the (N, C) logits output. (N,) float64."""
    logits = np.asarray(read_output(outputs, source), dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"{source.model}.{source.output}: expected (N, C) logits, got shape {list(logits.shape)}")
    return 1.0 - np.max(softmax(logits), axis=1)


PARAMETERS_FILE_KEY = "parameters_file"
"""A signal param naming a bundle `.npz` of fitted arrays; the loader verifies it and passes its
arrays to the kind's compute function as `params["arrays"]` (name -> ndarray)."""


def _validate_feature_density(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    if not isinstance(params.get(PARAMETERS_FILE_KEY), str):
        raise ValueError(f"params.{PARAMETERS_FILE_KEY} must name the bundle's .npz of Gaussian parameters")


@register_signal_kind(
    "feature_density",
    description="-log sum_c pi_c N(f; mu_c, Sigma_c) of classifier features (Mukhoti et al. 2021, DDU)",
    required_params=(PARAMETERS_FILE_KEY,),
    validate=_validate_feature_density,
)
def feature_density_signal(outputs: ModelOutputs, images: np.ndarray, source: SignalSource, params: Mapping[str, Any]) -> np.ndarray:
    """Negative log density of the (N, F) feature output under the fitted class-conditional Gaussians."""
    from service.scoring.feature_density import GaussianMixtureParameters, negative_log_feature_density

    features = np.asarray(read_output(outputs, source), dtype=np.float64)
    features = features.reshape(features.shape[0], -1)
    mixture = GaussianMixtureParameters.from_arrays(params["arrays"], prefix=str(params.get("prefix", "")))
    return negative_log_feature_density(features, mixture)
