"""Checkpoints that carry what is needed to check and rebuild their workdir.

Each checkpoint ``DIR/checkpoints/N`` is an Orbax composite of two items:

* ``state``: the train state (``ocp.args.StandardSave``: any device count restores it);
* ``meta``: JSON — the run's config, every record of metrics.jsonl, timing.jsonl and
  measures.jsonl up to step N, and a CRC-32 of each array of the state as it was saved.

So a run whose ``config.json`` or ``metrics.jsonl`` was lost resumes to exactly what an
uninterrupted run writes, and a checkpoint whose bytes changed after it was written (a torn copy,
a bad disk) is detected. Orbax verifies that a checkpoint was completely written, not what its
files hold later, hence the checksum. :meth:`Checkpoints.restore_latest` tries the newest
checkpoint first and, when one cannot be read or does not match its checksum, moves it to
``DIR/checkpoints_corrupt/`` (nothing is deleted) and falls back to the next.
"""

import contextlib
import gc
import logging
import os
import sys
import threading
import zlib
from typing import Any, NamedTuple

from etils import epath
import jax
import numpy as np

from nonuniform_jax import parallel
from nonuniform_jax.workdir import CHECKPOINT_DIR, CORRUPT_DIR

META_FORMAT = 1


class Restored(NamedTuple):
  """A checkpoint read back: its step, the state (placed like the template) and its meta
  (None for checkpoints written before meta existed)."""
  step: int
  state: Any
  meta: dict | None


