#!/usr/bin/env bash
# The main job, in ./.venv (created and filled on first use): FedSpa on real Fashion-MNIST (100 clients, 2 classes
# each, LeNet-5, 30 rounds), printing per-round personalized accuracy. The data come from Debian's
# dataset-fashion-mnist when apt is available and we are root, else from the official download; if neither works
# the run stops and says what to do. Extra arguments go to `fedspa-jax run` (e.g. --set rounds=50 --out runs/x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
bash scripts/install_datasets.sh
exec fedspa-jax run --config fashion_mnist_quick "$@"
