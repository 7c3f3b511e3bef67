"""Repository-wide pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repository_root() -> Path:
    """The checkout's root directory (where pyproject.toml is)."""
    return REPOSITORY_ROOT
