"""The serving side never imports torch, not even through the CLI's optional torch-side commands."""

from __future__ import annotations

import subprocess
import sys


def test_service_modules_do_not_import_torch(repository_root) -> None:
    code = (
        "import sys\n"
        "import oodserve.server.app, oodserve.cli, oodserve.engine\n"
        "from oodserve.server.app import create_app\n"
        "create_app()\n"
        "loaded = sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.'))\n"
        "print(loaded)\n"
        "assert not loaded, loaded\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=repository_root, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == "[]"
