# Two commands on a fresh machine with only python3 + pip: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: install demo test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# The dense CRF extra builds from source (a C++ compiler, about a minute); without it the
	@# CRF option raises a clear error and its tests skip.
	$(BIN)/python -m pip install --quiet -e ".[dev,crf]" || \
		echo "note: the optional dense CRF extra (pydensecrf2) did not build; its tests will skip"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/wsss-tune demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check wsss_tune trainables analysis tests benchmarks

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
