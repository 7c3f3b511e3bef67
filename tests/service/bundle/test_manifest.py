"""Manifest schema: a valid manifest parses; unknown versions, kinds and references are refused with a reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from oodserve.bundle.loader import BundleError, parse_manifest
from oodserve.bundle.manifest import Manifest
from oodserve.scoring.signals import SignalSource


@pytest.fixture
def manifest_json(bundle_dir: Path) -> dict[str, Any]:
    return json.loads((bundle_dir / "manifest.json").read_text())


def refused(raw: dict[str, Any]) -> str:
    with pytest.raises(BundleError) as caught:
        parse_manifest(raw, "manifest.json")
    return str(caught.value)


def test_valid_manifest_round_trips(manifest_json: dict[str, Any]) -> None:
    manifest = parse_manifest(manifest_json, "manifest.json")
    assert manifest.schema_version == 1
    assert manifest.input.shape == [1, 28, 28]
    assert manifest.models["sngp"].outputs == ["logits", "variance", "features"]
    assert Manifest.model_validate(manifest.model_dump(mode="json")) == manifest
    assert manifest.signal_sources()["background"] == [SignalSource("background", "log_prob")]


def test_unknown_schema_version_is_refused(manifest_json: dict[str, Any]) -> None:
    manifest_json["schema_version"] = 2
    assert "unsupported schema_version 2" in refused(manifest_json)
    del manifest_json["schema_version"]
    assert "unsupported schema_version None" in refused(manifest_json)


def test_unknown_signal_kind_is_refused(manifest_json: dict[str, Any]) -> None:
    manifest_json["signals"][0]["kind"] = "vibes"
    message = refused(manifest_json)
    assert "unknown signal kind 'vibes'" in message and "typicality" in message


def test_fusion_naming_an_unknown_signal_is_refused(manifest_json: dict[str, Any]) -> None:
    manifest_json["fusion"]["signals"] = ["typicality", "not_a_signal"]
    assert "fusion names unknown signals ['not_a_signal']" in refused(manifest_json)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m["signals"][0].update(model="nope"), "names model 'nope'"),
        (lambda m: m["signals"][0].update(output="nope"), "names output 'nope'"),
        (lambda m: m["signals"][1].update(params={}), "needs params ['entropy_bpd']"),
        (lambda m: m["signals"][1].update(params={"entropy_bpd": "high"}), "params.entropy_bpd must be a finite number"),
        (lambda m: m["signals"][2]["params"].update(background_model="ghost"), "names model 'ghost'"),
        (lambda m: m["signals"].append(copy.deepcopy(m["signals"][0])), "signal names must be unique"),
        (lambda m: m.update(classifier={"model": "sngp", "logits": "probs"}), "names output 'probs'"),
        (lambda m: m["files"].update({"flow.onnx": "abc"}), "64 lowercase hex"),
        (lambda m: m["files"].update({"../escape.onnx": "0" * 64}), "relative path inside the bundle"),
        (lambda m: m.update(default_alpha=1.5), "default_alpha"),
        (lambda m: m["fusion"].update(method="average"), "fusion.method"),
        (lambda m: m.update(surprise=True), "surprise"),
        (lambda m: m["input"].update(min=300), "min < max"),
        (lambda m: m["models"]["flow"].update(file="missing.onnx"), "not listed in files"),
    ],
)
def test_inconsistent_manifests_are_refused(manifest_json: dict[str, Any], edit: Any, expected: str) -> None:
    edit(manifest_json)
    assert expected in refused(manifest_json)


def test_provenance_allows_extra_fields(manifest_json: dict[str, Any]) -> None:
    manifest_json["provenance"]["gpu"] = "none"
    assert parse_manifest(manifest_json, "manifest.json").provenance.model_extra == {"gpu": "none"}
