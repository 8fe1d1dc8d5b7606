#!/usr/bin/env bash
# Installs the datasets fedspa-jax reads from system folders, where the system can provide them:
#   Fashion-MNIST's IDX files from Debian's `dataset-fashion-mnist` -> /usr/share/datasets/fashion-mnist/
#
#   bash scripts/install_datasets.sh
#
# Never fails its caller: without apt or root rights it prints what to do instead and exits 0. Other datasets:
# MNIST is downloaded on first use (or pass data_dir=...); CIFAR and EMNIST come through TFDS (see docs/data.md).
set -u

FASHION_DIR=/usr/share/datasets/fashion-mnist
FASHION_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

have_fashion() {
  for f in $FASHION_FILES; do
    [ -f "$FASHION_DIR/$f" ] || return 1
  done
}

if have_fashion; then
  echo "install_datasets: Fashion-MNIST already present in $FASHION_DIR"
  exit 0
fi

elsewhere="put $FASHION_FILES
  into a folder and pass data_dir=..., or let fedspa_jax download them on first use (needs internet)"

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_datasets: apt-get not available; to get Fashion-MNIST, $elsewhere"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_datasets: not root; to get Fashion-MNIST, run 'sudo apt-get install dataset-fashion-mnist', or $elsewhere"
  exit 0
fi

echo "install_datasets: installing dataset-fashion-mnist with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >/dev/null 2>&1; then
  echo "install_datasets: apt-get update failed (offline?); trying the install anyway"
fi
if apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 && have_fashion; then
  echo "install_datasets: Fashion-MNIST installed in $FASHION_DIR"
else
  echo "install_datasets: apt-get could not install dataset-fashion-mnist; to get Fashion-MNIST, $elsewhere"
fi
exit 0
