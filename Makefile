# Every target creates .venv when missing and installs what it needs (pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.curvopt-installed
OUT ?= results/default

.PHONY: install test test-slow test-all bench bench-smoke overhead clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,jax,bench,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow" -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m benchmarks --suite default --out $(OUT)

bench-smoke: $(STAMP)
	$(PY) -m benchmarks --suite smoke --out results/smoke

overhead: $(STAMP)
	$(PY) -m benchmarks.overhead

clean:
	rm -rf $(VENV) results .pytest_cache
