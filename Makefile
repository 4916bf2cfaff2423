# fairbook: two commands do everything on a fresh machine.
#   make book   set-up, synthetic data, every notebook with its default parameters, the Jupyter Book
#   make test   set-up and every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data/synth-fairvlmed
CONTROL := data/synth-fairvlmed-nobias
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.py))
# JupyterLab settings of this venv only (not the user's home): .py chapters open as notebooks on a double-click
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: book test setup data runs bench lab browser clean
.DEFAULT_GOAL := book

setup: $(STAMP)

# The venv is rebuilt when pyproject.toml changes. torch comes from PyPI (>=2.14; see environment.yml for conda).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name fairbook --display-name "Python (fairbook)" >/dev/null
	mkdir -p $(LAB_SETTINGS)
	echo '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}' \
	  > $(LAB_SETTINGS)/overrides.json
	touch $@

data: $(STAMP)
	$(BIN)/fairbook data synth $(DATA)
	$(BIN)/fairbook data synth $(CONTROL) --bias none

runs: data
	@for nb in $(NOTEBOOKS); do \
	  stem=$$(basename $$nb .py); \
	  echo "== $$stem (default)"; \
	  $(BIN)/fairbook run $$nb -p params/$$stem/default.yaml || exit 1; \
	done

book: runs
	$(BIN)/fairbook book

test: $(STAMP) browser
	$(BIN)/python -m pytest

# JupyterLab on the chapters: a double-click opens a notebooks/*.py source as a notebook with the fairbook kernel.
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

# Headless Chromium for the browser checks of the book, installed as .ci/run does where that is possible (root and
# apt-get); elsewhere the test summary says loudly that the browser checks did not run.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (headless browser checks of the built book)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "WARNING: chromium is absent and cannot be installed here: the browser checks will be SKIPPED"; \
	  fi; }

bench: data
	$(BIN)/python bench/learnability.py $(DATA)
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_clip_step.py
	$(BIN)/python bench/bench_moe.py
	$(BIN)/python bench/bench_grid.py $(DATA)

clean:
	rm -rf runs book/_build book/notebooks
