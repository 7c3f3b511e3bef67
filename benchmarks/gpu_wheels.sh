#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs, for a GPU machine that reaches no package index:
#   bash benchmarks/gpu_wheels.sh 3.12 .whl [--with-onnxruntime-gpu]
# Then carry DIR to that machine and run GPU_CHECK_WHEELS=DIR bash benchmarks/gpu_check.sh. The onnxruntime-gpu
# wheel (and the CUDA / cuDNN libraries it loads) is several hundred MB: fetch it only where it can travel;
# a machine whose Python already has an onnxruntime with CUDAExecutionProvider needs neither.
set -euo pipefail
version="${1:?python version, e.g. 3.12}"
dir="${2:?wheel folder}"
shift 2
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
requirements=(fastapi "uvicorn[standard]" pydantic pydantic-settings numpy orjson Pillow prometheus-client typer python-multipart httpx
              sortedcontainers fastapi-offline grpcio protobuf setuptools wheel)
if [ "${1:-}" = --with-onnxruntime-gpu ]; then requirements+=(onnxruntime-gpu); fi
python3 -m pip download -q --only-binary=:all: --python-version "$version" --implementation cp "${platforms[@]}" -d "$dir" "${requirements[@]}"
ls "$dir" | wc -l
