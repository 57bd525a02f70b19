# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
SEED ?= 0

.PHONY: install dev-setup save-models save-models-demo serve serve-demo run-local test \
        run-unit-test-suite-local test-unit test-integration lint format settings-table

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev-setup: install

# Pretrained weights through open_clip (fails fast with the offline options when there is no hub).
save-models: install
	$(PY) scripts/save_models.py --if-missing

# Untrained, deterministic weights: offline, flagged as random-init everywhere they show.
save-models-demo: install
	$(PY) scripts/save_models.py --random-init --seed $(SEED) --if-missing

serve: save-models
	$(VENV)/bin/bentoml serve service:Evaluator --port $(PORT)

serve-demo: save-models-demo
	$(VENV)/bin/bentoml serve service:Evaluator --port $(PORT)

run-local: serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite: lint, engine unit tests, and integration tests against `bentoml serve`.
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-unit run-unit-test-suite-local: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not integration"

test-integration: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m integration

settings-table: install
	$(PY) -m clip_runtime.settings
