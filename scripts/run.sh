#!/usr/bin/env bash
# Runs the main job in ./.venv (created and filled on first use): FedSpa on the built-in default experiment,
# printing per-round personalized accuracy. Extra arguments go to `fedspa-jax run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec fedspa-jax run "$@"
