#!/usr/bin/env bash
# All benchmarks on one GPU in one call: JSON lines to $OUT/bench.jsonl (or ./bench.jsonl), then
# a table with our ratio to each peer measured in the same run. Needs the GPU image's python3
# (jax[cuda], torch) plus diffusers / ml_collections / tensorboardX (carry them as wheels in .whl).
# BENCH_SPECS overrides the list, e.g. BENCH_SPECS="step:ours_--remat_block step:torch_--compile_1".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
LOG="$OUT/bench.jsonl"
export PYTHONUNBUFFERED=1
DEFAULT="step:ours_--attention_auto step:torch_--compile_0 step:torch_--compile_1 sample:ours sample:torch"
for spec in ${BENCH_SPECS:-$DEFAULT}; do
  kind="${spec%%:*}"; args="${spec#*:}"; args="${args//_/ }"
  script=benchmarks/bench_dpo_step.py; [ "$kind" = sample ] && script=benchmarks/bench_sampling.py
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-400}" python3 "$script" $args 2>>"$OUT/bench.stderr" | tee -a "$LOG"
done
python3 benchmarks/table.py "$LOG"
