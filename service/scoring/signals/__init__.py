"""OOD signal kinds, one per module, all behind one registry (`SIGNAL_KINDS`, see `base`).

Importing this package registers every kind.
"""

from oodserve.scoring.signals import (  # noqa: F401 - each module registers its kind
    bits_per_dim,
    feature_density,
    input_complexity,
    likelihood_ratio,
    max_softmax,
    model_output,
    typicality,
)
from oodserve.scoring.signals.base import (
    PARAMETERS_FILE_KEY,
    SIGNAL_KINDS,
    FittedSignal,
    ModelOutputs,
    SignalKind,
    SignalSource,
    bits_per_dim_from_log_prob,
    per_instance_values,
    read_output,
    register_signal_kind,
    softmax,
)
from oodserve.scoring.signals.input_complexity import png_length_bits

__all__ = [
    "PARAMETERS_FILE_KEY",
    "SIGNAL_KINDS",
    "FittedSignal",
    "ModelOutputs",
    "SignalKind",
    "SignalSource",
    "bits_per_dim_from_log_prob",
    "per_instance_values",
    "png_length_bits",
    "read_output",
    "register_signal_kind",
    "softmax",
]
