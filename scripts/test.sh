#!/usr/bin/env bash
# Run the test suite (sets up .venv with the test requirements and the evaluation extra first, so
# the real NudeNet detector test runs). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt requirements-test.txt requirements-eval.txt
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; fi
exit "$rc"
