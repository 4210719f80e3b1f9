#!/usr/bin/env bash
# Run main.py inside .venv (set up on first use). Usage: scripts/run.sh [main.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/scdpo-jax/jax}"
exec python main.py "$@"
