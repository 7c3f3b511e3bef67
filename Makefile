# The two commands: `make run` serves the default bundle, `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# The trained default bundle; until it exists `make run` serves the closed-form demo bundle (models/build/demo.py).
TRAINED_BUNDLE := models/bundles/fashion-mnist
DEMO_BUNDLE := models/bundles/demo
BUNDLE ?= $(if $(wildcard $(TRAINED_BUNDLE)/manifest.json),$(TRAINED_BUNDLE),$(DEMO_BUNDLE))
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
MNIST_DIR ?= ../shared/data/mnist

.PHONY: run test install-serve install-test system-deps import-tree bundle demo-bundle image-cpu image-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install-serve: $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu]'

install-test: $(BIN)/python system-deps
	$(BIN)/pip install -q -e '.[cpu,train,dev,batch]'

# Debian packages the tests use: the Fashion-MNIST data, a real Prometheus (promtool), headless Chromium with its driver,
# redis-server (the shared drift store), and podman with runc and debootstrap (the real image build and container in
# tests/deploy/test_docker_image.py, through deploy/docker/build-local.sh). Installed only when one is missing.
SYSTEM_PACKAGES := dataset-fashion-mnist prometheus chromium chromium-driver redis-server podman runc debootstrap
SYSTEM_COMMANDS := promtool chromedriver redis-server podman runc /usr/sbin/debootstrap
system-deps:
	@if [ ! -d $(FMNIST_DIR) ] || ! (for tool in $(SYSTEM_COMMANDS); do command -v $$tool >/dev/null || exit 1; done); then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; fi; \
	fi

run: install-serve
	$(BIN)/oodserve serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

# The installed layout for the static tools: `oodserve` is service/, `oodserve.models` is models/ (pyproject's
# package-dir). A tree of real folders and symlinked files, so mypy and import-linter see exactly the import names.
IMPORT_TREE := build/import-tree
import-tree:
	rm -rf $(IMPORT_TREE) && mkdir -p $(IMPORT_TREE)
	cp -rs $(CURDIR)/service $(IMPORT_TREE)/oodserve
	cp -rs $(CURDIR)/models $(IMPORT_TREE)/oodserve/models

# Lint (ruff: pyflakes, pycodestyle, import order, pyupgrade, bugbear), type check (mypy on oodserve), the layering
# contracts (import-linter, pyproject's [tool.importlinter]), the docs site (strict), then the tests.
test: install-test import-tree
	$(BIN)/ruff check .
	$(BIN)/mypy
	cd $(IMPORT_TREE) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports --config $(CURDIR)/pyproject.toml
	$(BIN)/mkdocs build --strict -f docs/mkdocs.yml
	$(BIN)/python -m pytest -q

bundle: install-test
	$(BIN)/oodserve build-bundle --data $(FMNIST_DIR) --out $(TRAINED_BUNDLE)

# Rebuild the demo bundle (numpy fits on the Fashion-MNIST training split, seconds).
demo-bundle: install-test
	rm -rf $(DEMO_BUNDLE)
	$(BIN)/python -m oodserve.models.build.demo --data $(FMNIST_DIR) --out $(DEMO_BUNDLE) $(if $(wildcard $(MNIST_DIR)),--ood-data $(MNIST_DIR),)

# Runtime images (Dockerfile targets; no torch inside). BUNDLE_NAME picks the directory of models/bundles/ to serve.
BUNDLE_NAME ?= $(notdir $(BUNDLE))
image-cpu:
	docker build --target cpu --build-arg BUNDLE=$(BUNDLE_NAME) -t oodserve:cpu .

image-gpu:
	docker build --target gpu --build-arg BUNDLE=$(BUNDLE_NAME) -t oodserve:gpu .

clean:
	rm -rf $(VENV) build *.egg-info
