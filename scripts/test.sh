#!/usr/bin/env bash
# The project's test command (README): makes/updates .venv with the test extras, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
