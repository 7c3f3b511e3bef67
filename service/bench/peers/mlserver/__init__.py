"""MLServer as a peer of oodserve: a custom runtime (runtime.py, imported by MLServer from its own venv),
its settings, and install.sh. Nothing here is imported by oodserve itself."""
