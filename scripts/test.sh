#!/usr/bin/env bash
# Run the test suite (sets up .venv with the test requirements and the evaluation extra first, so
# the real NudeNet detector test runs). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt requirements-test.txt requirements-eval.txt
set +e
# Two workers, one test file each (module fixtures stay shared within a file); most of the
# suite's time is single-threaded XLA compilation. SCDPO_TEST_WORKERS=0 runs in one process.
workers="${SCDPO_TEST_WORKERS:-2}"
xdist=()
if [ "$workers" != "0" ]; then xdist=(-n "$workers" --dist loadfile); fi
python -m pytest -q "${xdist[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; fi
exit "$rc"
