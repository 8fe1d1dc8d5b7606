#!/usr/bin/env bash
# The accelerator smoke benchmark (scripts/accelerator_check.py): whole FedSpa rounds with 100 clients per round
# vmapped, LeNet-5 and the CNN, conv="auto", samples/s; then sharded over every device when there are several.
# Install JAX for the accelerator first (e.g. `.venv/bin/python -m pip install -U "jax[cuda13]"` on NVIDIA GPUs,
# "jax[tpu]" on TPU VMs); the script itself needs no data and no internet.
#   bash scripts/accelerator_check.sh [--quick] [--models lenet5 cnn]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python scripts/accelerator_check.py "$@"
