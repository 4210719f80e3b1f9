#!/usr/bin/env bash
# All step benchmarks on one GPU, in one call; JSON lines to $OUT/bench.jsonl (or ./bench.jsonl),
# then a table with our ratios to each peer. Needs the GPU image's python3 (jax[cuda], torch),
# plus diffusers/ml_collections/tensorboardX (carried as wheels in .whl when missing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
LOG="$OUT/bench.jsonl"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}"
run() { timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_dpo_step.py "$@" 2>>"$OUT/bench.stderr" | tee -a "$LOG"; }
for spec in ${BENCH_SPECS:-"ours --attention auto" "torch --compile 0" "torch --compile 1"}; do
  # shellcheck disable=SC2086
  run $spec
done
python3 benchmarks/table.py "$LOG"
