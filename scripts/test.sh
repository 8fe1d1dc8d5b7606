#!/usr/bin/env bash
# Runs the test suite in ./.venv (created and filled on first use). Extra arguments go to pytest.
# Tests run in TEST_WORKERS processes (default 2; pytest-xdist), each test file in one process so that its
# module-scoped fixtures (compiled rounds) are shared; TEST_WORKERS=0 runs them in this process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
workers="${TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  exec python -m pytest -q "$@"
fi
exec python -m pytest -q -n "$workers" --dist loadfile "$@"
