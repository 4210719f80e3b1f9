#!/usr/bin/env bash
# Run main.py inside .venv (set up on first use). Usage: scripts/run.sh [main.py flags]
# Paths on the command line (--config, --workdir) are relative to the folder you run it from.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" requirements.txt
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/scdpo-jax/jax}"
exec python "$ROOT/main.py" "$@"
