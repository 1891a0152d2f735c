# Two entry points, each doing all set-up on a fresh machine:
#   make run    create .venv, install the app, start it (ARGS="--model tiny" etc.)
#   make test   create .venv, install the app and test tools (Chromium, axe-core, PostgreSQL) and run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.app-installed: requirements.txt scripts/install-llama-cpp.sh | $(PY)
	$(PY) -m pip install -r requirements.txt
	bash scripts/install-llama-cpp.sh $(PY)
	touch $@

$(VENV)/.test-installed: requirements.txt requirements-test.txt scripts/install-axe.sh scripts/install-postgres.sh scripts/install-llama-cpp.sh | $(PY)
	$(PY) -m pip install -r requirements-test.txt
	bash scripts/install-llama-cpp.sh $(PY)
	bash scripts/install-chromium.sh
	bash scripts/install-postgres.sh
	bash scripts/install-axe.sh $(VENV)/axe-core
	touch $@ $(VENV)/.app-installed

run: $(VENV)/.app-installed
	$(PY) launch.py $(ARGS)

test: $(VENV)/.test-installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest
