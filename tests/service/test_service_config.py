"""Settings come from OODSERVE_* environment variables; lists accept commas or JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from oodserve.config import Settings


def test_environment_variables_with_the_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODSERVE_BUNDLE", "/srv/bundle")
    monkeypatch.setenv("OODSERVE_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("OODSERVE_EXTRA_BUNDLES", '["/a", "/b"]')
    monkeypatch.setenv("OODSERVE_REQUIRE_GPU", "true")
    monkeypatch.setenv("OODSERVE_MAX_BATCH_INSTANCES", "32")
    settings = Settings()
    assert settings.bundle == Path("/srv/bundle")
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.extra_bundles == [Path("/a"), Path("/b")]
    assert settings.require_gpu is True
    assert settings.max_batch_instances == 32


def test_defaults_and_explicit_values_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OODSERVE_BUNDLE", raising=False)
    monkeypatch.setenv("OODSERVE_PORT", "9000")
    assert Settings().bundle == Path("models/bundles/fashion-mnist")
    assert Settings().providers is None
    assert Settings(port=8001).port == 8001


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODSERVE_INTRA_OP_THREADS", "-1")
    with pytest.raises(ValidationError):
        Settings()
