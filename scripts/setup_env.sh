#!/usr/bin/env bash
# Create .venv (once) and install the requirements files given as arguments when they changed.
# Usage: source scripts/setup_env.sh requirements.txt [requirements-test.txt ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SCDPO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
stamp="$VENV/.requirements-$(cd "$ROOT" && cat "$@" requirements.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $* into $VENV (first run: a few minutes)" >&2
  args=()
  for f in "$@"; do args+=(-r "$ROOT/$f"); done
  "$VENV/bin/python" -m pip install -q "${args[@]}" >&2
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
