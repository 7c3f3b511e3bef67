"""Commands that live outside the runtime package, registered only when their packages are installed:

- the torch-side training, export, bundle and evaluation commands (`models.cli`) with the `train` extra;
- `oodserve bench` (`benchmarks.cli`) with the `dev` extra.

"Installed" is decided by whether the package can be found, never by catching ImportError: a package
that is installed but fails to import is an error the user sees, not a silently missing command.
"""

from __future__ import annotations

import importlib.util

import typer


def is_installed(module: str) -> bool:
    """True when `module` can be imported from this environment (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module in sys.modules without a spec
        return False


def register_optional_commands(app: typer.Typer) -> None:
    """Attach the training commands when torch is installed and `bench` when the benchmarks are."""
    if is_installed("torch") and is_installed("models"):
        from models.cli import register as register_training

        register_training(app)
    if is_installed("benchmarks"):
        from benchmarks.cli import register as register_bench

        register_bench(app)
