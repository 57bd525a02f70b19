# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
SEED ?= 0
# OTLP/HTTP collector for `make run-local-otel` (4318: the OTLP/HTTP port).
OTEL_EXPORTER_OTLP_ENDPOINT ?= http://127.0.0.1:4318
# What `make containerize` packs and the image it makes; BACKEND: docker, podman, buildah, ...
BENTO ?= clip-score:latest
IMAGE ?= clip-score:latest
BACKEND ?= docker
# Extra `bentoml serve` flags. The drain on SIGTERM is bounded by the service itself
# (CLIP_SHUTDOWN_TIMEOUT_S, 60 s), so a Bento served from the store or the image gets it too.
SERVE_FLAGS ?=

.PHONY: browser install dev-setup save-models save-models-demo serve serve-demo run-local run-local-otel \
        build containerize test run-unit-test-suite-local test-unit test-integration lint format \
        settings-table bench bench-quick load-test reliability

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
	$(VENV)/bin/bentoml serve service:Evaluator --port $(PORT) $(SERVE_FLAGS)

serve-demo: save-models-demo
	$(VENV)/bin/bentoml serve service:Evaluator --port $(PORT) $(SERVE_FLAGS)

run-local: serve

# `run-local` with tracing on: OTEL_EXPORTER_OTLP_ENDPOINT alone makes both services export spans
# over OTLP/HTTP (default: the collector of deploy/observability/compose.yaml on this machine).
run-local-otel: save-models
	OTEL_EXPORTER_OTLP_ENDPOINT=$(OTEL_EXPORTER_OTLP_ENDPOINT) \
		$(VENV)/bin/bentoml serve service:Evaluator --port $(PORT) $(SERVE_FLAGS)

# A Bento (bentofile.yaml) with the models in the store: save them first (`make save-models`, or
# `make save-models-demo` for an untrained demo image). CLIP_MODELS picks which ones it carries.
# Offline: nothing here resolves packages or touches the model hub.
build: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bentoml build

# An OCI image of $(BENTO) (after `make build`). Needs a running Docker engine (or the $(BACKEND)
# builder) and network access for the base image and the Python packages; the models are copied
# in from the local store.
containerize: install
	$(VENV)/bin/bentoml containerize $(BENTO) --backend $(BACKEND) --image-tag $(IMAGE)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite: lint, engine unit tests, and integration tests against `bentoml serve`.
# The demo page test drives Debian's chromium (Playwright's browser download is not used).
browser:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the demo page test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: lint browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-unit run-unit-test-suite-local: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not integration"

test-integration: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m integration

settings-table: install
	$(PY) -m clip_runtime.settings

# scripts/benchmark.py: ceiling, in-process pipeline, naive per-pair loop and the service over
# HTTP, appended to docs/benchmarks.md. BENCH_ARGS e.g. "--models ViT-B-32 --notes 'shared box'".
BENCH_ARGS ?=
bench: install
	HF_HUB_OFFLINE=1 $(PY) scripts/benchmark.py $(BENCH_ARGS)

bench-quick: install
	HF_HUB_OFFLINE=1 $(PY) scripts/benchmark.py --quick $(BENCH_ARGS)

# Locust headless against URL (default: a service started here on 127.0.0.1, random-init models
# when none are saved). Reports under reports/; non-zero exit on unexpected failures.
USERS ?= 8
RUN_TIME ?= 60s
load-test: install
	HF_HUB_OFFLINE=1 $(PY) -m load_tests.run --users $(USERS) --run-time $(RUN_TIME) \
		$(if $(URL),--url $(URL))

# The long fault checks (overload at 2x capacity, worker SIGKILL, soak), each with a verdict.
reliability: install
	HF_HUB_OFFLINE=1 $(PY) -m load_tests.faults all
