#!/usr/bin/env bash
# The prepared accelerator check (benchmarks/gpu_check.py): about 8 minutes at most on one GPU,
# writing BENCHMARKS-GPU.md (or the path given with --out). It installs nothing: it needs JAX,
# Flax and Optax, which the accelerator machine's Python holds, and this repository.
#
#   bash benchmarks/gpu_check.sh [--out PATH] [--budget SECONDS]
#   bash benchmarks/gpu_check.sh --smoke        # a rehearsal on a CPU, tiny models
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export PYTHONUNBUFFERED=1
if [ "${1:-}" != "--smoke" ] && ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
  echo "gpu_check: no accelerator found by JAX (backend cpu); use --smoke to rehearse" >&2
  exit 2
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
