#!/usr/bin/env bash
# Train on a Cloud TPU VM (a single host or a pod slice): create the VM, install the project on
# every worker, run one config on all workers at once, then delete the VM.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG GS_WORKDIR [--config.key=value ...]
#   e.g. TFDS_DATA_DIR=gs://my-bucket/tfds launch/tpu_vm.sh nu-v4 us-central2-b v4-32 \
#        configs/cifar10_resnet20.py gs://my-bucket/runs/r20-csam --config.optimizer.name=csam
#
# CONFIG is a path inside the repository (relative to its root); overrides reach the workers
# word for word, so quoted values such as --config.model.widths='(128,64)' survive.
# Environment: TFDS_DATA_DIR (a bucket holding prepared TFDS data; required for TFDS datasets),
# RUNTIME (TPU software version, default tpu-ubuntu2204-base), REPO (git URL to clone; default:
# copy this checkout), KEEP=1 to keep the VM afterwards, DRY_RUN=1 to print the gcloud and tar
# commands instead of running them, MODULE=nonuniform_jax.sweep to run that command instead of
# nonuniform_jax.main (what the scripts of `python -m nonuniform_jax.sweep --emit tpu_vm` do).
# Needs an authenticated gcloud.
# On a pod slice every worker runs the same command; JAX finds its peers itself
# (jax.distributed.initialize), each worker reads its own shard of the data, Orbax writes the
# checkpoints from all hosts, and only worker 0 writes logs and the summary to GS_WORKDIR.
set -euo pipefail
if [ $# -lt 5 ]; then sed -n '2,19p' "$0"; exit 2; fi
cd "$(dirname "$0")/.."   # the checkout that is copied, wherever this is run from
NAME=$1 ZONE=$2 ACCELERATOR=$3 CONFIG=$4 WORKDIR=$5
shift 5
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
MODULE=${MODULE:-nonuniform_jax.main}
TARBALL=/tmp/nonuniform_jax-$NAME.tgz   # one per VM: several may be launched at once
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
tpu() { run gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
# The workers' shell parses the command again: every word that comes from the user is quoted.
on_all() { tpu ssh "$NAME" --worker=all --command="$1"; }
quote() { printf '%q ' "$@"; }

tpu create "$NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
[ "${KEEP:-0}" = 1 ] || trap 'tpu delete "$NAME" --quiet' EXIT

if [ -n "${REPO:-}" ]; then
  on_all "git clone --depth 1 $(quote "$REPO") nonuniform_jax"
else
  run tar czf "$TARBALL" --exclude=.venv --exclude=.git --exclude=workdirs .
  tpu scp "$TARBALL" "$NAME":~/nonuniform_jax.tgz --worker=all
  on_all "mkdir -p nonuniform_jax && tar xzf nonuniform_jax.tgz -C nonuniform_jax"
fi
on_all "cd nonuniform_jax && sudo apt-get -qq update && sudo apt-get -qq install -y python3.11-venv \
  && python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -c constraints.txt -e . \
  && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
MAIN=(.venv/bin/python -m "$MODULE" --config="$CONFIG" --workdir="$WORKDIR")
# A training run draws no progress bar on the workers (a sweep's members never do).
if [ "$MODULE" = nonuniform_jax.main ]; then MAIN+=(--config.progress=False); fi
MAIN+=("$@")
on_all "cd nonuniform_jax && TFDS_DATA_DIR=$(quote "${TFDS_DATA_DIR:-}")$(quote "${MAIN[@]}")"
