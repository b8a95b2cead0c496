#!/usr/bin/env bash
# Train on a Cloud TPU VM (a single host or a pod slice): create the VM, install the project on
# every worker, run one config on all workers at once, then delete the VM.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG GS_WORKDIR [--config.key=value ...]
#   e.g. TFDS_DATA_DIR=gs://my-bucket/tfds launch/tpu_vm.sh nu-v4 us-central2-b v4-32 \
#        configs/cifar10_resnet20.py gs://my-bucket/runs/r20-csam --config.optimizer.name=csam
#
# Environment: TFDS_DATA_DIR (a bucket holding prepared TFDS data; required for TFDS datasets),
# RUNTIME (TPU software version, default tpu-ubuntu2204-base), REPO (git URL to clone; default:
# copy this checkout), KEEP=1 to keep the VM afterwards. Needs an authenticated gcloud.
# On a pod slice every worker runs the same command; JAX finds its peers itself
# (jax.distributed.initialize), each worker reads its own shard of the data, Orbax writes the
# checkpoints from all hosts, and only worker 0 writes logs and the summary to GS_WORKDIR.
set -euo pipefail
if [ $# -lt 5 ]; then sed -n '2,16p' "$0"; exit 2; fi
NAME=$1 ZONE=$2 ACCELERATOR=$3 CONFIG=$4 WORKDIR=$5
shift 5
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all() { tpu ssh "$NAME" --worker=all --command="$1"; }

tpu create "$NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
[ "${KEEP:-0}" = 1 ] || trap 'tpu delete "$NAME" --quiet' EXIT

if [ -n "${REPO:-}" ]; then
  on_all "git clone --depth 1 $REPO nonuniform_jax"
else
  tar czf /tmp/nonuniform_jax.tgz --exclude=.venv --exclude=.git --exclude=workdirs .
  tpu scp /tmp/nonuniform_jax.tgz "$NAME":~/ --worker=all
  on_all "mkdir -p nonuniform_jax && tar xzf nonuniform_jax.tgz -C nonuniform_jax"
fi
on_all "cd nonuniform_jax && sudo apt-get -qq update && sudo apt-get -qq install -y python3.11-venv \
  && python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -c constraints.txt -e . \
  && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
on_all "cd nonuniform_jax && TFDS_DATA_DIR=${TFDS_DATA_DIR:-} .venv/bin/python -m nonuniform_jax.main \
  --config=$CONFIG --workdir=$WORKDIR --config.progress=False $*"
