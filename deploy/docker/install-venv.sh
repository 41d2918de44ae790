#!/bin/sh
# install-venv VENV [TORCH_INDEX]: the project's virtual environment, installed exactly as the
# README does (`make install`). With wheels in /wheels (deploy/docker/wheelhouse.sh) pip reads
# nothing else (no network); without, it uses the indexes, TORCH_INDEX added for torch (the CPU
# build's index; empty for the GPU image: PyPI's Linux torch wheel is the CUDA build).
set -eu
venv=$1
torch_index=${2:-}
if ls /wheels/*.whl >/dev/null 2>&1; then
  echo "install-venv: offline, from the wheelhouse ($(find /wheels -name "*.whl" | wc -l) wheels)"
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels
elif [ -n "$torch_index" ]; then
  echo "install-venv: from the package indexes, torch from $torch_index"
  export PIP_EXTRA_INDEX_URL="$torch_index"
else
  echo "install-venv: from the package indexes"
fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
make install VENV="$venv" PYTHON=python3
# ninja: torch.utils.cpp_extension builds the fused CPU kernel with it at start-up
"$venv/bin/pip" install -q "ninja>=1.11"
