#!/bin/sh
# Install oodserve with exactly one onnxruntime flavour into a fresh virtual environment, every package at the version
# the lock pins, check that torch is absent, print what was installed, then take pip and setuptools out of the venv
# (the image runs it, nothing installs into it). Both Docker targets run this, and tests/deploy/test_docker.py runs it
# on the host the same way.
# usage: install-runtime.sh VENV cpu|gpu [SOURCE_DIR [CONSTRAINTS]]
#   PYTHON picks the interpreter (default python3); CONSTRAINTS defaults to SOURCE_DIR/deploy/docker/constraints.txt,
#   written by deploy/docker/update-constraints.sh.
set -eu
venv="$1"
flavour="$2"
source_dir="${3:-.}"
constraints="${4:-$source_dir/deploy/docker/constraints.txt}"
case "$flavour" in
  cpu | gpu) ;;
  *) echo "install-runtime.sh: flavour must be cpu or gpu, got '$flavour'" >&2; exit 2 ;;
esac
[ -f "$constraints" ] || { echo "install-runtime.sh: no constraints file at $constraints" >&2; exit 2; }
# Through the environment, so the pins also hold in pip's isolated build of oodserve (setuptools).
PIP_CONSTRAINT=$(cd "$(dirname "$constraints")" && pwd)/$(basename "$constraints")
export PIP_CONSTRAINT
export PIP_PROGRESS_BAR=off
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
# `cpu` pulls onnxruntime, `gpu` onnxruntime-gpu: they share one module, so never both. No torch in either.
"$venv/bin/python" -m pip install "${source_dir}[${flavour}]"
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "install-runtime.sh: torch ended up in $venv; the runtime image must not contain it" >&2
  exit 1
fi
installed=$("$venv/bin/python" -m pip list --format=freeze --exclude pip --exclude setuptools)
echo "install-runtime.sh: installed into $venv:"
echo "$installed"
# Every installed distribution but oodserve itself must be pinned by the lock, or two builds could differ.
unpinned=$(echo "$installed" | "$venv/bin/python" -c '
import re, sys
def name(line):
    return re.sub(r"[-_.]+", "-", line.split("==")[0].strip().lower())
pinned = {name(line) for line in open(sys.argv[1]) if "==" in line and not line.lstrip().startswith("#")}
print(" ".join(sorted({name(line) for line in sys.stdin if line.strip()} - pinned - {"oodserve"})))
' "$PIP_CONSTRAINT")
if [ -n "$unpinned" ]; then
  echo "install-runtime.sh: not pinned in $constraints: $unpinned (run deploy/docker/update-constraints.sh)" >&2
  exit 1
fi
"$venv/bin/python" -c "import onnxruntime, oodserve.server.app; print('oodserve runtime ok: onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
if [ "$flavour" = gpu ]; then
  # The CUDA major onnxruntime-gpu's CUDA provider links against must be the base's (nvidia/cuda sets CUDA_VERSION):
  # a mismatch builds and starts, then falls back to the CPU at the first session.
  "$venv/bin/python" -c '
import mmap, os, pathlib, re, struct, sys, onnxruntime
def needed(path):
    """DT_NEEDED names of an ELF64 little-endian shared library: its .dynamic section, names in the linked string table."""
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        (section_offset,), (entry_size, count) = struct.unpack_from("<Q", elf, 0x28), struct.unpack_from("<HH", elf, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, section_offset + index * entry_size) for index in range(count)]
        for _, kind, _, _, offset, size, link, _, _, _ in sections:
            if kind == 6:  # SHT_DYNAMIC, entries (tag, value); its link is the string table
                strings = sections[link][4]
                tags = [struct.unpack_from("<qQ", elf, offset + position) for position in range(0, size, 16)]
                return [elf[strings + value : elf.find(b"\0", strings + value)].decode() for tag, value in tags if tag == 1]
    return []
library = pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
majors = sorted({int(match.group(1)) for name in needed(library) if (match := re.fullmatch(r"libcudart\.so\.(\d+)", name))})
base = os.environ.get("CUDA_VERSION", "")
print("install-runtime.sh: onnxruntime-gpu", onnxruntime.__version__, "links CUDA", majors, "; the base has CUDA", base or "none")
if base and int(base.split(".")[0]) not in majors:
    sys.exit(f"install-runtime.sh: onnxruntime-gpu {onnxruntime.__version__} is built for CUDA {majors}, the base image has CUDA {base}")
'
fi
"$venv/bin/python" -m pip uninstall --yes --quiet setuptools pip
