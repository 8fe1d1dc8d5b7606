#!/usr/bin/env bash
# The seeded Fashion-MNIST study of issue 11 (plan, units and resuming: scripts/study_fashion_mnist.py's docstring).
#   bash scripts/study_fashion_mnist.sh start [options]    # background: setsid nohup nice -n 10; log <out>/study.log
#   bash scripts/study_fashion_mnist.sh run [options]      # foreground
#   bash scripts/study_fashion_mnist.sh status [--out DIR] # units done / left, the running unit, time left
#   bash scripts/study_fashion_mnist.sh plan [options]     # the units and their single-core estimates
# Resumable: after a kill, `start` again with the same options; finished units are skipped, a second driver on the
# same folder refuses to run. Report: .venv/bin/python scripts/study_report.py [--update-docs]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
cmd="${1:-start}"
[ $# -gt 0 ] && shift
driver=(python scripts/study_fashion_mnist.py)
case "$cmd" in
  start)
    out=runs/study_fashion_mnist prev=""
    for a in "$@"; do
      [ "$a" = "--smoke" ] && out=runs/study_fashion_mnist-smoke
    done
    for a in "$@"; do
      [ "$prev" = "--out" ] && out="$a"
      prev="$a"
    done
    bash scripts/install_datasets.sh >&2
    "${driver[@]}" check "$@"  # bad options (exit status 2) or a driver already running (3) stop here
    mkdir -p "$out"
    setsid nohup nice -n 10 "${driver[@]}" run "$@" >> "$out/study.log" 2>&1 < /dev/null &
    echo "study started: pid $!, log $out/study.log; progress: bash scripts/study_fashion_mnist.sh status --out $out"
    ;;
  run)
    bash scripts/install_datasets.sh >&2
    exec "${driver[@]}" run "$@"
    ;;
  *)
    exec "${driver[@]}" "$cmd" "$@"
    ;;
esac
