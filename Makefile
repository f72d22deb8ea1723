# Two commands set up and run everything on a fresh machine:
#   make demo   -- create .venv, install memloc, run the main job on the embedded model
#   make test   -- create .venv, install memloc with dev extras, run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a range would pull several GB of CUDA wheels (see DESIGN.md)
	$(BIN)/pip install --quiet torch==2.13.0

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(BIN)/memloc demo

test: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q
