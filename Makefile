# Two entry points for a fresh machine with only Python 3 on it; each sets up .venv when missing.
#   make study   # the whole arith study: data, base model, oracle, stages 0-3 + controls, eval, table
#   make test    # the test suite (CPU only)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

study: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash runs/arith.sh

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed   # the inner loop: everything but the multi-process / long tests (under 2 minutes)
	$(PY) -m pytest -q -m "not slow" tests

.PHONY: venv study test test-fast
