#!/bin/sh
# Install oodserve with exactly one onnxruntime flavour into a fresh virtual environment and check that torch is
# absent. Both Docker targets run this, and tests/deploy/test_docker.py runs it on the host the same way.
# usage: install-runtime.sh VENV cpu|gpu [SOURCE_DIR]   (PYTHON picks the interpreter, default python3)
set -eu
venv="$1"
flavour="$2"
source_dir="${3:-.}"
case "$flavour" in
  cpu | gpu) ;;
  *) echo "install-runtime.sh: flavour must be cpu or gpu, got '$flavour'" >&2; exit 2 ;;
esac
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
# `cpu` pulls onnxruntime, `gpu` onnxruntime-gpu: they share one module, so never both. No torch in either.
"$venv/bin/python" -m pip install --quiet "${source_dir}[${flavour}]"
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "install-runtime.sh: torch ended up in $venv; the runtime image must not contain it" >&2
  exit 1
fi
"$venv/bin/python" -c "import onnxruntime, oodserve.server.app; print('oodserve runtime ok: onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
