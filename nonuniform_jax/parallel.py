"""Meshes and shardings (data parallelism with ``jax.jit`` and ``NamedSharding``), and the
multi-process runtime: start-up, a coordinated stop, and the loss of a process.

The batch is sharded along the mesh axis ``'data'``; parameters and optimizer state are
replicated. The same code runs on one CPU, several GPUs, a TPU pod slice, or several processes
on one machine (``launch/local_multiprocess.sh``).

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

import atexit
import contextlib
import os
import re
import signal
import sys
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# A process whose heartbeat (every HEARTBEAT_S, from a thread of its own) is missing for
# PEER_TIMEOUT_S is taken as lost: killed, crashed or hung. JAX's coordination service has its
# own, longer, heartbeat timeout; when it expires first, JAX's runtime ends the processes itself.
HEARTBEAT_S = 1.0
PEER_TIMEOUT_S = 10.0
JAX_HEARTBEAT_TIMEOUT_S = 30
# A process that ended (completed, refused, interrupted, failed) while another still runs
# after this many seconds leaves it waiting for collectives it will never join.
PEER_ENDED_GRACE_S = 30.0
SHUTDOWN_TIMEOUT_S = 60


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


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Set once JAX's preemption service holds SIGTERM (``initialize_distributed``): its handler is
# installed beneath Python's, which ``signal.signal`` would replace for good.
_PREEMPTION_SERVICE = []


@contextlib.contextmanager
def signals_held():
  """Holds Ctrl-C and SIGTERM back until the block ends, then delivers them again to this
  process under the handlers in force before (a no-op outside the main thread, where no handler
  runs); a signal ignored before stays ignored. For what must not stop halfway: an Orbax save
  interrupted inside its call had started background writes that ``wait_until_finished`` did
  not know of, which failed at interpreter shutdown ("cannot schedule new futures after
  interpreter shutdown"); a worker process started while the sweep was being stopped was never
  told to stop (``checkpoints.Checkpoints.save``, ``sweep``)."""
  if threading.current_thread() is not threading.main_thread() or _PREEMPTION_SERVICE:
    # (With several processes the signals go to JAX's preemption service, and the loop stops
    # every process at the same step boundary: never inside a save.)
    yield
    return
  received = []
  held = {s: signal.getsignal(s) for s in HELD_SIGNALS}
  held = {s: h for s, h in held.items() if h is not signal.SIG_IGN and h is not None}
  for s in held:
    signal.signal(s, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    for s, handler in held.items():
      signal.signal(s, handler)
    for s in dict.fromkeys(received):
      os.kill(os.getpid(), s)


def single_blas_thread():
  """Limits the BLAS libraries of this process (OpenBLAS, which jax's CPU LAPACK calls run on)
  to one thread each; returns the ``threadpoolctl`` limiter (``.restore_original_limits()``,
  or use it as a context manager).

  A LAPACK call inside an XLA:CPU program (the eigendecompositions of the K-FAC refresh,
  ``jnp.linalg.eigh``) runs on OpenBLAS's threads, which then contend for the cores with XLA's
  own pool, whose threads keep spinning for a while after each program. On a 2-core machine
  the refresh step of CSAM-K-FAC on the default MLP took 14-36 ms with two OpenBLAS threads
  (the more steps ran before it, the slower) against 9 ms with one, and the refresh's
  eigendecompositions alone 26 ms after 49 ordinary steps against 7 ms. The command-line entry
  points call this at start (``cli.as_program``); a program of one's own may call it too.
  """
  import scipy.linalg.cython_lapack  # noqa: F401  (jax's CPU LAPACK: load it before limiting)
  import threadpoolctl
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


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


def initialize_distributed(environ=None, on_peer_lost: Callable[[str], None] | None = None
                           ) -> bool:
  """Starts JAX's multi-process runtime when the environment describes several processes.

  * ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: explicit (any cluster,
    and ``launch/local_multiprocess.sh`` on one machine);
  * SLURM with more than one task (``SLURM_NTASKS``), or a TPU VM pod slice
    (``TPU_WORKER_HOSTNAMES`` listing several hosts): detected by ``jax.distributed.initialize``.

  On CPU the processes' collectives go through gloo (TCP). Then:

  * SIGTERM (and Ctrl-C, turned into SIGTERM) goes to JAX's preemption service, which agrees
    with the other processes on a step at which all stop (``stop_requested``);
  * a thread publishes this process's heartbeat and watches the others': a process silent for
    ``PEER_TIMEOUT_S`` (killed, crashed, hung), or still running ``PEER_ENDED_GRACE_S`` after
    another ended, calls ``on_peer_lost(message)`` (one line), which must end the process
    (default: print it and exit with status 1) — not wait minutes in a collective that the lost
    process will never join.

  Must run before any JAX computation. Returns whether it started the runtime.
  """
  env = os.environ if environ is None else environ
  explicit = bool(env.get("JAX_COORDINATOR_ADDRESS"))
  if not explicit and not (int(env.get("SLURM_NTASKS", "1")) > 1
                           or "," in env.get("TPU_WORKER_HOSTNAMES", "")):
    return False
  reserve_cpu_threads(env)
  # Read by the CPU backend only (GPUs and TPUs have their own collectives).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = (dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"])) if explicit else {})
  jax.distributed.initialize(**where, heartbeat_timeout_seconds=JAX_HEARTBEAT_TIMEOUT_S,
                             shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
  _PREEMPTION_SERVICE.append(True)
  _PeerWatch(on_peer_lost or _exit_lost).start()
  return True


def stop_requested(iteration: int) -> bool:
  """Whether every process stops before its ``iteration``-th step (counted from 1 in this
  run): True at the same iteration on every process once any of them received SIGTERM (JAX's
  preemption sync point); always False in a single process, where SIGTERM interrupts."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.reached_preemption_sync_point(iteration))


def _exit_lost(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(1)


class _PeerWatch(threading.Thread):
  """The heartbeat of this process and the watch on the others' (``initialize_distributed``),
  through the coordination service's key-value store: key ``nonuniform_jax/alive/<process>``
  holds a counter, or ``ended`` once the process exits."""

  PREFIX = "nonuniform_jax/alive/"

  def __init__(self, on_lost: Callable[[str], None]):
    super().__init__(name="peer-watch", daemon=True)
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self.client = distributed.global_state.client
    self.index, self.count = jax.process_index(), jax.process_count()
    self.on_lost = on_lost
    self.ended = threading.Event()
    atexit.register(self._end)   # runs before JAX's own shutdown (registered earlier)

  def _end(self) -> None:
    self.ended.set()
    try:
      self.client.key_value_set(self.PREFIX + str(self.index), "ended", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  def run(self) -> None:
    started = time.monotonic()
    seen = {p: (None, started) for p in range(self.count) if p != self.index}
    beat, unreachable_since = 0, None
    while not self.ended.wait(HEARTBEAT_S):
      now = time.monotonic()
      try:
        beat += 1
        self.client.key_value_set(self.PREFIX + str(self.index), str(beat), allow_overwrite=True)
        # One request for all (a pod's hundreds of processes, each once a second).
        published = dict(self.client.key_value_dir_get(self.PREFIX))
        values = {p: published.get(self.PREFIX + str(p)) for p in seen}
        unreachable_since = None
      except Exception as e:  # pylint: disable=broad-except
        unreachable_since = unreachable_since or now
        if now - unreachable_since > PEER_TIMEOUT_S and not self.ended.is_set():
          self.on_lost(f"process {self.index} of {self.count} lost the coordinator (process 0) "
                       f"for {PEER_TIMEOUT_S:.0f} s ({type(e).__name__}); stopping; run the "
                       "same command to resume from the last checkpoint")
        continue
      for p, value in values.items():
        last, since = seen[p]
        if value != last:
          seen[p] = (value, now)
          continue
        quiet = now - since
        if value == "ended" and quiet > PEER_ENDED_GRACE_S:
          lost = f"process {p} of {self.count} ended {quiet:.0f} s ago while this one runs"
        elif value != "ended" and quiet > PEER_TIMEOUT_S:
          lost = (f"process {p} of {self.count} stopped responding (no heartbeat for "
                  f"{quiet:.0f} s: killed, crashed or hung)")
        else:
          continue
        if not self.ended.is_set():
          self.on_lost(f"{lost}; process {self.index} stops too; run the same command to "
                       "resume from the last checkpoint")
        return


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


def host_local(tree):
  """``tree``'s arrays whole on this process's first device: for computations that each process
  runs alone on the same inputs (the measures). A replicated array is read from its local copy;
  one sharded across processes is gathered (a collective: every process must call this)."""
  def local(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_replicated:
      return x.addressable_data(0)
    if x.is_fully_addressable:
      return jax.device_put(x, jax.local_devices()[0])
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return jax.device_put(multihost_utils.process_allgather(x, tiled=True),
                          jax.local_devices()[0])
  return jax.tree.map(local, tree)
