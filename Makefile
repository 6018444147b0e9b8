# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv and install the
# project first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# torch first and exactly, so pip takes the 2.14.1 build rather than resolving a newer one.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-all bench clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# W&B's sweep-config validator (package `sweeps`, wandb[sweeps]) pins numpy<2 for its Bayesian
	# search only; its validation runs on numpy 2, so the tests install it without dependencies.
	$(BIN)/python -m pip install -q --no-deps sweeps==0.3.0
	touch $(INSTALLED)

setup: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python train.py

test: $(INSTALLED)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-all: $(INSTALLED)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "slow or not slow"

bench: $(INSTALLED)
	$(BIN)/python bench/loop_overhead.py

clean:
	rm -rf outputs .pytest_cache
