# Two commands: `make demo` (set up, train the default recipe on the bundled digits, show the result)
# and `make test` (set up, run the test suite). Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned: here it resolves to the local CPU wheel, on a GPU machine to PyPI's CUDA build.
# On a CPU-only machine elsewhere, avoid the multi-GB CUDA build with
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: demo test setup lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/nnlab train digits-cnn
	@echo "--- the run, compared with earlier ones ---"
	$(BIN)/nnlab runs

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
