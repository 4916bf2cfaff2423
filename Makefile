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
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: book test setup data runs bench clean
.DEFAULT_GOAL := book

setup: $(STAMP)

# The venv is rebuilt when pyproject.toml changes. torch comes from PyPI (>=2.14; see environment.yml for conda).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name fairbook --display-name "Python (fairbook)" >/dev/null
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

test: $(STAMP)
	$(BIN)/python -m pytest

bench: data
	$(BIN)/python bench/learnability.py $(DATA)
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_clip_step.py
	$(BIN)/python bench/bench_moe.py

clean:
	rm -rf runs book/_build book/notebooks
