#!/usr/bin/env bash
# Several processes of one run on this machine: the multi-host path (jax.distributed, a
# coordinator, gloo collectives between processes) without a cluster.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.key=value ...]
#
# Starts N processes of `python -m nonuniform_jax.main --config=CONFIG --workdir=WORKDIR ...` with
# the coordinator on a free port of 127.0.0.1, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=0..N-1 and
# DEVICES_PER_PROCESS (default 1) simulated CPU devices each, as launch/gpu.sh and
# launch/slurm_gpu.sbatch set them on a cluster. Process 0 writes the logs and the summary and
# holds the workdir's lock; every process writes its checkpoint shards. Process 0's output comes
# as it is, the others' prefixed with [process i].
#
# SIGTERM or Ctrl-C stops every process after the checkpoint being written (exit 130); the same
# command resumes. The status is the first non-zero status of a process (0 if all completed).
# It runs from the repository root wherever it is called from, so a relative CONFIG or WORKDIR
# is relative to the root. PYTHON (default .venv/bin/python) names the interpreter.
set -euo pipefail
if [ $# -lt 3 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then sed -n '2,19p' "$0"; exit 2; fi
cd "$(dirname "$0")/.."
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
PYTHON=${PYTHON:-.venv/bin/python}
DEVICES=${DEVICES_PER_PROCESS:-1}
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop TERM INT HUP
for ((i = 0; i < N; i++)); do
  (
    # Signals reach the trainers through the trap above (and their own handlers): the helpers
    # that prefix their lines must outlive them, or the last lines would be lost.
    trap '' TERM INT HUP
    export JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i
    export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
    command=("$PYTHON" -m nonuniform_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@")
    if [ "$i" = 0 ]; then
      exec "${command[@]}"
    fi
    # The others' lines, prefixed; the process's own status is kept (not sed's).
    exec "${command[@]}" > >(sed -u "s/^/[process $i] /") 2> >(sed -u "s/^/[process $i] /" >&2)
  ) &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (> 128) when a trapped signal arrives: wait until the process has ended,
  # then once more for its status (bash keeps it).
  # (bash's own notice of a killed process is dropped: the others say what happened, in one line)
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null || true; done
  code=0
  wait "$pid" 2>/dev/null || code=$?
  if [ "$status" = 0 ] && [ "$code" != 0 ]; then status=$code; fi
done
exit "$status"
