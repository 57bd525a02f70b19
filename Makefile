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

.PHONY: browser install install-cli install-dev install-remote dev-setup save-models save-models-demo serve serve-demo run-local run-local-otel \
        build containerize test run-unit-test-suite-local test-unit test-integration lint format \
        settings-table bench bench-quick bench-ray bench-gpu load-test reliability

# Installs, one stamp per set, so each target installs what it runs and no more:
#   runtime   `.` alone: serving, saving models, containerize (no Ray, Playwright, Locust...)
#   build     + uv, which `bentoml build` calls
#   cli       + `clip-eval`'s tables, progress bar, retries, histogram
#   dev       everything `make test`, the benchmark and the load tests use
$(VENV)/.installed-runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.installed-runtime
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

install: $(VENV)/.installed-runtime
install-cli: $(VENV)/.installed-cli
dev-setup install-dev: $(VENV)/.installed-dev

# `clip-eval --engine remote` on a machine without torch: the package without its dependencies,
# then the `remote` extra's list (pip cannot install an extra without the base requirements).
install-remote:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c 'import tomllib; extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; print("\n".join(extras["cli"] + extras["remote"]))' \
		| $(PY) -m pip install -q -r /dev/stdin

# Pretrained weights through open_clip (fails fast with the offline options when there is no hub).
save-models: install
	$(PY) -m scripts.save_models --if-missing

# Untrained, deterministic weights: offline, flagged as random-init everywhere they show.
save-models-demo: install
	$(PY) -m scripts.save_models --random-init --seed $(SEED) --if-missing

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
build: $(VENV)/.installed-build
	HF_HUB_OFFLINE=1 $(VENV)/bin/bentoml build

# An OCI image of $(BENTO) (after `make build`). Needs a running Docker engine (or the $(BACKEND)
# builder) and network access for the base image and the Python packages; the models are copied
# in from the local store.
containerize: install
	$(VENV)/bin/bentoml containerize $(BENTO) --backend $(BACKEND) --image-tag $(IMAGE)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite: lint, engine unit tests, and integration tests against `bentoml serve`.
# The demo page test drives Debian's chromium (Playwright's browser download is not used).
browser:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the demo page test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Two pytest-xdist workers, each module on one of them (module-scoped servers start once).
TEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadscope

test: lint browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_PARALLEL)

test-unit run-unit-test-suite-local: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not integration"

test-integration: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m integration

# docs/configuration.md is generated from the settings' descriptions (a test fails when stale).
settings-table: install
	$(PY) -m clip_runtime.settings > docs/configuration.md

# scripts/benchmark.py: ceiling, in-process pipeline, naive per-pair loop and the service over
# HTTP, appended to docs/benchmarks.md. BENCH_ARGS e.g. "--models ViT-B-32 --notes 'shared box'".
BENCH_ARGS ?=
bench: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m scripts.benchmark $(BENCH_ARGS)

bench-quick: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m scripts.benchmark --quick $(BENCH_ARGS)

# scripts/bench_ray.py: clip-eval's local engine against the Ray engine with 1 and 2 actors on a
# two-node Ray cluster started on this machine (127.0.0.1), appended to docs/benchmarks.md.
# BENCH_RAY_ARGS e.g. "--pairs 64 --markdown ''".
BENCH_RAY_ARGS ?=
bench-ray: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m scripts.bench_ray $(BENCH_RAY_ARGS)

# On a fresh CUDA machine with torch (no venv): installs bentoml/open_clip from .whl/ when missing,
# benchmarks random-init ViT-B-32 and ViT-L-14, writes $(BENCH_OUT)/benchmark.{md,json}.
BENCH_OUT ?= bench-out
bench-gpu:
	scripts/bench_gpu.sh $(BENCH_OUT) $(BENCH_ARGS)

# Locust headless against URL (default: a service started here on 127.0.0.1, random-init models
# when none are saved; on PORT when given, `make load-test PORT=3100`, else a free port).
# Reports under reports/; non-zero exit on unexpected failures.
USERS ?= 8
RUN_TIME ?= 60s
load-test: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m load_tests.run --users $(USERS) --run-time $(RUN_TIME) \
		$(if $(URL),--url $(URL)) $(if $(filter command line environment,$(origin PORT)),--port $(PORT))

# The long fault checks (overload at 2x capacity, worker SIGKILL, soak), each with a verdict.
reliability: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m load_tests.faults all
