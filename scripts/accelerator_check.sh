#!/usr/bin/env bash
# The ready accelerator check (scripts/accelerator_check.py): devices, compile times, samples/s of FedSpa and FedAvg
# rounds (LeNet-5 and the CNN, 10, 100 and 1,000 clients per round), a PyTorch loop on the same GPU, peak device
# memory, the share of vmapped lanes doing real samples; PASS/FAIL per check, exit status 1 when one fails.
#   bash scripts/accelerator_check.sh [--quick] [--allow-cpu] [--models ...] [--algorithms ...] [--cohorts ...]
#
# It needs no data and no internet, and runs this checkout's code (src/ comes first on PYTHONPATH), with:
#   1. $FEDSPA_PYTHON if set, else ./.venv/bin/python if there is one, else python3 if it imports jax (a Colab or
#      container image that ships jax for its chip): nothing is installed;
#   2. otherwise it creates ./.venv and installs the package with the extra for the chip it finds (cuda12 on an
#      NVIDIA GPU, tpu on a TPU VM; plus bench, for PyTorch, on a GPU): that step needs PyPI.
# A JAX that sees no accelerator fails the first check and says what to install (docs/scaling.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

accelerator_extras() {
  if [ -e /dev/nvidia0 ] || [ -e /dev/nvidiactl ]; then echo "cuda12,bench"; return; fi
  # Google's PCI vendor id with a TPU device id (as jax's hardware_utils looks for TPU chips), or TPU device nodes.
  local vendor
  for vendor in /sys/bus/pci/devices/*/vendor; do
    if [ "$(cat "$vendor" 2>/dev/null)" = "0x1ae0" ] &&
       grep -qxE "0x00(27|56|5e|62|63|6f|76)" "$(dirname "$vendor")/device" 2>/dev/null; then
      echo "tpu"; return
    fi
  done
  if compgen -G "/dev/accel*" > /dev/null; then echo "tpu"; return; fi
  echo ""
}

if [ -n "${FEDSPA_PYTHON:-}" ]; then
  PY="$FEDSPA_PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
elif python3 -c "import jax" 2> /dev/null; then
  PY="python3"
else
  extras="$(accelerator_extras)"
  echo "[accelerator_check] creating $ROOT/.venv with fedspa-jax[${extras:-no accelerator extra}]" >&2
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$ROOT/.venv/bin/python" -m pip install --quiet -e "$ROOT${extras:+[$extras]}" >&2
  PY="$ROOT/.venv/bin/python"
fi
if ! "$PY" -c "import jax, flax, optax, chex" 2> /dev/null; then
  echo "accelerator_check: $PY cannot import jax, flax, optax and chex; install the package into it:" \
       "$PY -m pip install -e \"$ROOT[cuda12,bench]\" (NVIDIA GPU) or \"$ROOT[tpu]\" (TPU); docs/scaling.md" >&2
  exit 2
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/accelerator_check.py "$@"
