"""Training and bench commands are registered when their packages are installed; a broken import is an error."""

from __future__ import annotations

import sys

import pytest
import typer

from oodserve.cli import optional


def command_names(app: typer.Typer) -> set[str]:
    names = {command.name or command.callback.__name__ for command in app.registered_commands if command.callback is not None}
    return names | {group.name for group in app.registered_groups if group.name}


def test_installed_packages_add_their_commands() -> None:
    app = typer.Typer()
    optional.register_optional_commands(app)
    assert {"train", "export", "build-bundle", "eval", "bench"} <= command_names(app)


def test_without_torch_the_training_commands_are_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optional, "is_installed", lambda module: module != "torch")
    app = typer.Typer()
    optional.register_optional_commands(app)
    names = command_names(app)
    assert "bench" in names and not {"train", "export", "build-bundle", "eval"} & names


def test_a_broken_models_import_is_an_error_not_a_missing_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "oodserve.models.cli", None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match="oodserve.models.cli"):
        optional.register_optional_commands(typer.Typer())


def test_is_installed_finds_packages_without_importing_them() -> None:
    assert optional.is_installed("numpy") and not optional.is_installed("no_such_package_here")
