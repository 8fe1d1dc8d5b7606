#!/usr/bin/env bash
# The seeded Fashion-MNIST study of issue 11 (plan, units and resuming: scripts/study_fashion_mnist.py's docstring).
#   bash scripts/study_fashion_mnist.sh start [--jobs N] [options]  # background: N drivers (default 1, one per core
#                                                     at most), setsid nohup nice -n 10; log <out>/study.log
#   bash scripts/study_fashion_mnist.sh run [options]      # foreground
#   bash scripts/study_fashion_mnist.sh status [--out DIR] # units done / left, the running unit, time left
#   bash scripts/study_fashion_mnist.sh plan [options]     # the units and their single-core estimates
#   bash scripts/study_fashion_mnist.sh start --protocols --jobs 2   # the protocol re-run (runs/study_protocols)
#   bash scripts/study_fashion_mnist.sh start --sparse-family --jobs 2   # DisPFL, FedDST, PruneFL (issue 29)
# Resumable: after a kill, `start` again with the same options; finished units are skipped. `start` refuses while
# drivers run on the folder; the drivers of one `start --jobs N` share the units (a lock each). Report: .venv/bin/python scripts/study_report.py [--update-docs]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
cmd="${1:-start}"
[ $# -gt 0 ] && shift
driver=(python scripts/study_fashion_mnist.py)
case "$cmd" in
  start)
    base=runs/study_fashion_mnist prev="" jobs=1 args=()
    for a in "$@"; do
      [ "$a" = "--protocols" ] && base=runs/study_protocols
      [ "$a" = "--sparse-family" ] && base=runs/study_sparse_family
    done
    out=$base
    for a in "$@"; do
      [ "$a" = "--smoke" ] && out=$base-smoke
    done
    for a in "$@"; do
      if [ "$prev" = "--jobs" ]; then jobs="$a"
      elif [ "$a" != "--jobs" ]; then args+=("$a"); fi
      [ "$prev" = "--out" ] && out="$a"
      prev="$a"
    done
    if ! [[ "$jobs" =~ ^[1-9][0-9]*$ ]]; then
      echo "study_fashion_mnist.sh: error: --jobs wants a positive integer, got '$jobs'" >&2
      exit 2
    fi
    bash scripts/install_datasets.sh >&2
    "${driver[@]}" check "${args[@]}"  # bad options (exit status 2) or drivers already running (3) stop here
    mkdir -p "$out"
    for ((j = 0; j < jobs; j++)); do
      setsid nohup nice -n 10 "${driver[@]}" run "${args[@]}" >> "$out/study.log" 2>&1 < /dev/null &
      echo "study driver started: pid $!, log $out/study.log"
      sleep 2  # the first driver writes plan.json before the next one reads it
    done
    echo "progress: bash scripts/study_fashion_mnist.sh status --out $out"
    ;;
  run)
    bash scripts/install_datasets.sh >&2
    exec "${driver[@]}" run "$@"
    ;;
  *)
    exec "${driver[@]}" "$cmd" "$@"
    ;;
esac
