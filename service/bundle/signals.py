"""What a bundle's manifest says about its signals, independent of how they are scored: where a signal reads its
model output (`SignalSource`), the param naming its parameters file, and the contract every signal kind offers the
manifest's validation (`SignalContract`: required params, a params check, extra model outputs).

The kinds themselves are implemented in `oodserve.scoring.signals` (a layer above this one) and found here as
plugins: every object registered under the entry-point group `oodserve.signal_kinds` is a mapping of kind name ->
contract (oodserve's own kinds are `oodserve.scoring.signals:SIGNAL_KINDS`; another package can add kinds the same
way). So the bundle layer validates manifests against every installed kind without importing the scoring layer.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Protocol

SIGNAL_KINDS_GROUP = "oodserve.signal_kinds"
PARAMETERS_FILE_KEY = "parameters_file"
"""A signal param naming a bundle `.npz` of fitted arrays; the loader verifies it, and its arrays reach the kind's
score function as `arrays` (name -> ndarray; `SignalDefinition.arrays`)."""


@dataclass(frozen=True)
class SignalSource:
    """Which ONNX model output a signal reads (the manifest's `model` and `output`)."""

    model: str
    output: str


class SignalContract(Protocol):
    """What the manifest's validation needs of a signal kind."""

    @property
    def required_params(self) -> tuple[str, ...]: ...

    @property
    def extra_sources(self) -> Callable[[Mapping[str, Any]], list[SignalSource]]: ...

    @property
    def validate(self) -> Callable[[Mapping[str, Any], Sequence[int]], None] | None: ...


@cache
def signal_kinds() -> Mapping[str, SignalContract]:
    """Every installed signal kind by name (a live view: kinds registered later in a loaded registry appear too)."""
    registries = [entry.load() for entry in entry_points(group=SIGNAL_KINDS_GROUP)]
    if not registries:
        raise RuntimeError(
            f"no signal kinds are installed (entry-point group {SIGNAL_KINDS_GROUP!r} is empty): install oodserve "
            "(pip install -e . in a checkout) rather than running it from a source folder on PYTHONPATH"
        )
    return ChainMap(*registries)
