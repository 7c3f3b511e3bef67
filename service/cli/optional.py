"""Commands whose dependencies are optional extras, registered only when those are installed:

- the torch-side training, export, bundle and evaluation commands (`oodserve.models.cli`) with the `train` extra;
- `oodserve bench` (`oodserve.bench.cli`, the serving load and peer tools) with the `dev` extra (aiohttp);
- `oodserve score` (`oodserve.batch.cli`, offline scoring on Ray Data) with the `batch` extra (ray, pyarrow).

This is the one documented place where the runtime reaches the optional packages: by module name, through
importlib, so the layering contracts (import-linter: the runtime never imports `oodserve.models`) hold.
"Installed" is decided by whether the extra's packages can be found, never by catching ImportError: a
package that is installed but fails to import is an error the user sees, not a silently missing command.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

OPTIONAL_COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("oodserve.models.cli", ("torch",)),
    ("oodserve.bench.cli", ("aiohttp",)),
    ("oodserve.batch.cli", ("ray", "pyarrow")),
)
"""(module with a `register(app)` function, the third-party packages its extra installs)."""


def is_installed(module: str) -> bool:
    """True when `module` can be imported from this environment (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module in sys.modules without a spec
        return False


def register_optional_commands(app: typer.Typer) -> None:
    """Attach the training commands when torch is installed and `bench` when its load client is."""
    for module, requirements in OPTIONAL_COMMANDS:
        if all(is_installed(package) for package in requirements):
            importlib.import_module(module).register(app)
