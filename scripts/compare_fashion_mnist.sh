#!/usr/bin/env bash
# FedSpa against the baselines on real Fashion-MNIST, all on the same partition and seed:
# 100 clients with 2 classes each (pathological), 10 per round, 50 rounds of 1 local epoch (batch 32, SGD lr 0.05),
# LeNet-5, density 0.5 for the sparse methods. Writes runs/compare_fashion_mnist/{comparison.md,comparison.csv}
# and one run folder per algorithm. The table in docs/benchmarks.md came from this script.
#   bash scripts/compare_fashion_mnist.sh [extra fedspa-jax compare arguments]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
bash scripts/install_datasets.sh
exec fedspa-jax compare \
  --algorithms fedspa fedspa_fixed fedspa_random fedspa_masked_mean subfedavg fedavg fedavg_ft local ditto fedper fedrep \
  --config fashion_mnist_pathological \
  --set rounds=50 --set local_epochs=1 --set momentum=0.0 --set lr=0.05 \
  --set eval_every=5 --set checkpoint_every=50 --set rounds_per_dispatch=5 \
  --out runs/compare_fashion_mnist --overwrite "$@"
