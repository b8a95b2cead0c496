"""Meshes and shardings: data parallelism with ``jax.jit`` and ``NamedSharding``.

The batch is sharded along the mesh axis ``'data'``; parameters and optimizer state are
replicated. The same code runs on one CPU, several GPUs or a TPU pod slice.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A one-dimensional mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def device_summary(mesh: Mesh) -> dict:
  """What the run summary records about the hardware."""
  devices = mesh.devices.ravel()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "num_devices": int(devices.size), "num_processes": jax.process_count(),
          "mesh_shape": dict(mesh.shape)}


def initialize_distributed(environ=None) -> bool:
  """Starts JAX's multi-process runtime when the environment describes several processes.

  * ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: explicit (any cluster);
  * SLURM with more than one task (``SLURM_NTASKS``), or a TPU VM pod slice
    (``TPU_WORKER_HOSTNAMES`` listing several hosts): detected by ``jax.distributed.initialize``.

  Must run before any JAX computation. Returns whether it started the runtime.
  """
  import os  # pylint: disable=g-import-not-at-top
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()
    return True
  return False


def state_shardings(state, mesh: Mesh, fully_sharded: bool = False):
  """Shardings for a train state (any pytree of arrays or shape structs).

  Replicated by default. ``fully_sharded``: every leaf is split along its largest axis that the
  number of devices divides (ZeRO-3/FSDP-style; XLA gathers parameters where a step needs them),
  and replicated when no axis divides — for models whose state does not fit on one device.
  """
  n = mesh.shape[DATA_AXIS]

  def spec(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if fully_sharded:
      for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] >= n and shape[axis] % n == 0:
          return NamedSharding(mesh, P(*([None] * axis + [DATA_AXIS])))
    return replicated(mesh)

  return jax.tree.map(spec, state)
