"""Repository-wide pytest fixtures: the checkout root, the standard test bundle, apps and clients on it, the oracle."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oodserve.config import Settings
from oodserve.server.app import create_app
from tests.helpers.bundles import FUSION, assert_results_match, build_bundle, make_models, make_settings, oracle, sample_images

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repository_root() -> Path:
    """The checkout's root directory (where pyproject.toml is)."""
    return REPOSITORY_ROOT


@pytest.fixture(scope="session")
def models() -> dict[str, Any]:
    return make_models(0)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standard test bundle (read-only by convention: copy it before tampering)."""
    return build_bundle(tmp_path_factory.mktemp("bundle") / "test-bundle")


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """build_bundle into a fresh temporary directory: bundle_factory(**options) -> Path."""

    def factory(**options: Any) -> Path:
        return build_bundle(tmp_path_factory.mktemp("custom-bundle") / "bundle", **options)

    return factory


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[TestClient]:
    """A ready TestClient serving the standard test bundle (lifespan run: loaded and warmed up)."""
    with TestClient(create_app(make_settings(bundle_dir))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def score_oracle(models: dict[str, Any]) -> Callable[..., list[dict[str, Any]]]:
    """oracle bound to the fixed models: score_oracle(bundle, images, alpha, fusion=FUSION)."""

    def bound(bundle: Path, images: np.ndarray, alpha: float, fusion: dict[str, Any] = FUSION) -> list[dict[str, Any]]:
        return oracle(models, bundle, images, alpha, fusion)

    return bound


@pytest.fixture(scope="session")
def make_images(models: dict[str, Any]) -> Callable[[int, int], np.ndarray]:
    """make_images(count, seed) -> in-distribution uint8 images (count, 1, 28, 28)."""
    return lambda count, seed: sample_images(models, count, seed)


@pytest.fixture(scope="session")
def results_match() -> Callable[..., None]:
    return assert_results_match


@pytest.fixture(scope="session")
def settings_for() -> Callable[..., Settings]:
    """settings_for(bundle, **overrides) -> small-limit Settings for a test app."""
    return make_settings
