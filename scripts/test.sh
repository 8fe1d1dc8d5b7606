#!/usr/bin/env bash
# Runs the test suite in ./.venv (created and filled on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
