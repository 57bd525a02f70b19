#!/usr/bin/env bash
# One command for a CUDA machine (`make bench-gpu`): install what is missing from wheels carried
# in .whl/, save random-init ViT-B-32 and ViT-L-14, serve them, run scripts.benchmark for both
# and write the markdown and JSON results and the server's log to OUT_DIR. Budget: 8 minutes in
# all (BENCH_TIMEOUT_S bounds the benchmark itself).
#
#   scripts/bench_gpu.sh [OUT_DIR] [benchmark.py arguments ...]
#   PYTHON=.venv/bin/python scripts/bench_gpu.sh /tmp/out --quick --models ViT-B-32   # CPU check
#
# Wheels: on a machine with network, `../shared/gpu/fetch-wheels.sh .whl python-json-logger
# cachetools`, then carry .whl/ to the GPU machine (they install into /tmp/site, nothing else
# changes there).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-out}}
shift || true
py=${PYTHON:-python3}
started=$(date +%s)
if ! "$py" -c "import bentoml, open_clip, pydantic_settings, cachetools" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "bentoml/open_clip are missing and .whl/ holds no wheels (see the header)" >&2
    exit 2
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1
export BENTOML_HOME=${BENTOML_HOME:-$(mktemp -d /tmp/clip-bench-home.XXXXXX)}
mkdir -p "$out"
models=${MODELS:-ViT-B-32 ViT-L-14}
cores=$(nproc)
generators=${GENERATORS:-$(( cores >= 8 ? 4 : 1 ))}
# Batching per model, from this script's encoder scan on an H200 (docs/benchmarks.md, "Batching
# choices"): ViT-B-32 gains up to 256, ViT-L-14 is compute-bound from 32 on.
batching=${MODEL_MAX_BATCH_SIZE:-ViT-B-32=256,ViT-L-14=64}
# shellcheck disable=SC2086  # word splitting of the model list is wanted
"$py" -m scripts.save_models --models $models --random-init --seed 0 --if-missing
echo "models saved after $(( $(date +%s) - started )) s"
# --runtimes with no value: the CPU runtime comparison (OpenVINO) has no place on a GPU host.
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT_S:-420}" "$py" -m scripts.benchmark --models $models \
  --bentoml-home "$BENTOML_HOME" --json "$out/benchmark.json" --markdown "$out/benchmark.md" \
  --generators "$generators" --seconds "${SECONDS_PER_RUN:-8}" --batch-scan 32 64 128 256 512 \
  --server-env "CLIP_HTTP_WORKERS=$(( cores > generators + 1 ? cores - generators : 1 ))" \
  "CLIP_MODEL_MAX_BATCH_SIZE=$batching" --runtimes \
  --notes "scripts/bench_gpu.sh, $cores cores, $generators load generator processes" "$@" \
  >"$out/benchmark.log" 2>&1 || status=$?
# The server's own log: the benchmark counts failures, the log says why they happened.
serve_log=$(sed -n 's/^starting bentoml serve (log \(.*\))$/\1/p' "$out/benchmark.log" | head -1)
[ -n "$serve_log" ] && [ -f "$serve_log" ] && cp "$serve_log" "$out/serve.log"
if [ "${status:-0}" != 0 ]; then tail -40 "$out/benchmark.log"; exit 1; fi
echo "done in $(( $(date +%s) - started )) s: $out/benchmark.md, $out/benchmark.json"