def checksums(state) -> dict:
  """``{leaf path: CRC-32}`` of each array of ``state`` as this process sees it whole (arrays
  sharded across processes are skipped: no process holds them)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        continue
      leaf = leaf.addressable_data(0)
    array = np.ascontiguousarray(jax.device_get(leaf))
    if array.dtype == object or jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
      continue
    out[jax.tree_util.keystr(path)] = zlib.crc32(array.tobytes())
  return out


def _root(workdir: str) -> epath.Path:
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


class Checkpoints:
  """Orbax checkpoints of one run under ``workdir/checkpoints``, the newest ``keep`` kept."""

  def __init__(self, workdir: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.workdir = workdir
    self.directory = _root(workdir) / CHECKPOINT_DIR
    self._keep = keep
    self._manager = None

  @property
  def manager(self):
    if self._manager is None:
      ocp = self._ocp
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=self._keep, create=True, cleanup_tmp_directories=True))
    return self._manager

  def steps(self) -> list[int]:
    """Saved steps, oldest first (no directory: none)."""
    if not self.directory.exists():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.name.isdigit() and p.is_dir())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving ``state`` at ``step`` with ``meta`` and the state's checksums (Orbax
    writes in the background; :meth:`wait` finishes it)."""
    ocp = self._ocp
    meta = {**meta, "format": META_FORMAT, "step": step, "checksums": checksums(state)}
    with parallel.signals_held():
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict | None:
    """The meta of checkpoint ``step`` without its arrays (None if it has none or is
    unreadable)."""
    ocp = self._ocp
    path = self.directory / str(step) / "meta"
    if not path.exists():
      return None
    try:
      return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
    except Exception:  # pylint: disable=broad-except
      return None

  def newest_meta(self) -> dict | None:
    """The meta of the newest checkpoint that has readable meta."""
    for step in reversed(self.steps()):
      meta = self.read_meta(step)
      if meta is not None:
        return meta
    return None

  def restore(self, step: int, like) -> Restored:
    """Checkpoint ``step`` placed like ``like`` (a state of the same structure on any
    devices). Raises ``CorruptCheckpoint`` naming it when it cannot be read or its arrays do
    not match their checksums."""
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    step_dir = self.directory / str(step)
    with _quiet_failures():
      try:
        if (step_dir / "default").exists():   # written before checkpoints carried meta
          # (read apart from the manager, which would then refuse to save composites)
          state = ocp.StandardCheckpointer().restore(step_dir / "default", abstract)
          return Restored(step, state, None)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        gc.collect()   # the failed reads' coroutines report here, while they are quiet
        raise CorruptCheckpoint(step_dir, f"unreadable ({_short(e)})") from e
    meta = restored["meta"]
    if not isinstance(meta, dict) or meta.get("step") != step:
      raise CorruptCheckpoint(step_dir, "its meta is not this checkpoint's")
    saved = meta.get("checksums") or {}
    found = checksums(restored["state"])
    bad = sorted(k for k in saved if k in found and found[k] != saved[k])
    if bad:
      raise CorruptCheckpoint(step_dir, f"checksum mismatch in {len(bad)} array(s), first "
                                        f"{bad[0]}")
    return Restored(step, restored["state"], meta)

  def restore_latest(self, like, *, quarantine: bool = True) -> Restored | None:
    """The newest checkpoint that reads back intact, or None when there is none. Each broken
    one on the way is reported in one line and (``quarantine``, process 0 only) moved to
    ``checkpoints_corrupt/``, so that the run saves that step again."""
    for step in reversed(self.steps()):
      try:
        return self.restore(step, like)
      except CorruptCheckpoint as e:
        moved = self._quarantine(step) if quarantine else None
        print(f"warning: checkpoint {e.path} is {e.reason}"
              + (f"; moved to {moved}" if moved else "") + "; falling back to the one before",
              file=sys.stderr)
        logging.info("corrupt checkpoint %s: %s", e.path, e.reason)
    return None

  def _quarantine(self, step: int) -> epath.Path | None:
    """Moves checkpoint ``step`` to ``checkpoints_corrupt/step[.k]`` (process 0) and forgets it
    (every process, after process 0 has moved it: reloading may be collective in Orbax).
    Returns where it went (process 0; None on the others)."""
    target = None
    if jax.process_index() == 0:
      target_dir = self.directory.parent / CORRUPT_DIR
      target_dir.mkdir(parents=True, exist_ok=True)
      target, k = target_dir / str(step), 1
      while target.exists():
        target, k = target_dir / f"{step}.{k}", k + 1
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    if self._manager is not None:
      self._manager.reload()
    return target

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def _short(error: Exception) -> str:
  """The first sentence of an error, without the TensorStore spec Orbax appends."""
  text = str(error).strip().split(". See full")[0]
  text = text.splitlines()[0] if text else ""
  return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


@contextlib.contextmanager
def _quiet_failures():
  """While a broken checkpoint is read, Orbax's reads of its other arrays fail in background
  coroutines and threads, which would print a traceback each: they are logged at debug level
  instead (the caller reports the failure in one line)."""
  def log(info):
    logging.debug("while reading a checkpoint: %s", getattr(info, "exc_value", info))
  old_unraisable, old_thread = sys.unraisablehook, threading.excepthook
  sys.unraisablehook, threading.excepthook = log, log
  try:
    yield
  finally:
    sys.unraisablehook, threading.excepthook = old_unraisable, old_thread


def read_state(workdir: str, step: int | None = None) -> dict:
  """The train state saved in ``workdir`` at ``step`` (default: the newest) as a nested dict of
  arrays (``step``, ``params``, ``batch_stats``, ``opt_state``) on this process's first device,
  without a template, whatever devices and processes wrote it: for looking at a run's weights
  outside the trainer."""
  ckpts = Checkpoints(workdir, 1)
  step = ckpts.steps()[-1] if step is None else step
  ocp = ckpts._ocp  # pylint: disable=protected-access
  path = ckpts.directory / str(step)
  path = path / ("default" if (path / "default").exists() else "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  return checkpointer.restore(path, target)


class CorruptCheckpoint(Exception):
  def __init__(self, path, reason: str):
    super().__init__(f"checkpoint {path} is {reason}")
    self.path, self.reason = path, reason
