#!/usr/bin/env bash
# Train on GPUs: one host with any number of GPUs, or several hosts.
#
#   launch/gpu.sh CONFIG WORKDIR [--config.key=value ...]          # one host, all its GPUs
#
# It runs from the repository root wherever it is called from, so a relative CONFIG or WORKDIR
# is relative to the root; overrides are passed on word for word.
#
# Several hosts without SLURM: run the same command on every host with
#   JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i launch/gpu.sh ...
# With SLURM: sbatch launch/slurm_gpu.sbatch CONFIG WORKDIR [overrides] (one task per host).
#
# The first run installs the CUDA build of JAX into .venv (SETUP=0 skips it). WORKDIR may be a
# shared filesystem path or a bucket; every process writes its checkpoint shards, process 0 the
# logs and the summary.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,15p' "$0"; exit 2; fi
cd "$(dirname "$0")/.."
CONFIG=$1 WORKDIR=$2
shift 2
if [ "${SETUP:-1}" = 1 ] && ! .venv/bin/python -c 'import jax_cuda12_plugin' 2>/dev/null; then
  [ -d .venv ] || python3.11 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt -c constraints.txt -e .
  .venv/bin/pip install -q 'jax[cuda12]==0.10.2'
fi
exec .venv/bin/python -m nonuniform_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
