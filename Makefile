# Two commands set up and run everything on a fresh machine:
#   make demo   -- create .venv, install memloc, run the main job on the embedded model (into memloc-demo/,
#                  git-ignored: the demo leaves `git status` clean)
#   make gallery -- regenerate the committed gallery figures/ (default sizes; commit the result)
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

# plotly's static PNG export (kaleido 1.x) drives a headless Chromium: install Debian's if none is present
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	    echo "warning: could not install chromium; PNG export will fail (HTML figures still work)"; }

.PHONY: install demo gallery test
install: $(VENV)/.installed browser

demo: install
	$(BIN)/memloc demo

gallery: install
	$(BIN)/memloc reproduce --model tiny --out figures --timings memloc-out/gallery_timings.json

test: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q
