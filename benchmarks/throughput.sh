#!/usr/bin/env bash
# Throughput benchmark of issue 6: one `oodserve bench` run (raw onnxruntime limit, then the service over
# loopback with dynamic batching and naively, JSON and .npy bodies, concurrency 1/4/16/64), saved as
# benchmarks/results/throughput-<bundle>.{txt,json}. Run it on an otherwise idle machine.
#   benchmarks/throughput.sh [BUNDLE_DIR] [extra `oodserve bench` options...]
set -euo pipefail
cd "$(dirname "$0")/.."
default_bundle=models/bundles/fashion-mnist
[ -d "$default_bundle" ] || default_bundle=models/bundles/demo
bundle=${1:-$default_bundle}
shift || true
images=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
image_option=()
[ -f "$images" ] && image_option=(--images "$images")
name=$(basename "$bundle")
mkdir -p benchmarks/results
.venv/bin/oodserve bench --bundle "$bundle" "${image_option[@]}" --requests 1000 --warmup-requests 100 --images-per-request 1,8,32 \
    --raw-seconds 6 --json-out "benchmarks/results/throughput-$name.json" "$@" | tee "benchmarks/results/throughput-$name.txt"
