#!/bin/sh
# Regenerate deploy/docker/constraints.txt, the lock of the runtime images: resolve oodserve[cpu] from the package
# index into a clean virtual environment with no constraints, and pin everything it installed, plus pip, the
# setuptools that builds oodserve (the newest the build-system range allows) and onnxruntime-gpu at onnxruntime's
# version (the GPU target's flavour; its dependencies are onnxruntime's). install-runtime.sh installs with it, so the
# images and the tests that replay their install steps get these versions, and it fails on any package left unpinned.
# Run it after changing the dependencies in pyproject.toml, then commit the file.
# usage: deploy/docker/update-constraints.sh   (PYTHON: the interpreter, the images' minor version: 3.11)
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
output="$repo/deploy/docker/constraints.txt"
work=$(mktemp -d "${TMPDIR:-/tmp}/oodserve-lock.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Only the package index, as in an image build: no local find-links or extra indexes from this machine's pip config.
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
export PIP_CONFIG_FILE=/dev/null PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
python_version=$("$work/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# The two flavours at one version: the newest onnxruntime release that onnxruntime-gpu also has.
versions() {
  "$work/venv/bin/python" -m pip index versions "$1" 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ' ' | tr , '\n'
}
versions onnxruntime >"$work/cpu-versions"
onnxruntime_version=$(versions onnxruntime-gpu | grep -Fx -f "$work/cpu-versions" | head -n 1)
[ -n "$onnxruntime_version" ] || { echo "update-constraints.sh: no onnxruntime version that onnxruntime-gpu also has" >&2; exit 1; }
"$work/venv/bin/python" -m pip install --quiet "${repo}[cpu]" "onnxruntime==$onnxruntime_version"
# Dependencies that only some patch releases of this Python minor version need (redis wants async-timeout below 3.11.3:
# Debian's 3.11.2 of the stand-in base) are pinned too, so the lock holds on any 3.11.x: install them here and repeat.
while :; do
  extra=$("$work/venv/bin/python" -c '
import importlib.metadata as metadata, platform, sys
from packaging.requirements import Requirement
major, minor = sys.version_info[:2]
installed = {metadata.distribution(d.metadata["Name"]).metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()}
wanted = set()
for distribution in metadata.distributions():
    for line in distribution.requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or requirement.name.lower().replace("_", "-") in installed or marker.evaluate({"extra": ""}):
            continue
        if any(marker.evaluate({"extra": "", "python_full_version": f"{major}.{minor}.{patch}"}) for patch in range(30)):
            wanted.add(f"{requirement.name}{requirement.specifier}")
print(" ".join(sorted(wanted)))')
  [ -n "$extra" ] || break
  echo "update-constraints.sh: also pinning, for other $python_version.x patch releases: $extra" >&2
  # shellcheck disable=SC2086
  "$work/venv/bin/python" -m pip install --quiet $extra
done
setuptools_spec=$("$work/venv/bin/python" -c '
import sys, tomllib
(spec,) = [r for r in tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"] if r.startswith("setuptools")]
print(spec)' "$repo/pyproject.toml")
"$work/venv/bin/python" -m pip download --quiet --no-deps --dest "$work/setuptools" "$setuptools_spec"
setuptools_version=$(find "$work/setuptools" -name 'setuptools-*.whl' -exec basename {} \; | sed -n 's/^setuptools-\([^-]*\)-.*/\1/p')
{
  echo "# The lock of the runtime images (pip constraints), written by deploy/docker/update-constraints.sh from a clean"
  echo "# install of oodserve[cpu] on Python $python_version; do not edit by hand. install-runtime.sh installs with it."
  echo "pip==$("$work/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pip"))')"
  echo "setuptools==$setuptools_version"
  echo "onnxruntime-gpu==$onnxruntime_version"
  "$work/venv/bin/python" -m pip list --format=freeze --exclude pip --exclude setuptools --exclude oodserve
} >"$output"
echo "update-constraints.sh: wrote $output ($(grep -c '==' "$output") pins)"
