# oodserve images. Two targets, neither contains torch:
#   docker build --target cpu -t oodserve:cpu .   python:3.11-slim + onnxruntime
#   docker build --target gpu -t oodserve:gpu .   CUDA 13 + cuDNN 9 runtime + onnxruntime-gpu (run with --gpus all;
#                                                 CUDA 13 needs an NVIDIA driver of the R580 series or newer)
# Both run as uid and gid 10001, write only under /tmp (docker run --read-only --tmpfs /tmp works) and serve the
# bundle named by --build-arg BUNDLE (a directory of models/bundles/, the only one copied) on port 8000.
# Every Python package is installed at the version deploy/docker/constraints.txt pins (the lock; the build prints
# what it installed). No Docker daemon or registry? deploy/docker/build-local.sh builds and runs this with podman.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu from the package index is built for CUDA 13 and cuDNN 9 (install-runtime.sh checks it against the
# base's CUDA_VERSION); the base's CUDA major follows the pinned onnxruntime-gpu.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- CPU: build the virtual environment
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# The oodserve package is service/ (the runtime) and models/ (`oodserve.models`, the training side, importable only
# with the train extra, which no image installs). benchmarks/ and tests/ stay out of the image.
COPY service ./service
COPY models ./models
COPY deploy/docker/install-runtime.sh deploy/docker/constraints.txt ./deploy/docker/
# Bundles are copied into the runtime image on their own, not into site-packages.
RUN sh deploy/docker/install-runtime.sh /opt/oodserve cpu /src

# ---------------------------------------------------------------- GPU: build the virtual environment
FROM ${CUDA_IMAGE} AS gpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3 (3.12 on 24.04); the CUDA base tag pins the distribution, security updates move the versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY deploy/docker/install-runtime.sh deploy/docker/constraints.txt ./deploy/docker/
RUN sh deploy/docker/install-runtime.sh /opt/oodserve gpu /src

# ---------------------------------------------------------------- CPU runtime image
FROM ${PYTHON_IMAGE} AS cpu
ARG BUNDLE=fashion-mnist
ENV PATH=/opt/oodserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    OODSERVE_HOST=0.0.0.0 \
    OODSERVE_PORT=8000 \
    OODSERVE_BUNDLE=/app/models/bundles/${BUNDLE}
RUN groupadd --gid 10001 oodserve \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin oodserve
COPY --from=cpu-build /opt/oodserve /opt/oodserve
WORKDIR /app
COPY models/bundles/${BUNDLE} ./models/bundles/${BUNDLE}
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["oodserve", "serve"]

# ---------------------------------------------------------------- GPU runtime image
FROM ${CUDA_IMAGE} AS gpu
ARG BUNDLE=fashion-mnist
ENV PATH=/opt/oodserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    OODSERVE_HOST=0.0.0.0 \
    OODSERVE_PORT=8000 \
    OODSERVE_BUNDLE=/app/models/bundles/${BUNDLE} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The venv's interpreter is a link to this python3, so it must be the same version as in gpu-build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 oodserve \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin oodserve
COPY --from=gpu-build /opt/oodserve /opt/oodserve
WORKDIR /app
COPY models/bundles/${BUNDLE} ./models/bundles/${BUNDLE}
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["oodserve", "serve"]
