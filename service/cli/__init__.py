"""The `oodserve` command line (`service.cli:app`; `python -m service.cli`)."""

from service.cli.main import app

__all__ = ["app"]
