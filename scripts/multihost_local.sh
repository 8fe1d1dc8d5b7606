#!/usr/bin/env bash
# Runs one fedspa-jax command as N processes of a jax.distributed job on this machine (127.0.0.1), each process with
# DEVICES_PER_PROCESS forced CPU devices (default 4): a multi-host job in miniature, for testing. Every process runs
# the same command with --distributed; process 0 prints, the others log to $LOG_DIR/process-<i>.log.
#
#   bash scripts/multihost_local.sh 2 -- run --config default --set smoke=true --out runs/two_processes
#   DEVICES_PER_PROCESS=2 bash scripts/multihost_local.sh 4 -- run --config default --out runs/four
#
# The processes are stopped when any of them fails and after TIMEOUT seconds (default 1800); the exit status is the
# first failing process's (124 on timeout). SIGTERM or SIGINT to this script is passed on to every process as
# SIGTERM, so that they stop together at the next round boundary with a checkpoint (exit status 75, as one process
# would; docs/scaling.md "Batch jobs"); any still running GRACE seconds later (default 60) are killed.
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N -- <fedspa-jax arguments, e.g. run --config default --out runs/x>" >&2
  exit 2
fi
N="$1"; shift
[ "${1:-}" = "--" ] && shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${FEDSPA_NO_ENV:-}" ]; then
  source "$ROOT/scripts/env.sh"
fi
PYTHON="${PYTHON:-$(command -v python)}"
DEVICES="${DEVICES_PER_PROCESS:-4}"
TIMEOUT="${TIMEOUT:-1800}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t fedspa-multihost-XXXXXX)}"
mkdir -p "$LOG_DIR"
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
GRACE="${GRACE:-60}"
grace_deadline=""
pass_on() {  # a preemption notice: every process stops cleanly at the same round
  echo "[multihost] $1: asking every process to stop with a checkpoint (killed after ${GRACE} s)" >&2
  for pid in "${pids[@]}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true; done
  [ -z "$grace_deadline" ] && grace_deadline=$((SECONDS + GRACE))
}
trap 'pass_on SIGTERM' TERM
trap 'pass_on SIGINT' INT

for ((i = 0; i < N; i++)); do
  if [ "$i" -eq 0 ]; then out=/dev/stdout; else out="$LOG_DIR/process-$i.log"; fi
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    "$PYTHON" -m fedspa_jax "$@" --distributed --coordinator "127.0.0.1:$PORT" --num-processes "$N" \
    --process-id "$i" --distributed-timeout 60 >"$out" 2>&1 &
  pids+=($!)
done

status=0
deadline=$((SECONDS + TIMEOUT))
while :; do
  running=0
  for idx in "${!pids[@]}"; do
    pid="${pids[$idx]}"
    [ -z "$pid" ] && continue
    if kill -0 "$pid" 2>/dev/null; then
      running=1
    else
      wait "$pid" && rc=0 || rc=$?
      pids[$idx]=""
      if [ "$rc" -eq 75 ]; then
        [ "$status" -eq 0 ] && status=75  # stopped with a checkpoint: the others stop at the same round themselves
      elif [ "$rc" -ne 0 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; }; then
        status=$rc
        echo "[multihost] process $idx exited with status $rc; stopping the others (logs: $LOG_DIR)" >&2
        [ "$idx" -ne 0 ] && tail -n 20 "$LOG_DIR/process-$idx.log" >&2
        stop_all
      fi
    fi
  done
  [ "$running" -eq 0 ] && break
  if [ -n "$grace_deadline" ] && [ "$SECONDS" -ge "$grace_deadline" ]; then
    echo "[multihost] processes still running ${GRACE} s after the stop request; killing them" >&2
    status=124
    stop_all
  elif [ "$SECONDS" -ge "$deadline" ]; then
    echo "[multihost] timed out after $TIMEOUT s; stopping every process (logs: $LOG_DIR)" >&2
    status=124
    stop_all
  fi
  sleep 0.5
done
exit "$status"
