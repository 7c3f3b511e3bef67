"""The `oodserve` command line (`oodserve.cli:app`; `python -m oodserve.cli`)."""

from oodserve.cli.main import app

__all__ = ["app"]
