#!/usr/bin/env bash
# Install MLServer 1.7.1 into its own virtual environment for the peer-server comparison
# (service/bench/peers/compare.py), apart from oodserve's venv so neither's pins disturb the other.
#
#   bash service/bench/peers/mlserver/install.sh [VENV_DIR]     (default: service/bench/peers/mlserver/.venv)
#
# Pins and why:
# - uvloop==0.21.0: with uvloop >= 0.22 MLServer 1.7.1's parallel inference workers die at start-up
#   (SeldonIO/MLServer issue 2286).
# - httptools: without it uvicorn falls back to the pure-Python h11 parser, which would make the
#   MLServer rows measure a slower HTTP parser rather than the server.
# - onnxruntime: the same version as oodserve's venv when that venv is there, so both servers run the
#   same kernels; otherwise the newest one PyPI has for this Python.
# Uses the Python of oodserve's venv (3.11) unless $PYTHON names another.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="$(realpath -m "${1:-$here/.venv}")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi

ort_pin="onnxruntime"
if [[ -x "$repo/.venv/bin/python" ]]; then
    ort_version="$("$repo/.venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || true)"
    if [[ -n "$ort_version" ]]; then ort_pin="onnxruntime==$ort_version"; fi
fi

# The venv must never be committed: refuse a path inside the repository that git does not ignore.
case "$venv/" in
    "$repo"/*)
        # The trailing slash marks a folder, so that ignore rules for folders (.venv/) apply before it exists.
        if ! git -C "$repo" check-ignore -q "$venv/"; then
            echo "refusing: $venv is inside the repository but not git-ignored" >&2
            exit 1
        fi
        ;;
esac

started=$(date +%s)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "mlserver==1.7.1" "uvloop==0.21.0" httptools "$ort_pin" numpy
"$venv/bin/python" - <<'PY'
import importlib.metadata as metadata
for name in ("mlserver", "uvloop", "httptools", "uvicorn", "onnxruntime", "numpy"):
    print(f"{name}=={metadata.version(name)}")
PY
echo "installed into $venv in $(( $(date +%s) - started )) s"
