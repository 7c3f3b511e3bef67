#!/usr/bin/env bash
# GPU check of the shipped bundle (benchmarks/gpu_check.py says what it measures), one script, under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # on a CUDA machine; figures in OUT_DIR/gpu-check.json
#
# It installs the runtime with the `gpu` extra into a fresh venv ($GPU_CHECK_VENV, default /tmp/oodserve-gpu-venv):
#   - from the package index when one is reachable;
#   - else from a folder of wheels fetched beforehand for that machine's platform and Python, given as
#     GPU_CHECK_WHEELS=DIR (made on a machine with an index by benchmarks/gpu_wheels.sh PYTHON_VERSION DIR);
#   - a Python whose own onnxruntime already has CUDAExecutionProvider is used as it is (the venv sees its
#     site-packages) and only oodserve's other needs are installed.
# GPU_CHECK_CUDA_LIBS=0 skips NVIDIA's CUDA / cuDNN wheels (when the machine has those libraries installed).
# Data: FMNIST_DIR (Fashion-MNIST IDX files, default /usr/share/datasets/fashion-mnist) and MNIST_DIR
# (default ../shared/data/mnist). GPU_CHECK_ALLOW_CPU=1 dry-runs every step on CPU sessions.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
venv="${GPU_CHECK_VENV:-/tmp/oodserve-gpu-venv}"
started=$(date +%s)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

system_has_cuda_ort=$("$python" -c 'import onnxruntime as o; print(int("CUDAExecutionProvider" in o.get_available_providers()))' 2>/dev/null || echo 0)
rm -rf "$venv"
if [ "$system_has_cuda_ort" = 1 ]; then
  echo "gpu_check: using the onnxruntime with CUDA of $("$python" -c 'import sys; print(sys.executable)')"
  "$python" -m venv --system-site-packages "$venv"
  extra=""
else
  "$python" -m venv "$venv"
  extra="[gpu]"
fi
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] && [ "$system_has_cuda_ort" != 1 ]; then extra="[cpu]"; fi
pip_source=()
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  pip_source=(--no-index --find-links "$GPU_CHECK_WHEELS")
fi
cuda_libraries=()
if [ "$extra" = "[gpu]" ] && [ "${GPU_CHECK_CUDA_LIBS:-1}" = 1 ]; then
  # onnxruntime-gpu loads CUDA and cuDNN from the system or from NVIDIA's wheels; its extras bring the wheels
  cuda_libraries=("onnxruntime-gpu[cuda,cudnn]")
fi
"$venv/bin/python" -m pip install -q "${pip_source[@]}" ".${extra}" "${cuda_libraries[@]}" || {
  echo "gpu_check: installing .${extra} failed; on a machine without a package index set GPU_CHECK_WHEELS (see the header)" >&2
  exit 2
}
echo "gpu_check: installed in $(( $(date +%s) - started )) s"
"$venv/bin/python" -c 'import onnxruntime as o; print("gpu_check: onnxruntime", o.__version__, o.get_available_providers())'
flags=()
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then flags+=(--allow-cpu); fi
timeout 420 "$venv/bin/python" -m oodserve.bench.gpu_check --bundle models/bundles/fashion-mnist --out "$out/gpu-check.json" "${flags[@]}"
echo "gpu_check: done in $(( $(date +%s) - started )) s"
