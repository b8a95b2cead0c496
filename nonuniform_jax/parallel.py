"""Meshes and shardings: data parallelism with ``jax.jit`` and ``NamedSharding``.

The batch is sharded along the mesh axis ``'data'``; parameters and optimizer state are
replicated. The same code runs on one CPU, several GPUs or a TPU pod slice.

XLA:CPU runs each device's share of a multi-device program on a thread of one pool, which it
sizes to the device count. The launch of the next program takes threads of that pool too, and
blocks them until every device's launch has started and the device has a free slot (at most 32
programs in flight per device): with as many threads as devices, a launch running ahead of a
step whose all-reduce waits for its last device holds the thread that device needs, and the
all-reduce never completes (measured: the default config on 8 simulated devices, 300 steps of
up to 100 between host syncs, aborts after 40 s with "Expected 8 threads to join the rendezvous";
2 processes of 4 devices hang forever in gloo). One launch and one executing program at a time
never need more than twice the local devices, so this module asks for that many threads
(``PJRT_NPROC``, read when JAX creates its CPU backend) on import and in
``initialize_distributed``; ``data_mesh`` refuses a mesh whose backend started with fewer.
"""

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def _local_cpu_devices(environ) -> int:
  """The CPU devices a process will have: ``--xla_force_host_platform_device_count`` in
  ``XLA_FLAGS``, ``JAX_NUM_CPU_DEVICES``, or jax's ``jax_num_cpu_devices`` setting."""
  counts = [int(n) for n in re.findall(r"--xla_force_host_platform_device_count=(\d+)",
                                       environ.get("XLA_FLAGS", ""))]
  counts.append(int(environ.get("JAX_NUM_CPU_DEVICES", "0") or 0))
  counts.append(int(jax.config.jax_num_cpu_devices or 0))
  return max(counts + [1])


def _cpu_threads(environ) -> int:
  """The threads XLA:CPU gives its pool, from the environment it reads (before the devices)."""
  for name in ("PJRT_NPROC", "NPROC"):
    if environ.get(name, "").isdigit():
      return int(environ[name])
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def reserve_cpu_threads(environ=None) -> None:
  """Asks XLA:CPU for at least twice as many pool threads as local CPU devices (module doc),
  unless ``PJRT_NPROC`` is set. Effective only before JAX creates its CPU backend."""
  env = os.environ if environ is None else environ
  devices = _local_cpu_devices(env)
  if devices > 1 and "PJRT_NPROC" not in env:
    env["PJRT_NPROC"] = str(max(_cpu_threads(env), 2 * devices))


reserve_cpu_threads()


def data_mesh(devices=None) -> Mesh:
  """A one-dimensional mesh over ``devices`` (default: every device of every process).

  Refuses (ValueError, one line) several CPU devices in a process whose backend started with
  fewer than twice as many pool threads (module doc): its steps would deadlock."""
  devices = jax.devices() if devices is None else devices
  local = [d for d in devices if d.process_index == jax.process_index()]
  if len(local) > 1 and local[0].platform == "cpu":
    threads = max(_cpu_threads(os.environ), jax.local_device_count())
    if threads < 2 * len(local):
      raise ValueError(
          f"{len(local)} CPU devices in one process need {2 * len(local)} XLA:CPU threads, "
          f"and JAX started with {threads}: set PJRT_NPROC={2 * len(local)} before JAX starts "
          "(importing nonuniform_jax.parallel first does)")
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
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    reserve_cpu_threads(env)
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    reserve_cpu_threads(env)
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
