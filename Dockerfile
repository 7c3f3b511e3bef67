# oodserve images. Two targets, neither contains torch:
#   docker build --target cpu -t oodserve:cpu .   python:3.11-slim + onnxruntime
#   docker build --target gpu -t oodserve:gpu .   CUDA 12 + cuDNN 9 runtime + onnxruntime-gpu (run with --gpus all)
# Both run as uid 10001, write only under /tmp (docker run --read-only --tmpfs /tmp works) and serve the bundle
# named by --build-arg BUNDLE (a directory of models/bundles/) on port 8000.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- CPU: build the virtual environment
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# The oodserve package: service/ (the runtime) and models/ (`oodserve.models`, the torch side, inert without the
# train extra: torch is never installed here). benchmarks/ and tests/ stay out of the image.
COPY service ./service
COPY models ./models
COPY deploy/docker/install-runtime.sh ./deploy/docker/install-runtime.sh
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
COPY deploy/docker/install-runtime.sh ./deploy/docker/install-runtime.sh
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
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin oodserve
COPY --from=cpu-build /opt/oodserve /opt/oodserve
WORKDIR /app
COPY models/bundles ./models/bundles
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
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin oodserve
COPY --from=gpu-build /opt/oodserve /opt/oodserve
WORKDIR /app
COPY models/bundles ./models/bundles
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["oodserve", "serve"]
