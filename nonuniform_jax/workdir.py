"""What a run keeps in its workdir, and the rules that protect it.

    DIR/config.json        the run's config (written first; a different config is refused)
    DIR/metrics.jsonl      one JSON line per logged step: every scalar that is a function of
                           (config, seed) — identical across reruns on one machine
    DIR/timing.jsonl       step time and throughput at the same steps (machine-dependent)
    DIR/measures.jsonl     sharpness/nonuniformity measures with their settings, per step
    DIR/dataset.json       at the start: the data's facts (sizes, subset and its class balance,
                           preprocessing, label noise), also in the summary
    DIR/summary.json       at the end: config, versions, devices, final metrics, status
    DIR/checkpoints/       Orbax checkpoints, each with the config and the logs up to its step
                           (``nonuniform_jax.checkpoints``)
    DIR/events.out.*       TensorBoard (CLU metric writers)
    DIR/run.lock           held by the run that owns the workdir (``locked``)

Paths go through ``etils.epath``, so DIR may be local or a bucket (``gs://...``). Every file is
written whole to a temporary name and renamed into place, so a killed process never leaves a
half-written file (a bucket has no appends either).
"""

import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import socket
from typing import Any

from etils import epath
import jax

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TIMING_FILE = "timing.jsonl"
SUMMARY_FILE = "summary.json"
DATASET_FILE = "dataset.json"
MEASURES_FILE = "measures.jsonl"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"   # checkpoints that failed to read back, kept for a look
LABEL_NOISE_FILE = "label_noise.npz"
LOCK_FILE = "run.lock"

# Settings that may differ when a run is resumed: how it is shown, and how many devices run it
# (a run preempted on 8 devices may continue on 1; results agree to float tolerance).
PRESENTATION_KEYS = ("progress", "overwrite", "parallel.num_devices")

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "clu", "ml_collections",
            "tensorflow-datasets", "tensorflow-cpu", "numpy", "nonuniform_jax")


def package_versions() -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def flatten(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


# Settings added after runs were made, with the value that keeps such a run's meaning: a
# config.json without one reads as holding this value, so those runs still resume and measure.
ADDED_DEFAULTS = {"data_seed": -1, "precision": "float32", "kfac.init": "batch",
                  "kfac.inverse": "exact"}


def with_added_defaults(config: dict) -> dict:
  """``config`` (as read from config.json) with the ``ADDED_DEFAULTS`` it lacks."""
  out = json.loads(json.dumps(config))
  flat = flatten(out)
  for key, value in ADDED_DEFAULTS.items():
    if key not in flat:
      *path, last = key.split(".")
      node = out
      for part in path:
        node = node.setdefault(part, {})
      node[last] = value
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  a, b = flatten(with_added_defaults(old)), flatten(with_added_defaults(new))
  keys = {k for k in set(a) | set(b) if k not in PRESENTATION_KEYS}
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(keys) if a.get(k) != b.get(k)]


def read_json(path) -> Any:
  return json.loads(epath.Path(path).read_text())


def write_text(path, text: str) -> None:
  """Writes ``text`` to a temporary name, then renames it over ``path``: a reader, a killed
  process or a full disk never leaves ``path`` half-written (on failure the old file stays)."""
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except BaseException:
    with contextlib.suppress(OSError):
      if tmp.exists():
        tmp.unlink()
    raise


def is_remote(workdir: str) -> bool:
  return "://" in str(workdir)


def check_writable(workdir: str) -> None:
  """Refuses, in one line and writing nothing, a workdir that is a file, lies under a file or
  cannot be written. Buckets (``gs://``) are not checked here."""
  if is_remote(workdir):
    return
  path = epath.Path(os.path.abspath(workdir))
  target = path
  while not target.exists():
    target = target.parent
  if not target.is_dir():
    if target == path:
      raise ValueError(f"workdir {workdir!r} is a file, not a directory; choose a directory")
    raise ValueError(f"workdir {workdir!r} cannot be created: {str(target)!r} is a file")
  if not os.access(target, os.W_OK | os.X_OK):
    where = "" if target == path else f" (its parent {str(target)!r} is not writable)"
    raise ValueError(f"workdir {workdir!r} is not writable{where}; choose another --workdir or "
                     "fix its permissions")


class WorkdirBusy(ValueError):
  """Another live process holds the workdir's lock."""


def lock_holder(workdir: str) -> str | None:
  """Who holds ``workdir``'s lock ('pid N on HOST since TIME'), or None if nobody does. Reads
  only: nothing is created."""
  path = os.path.join(workdir, LOCK_FILE)
  if is_remote(workdir) or not os.path.exists(path):
    return None
  fd = os.open(path, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    with open(path) as f:
      return f.read().strip() or "another process"
  finally:
    os.close(fd)   # closing releases a lock this call took
  return None


def _busy(workdir: str, holder: str) -> WorkdirBusy:
  return WorkdirBusy(f"workdir {workdir!r} is in use by another run ({holder}); wait for it to "
                     "end, or choose another --workdir")


def check_free(workdir: str) -> None:
  """Refuses at once, writing nothing, a workdir whose lock another process holds."""
  holder = lock_holder(workdir)
  if holder:
    raise _busy(workdir, holder)


@contextlib.contextmanager
def locked(workdir: str):
  """Holds ``workdir/run.lock`` (an exclusive ``flock``) for the run's lifetime; another run
  asking for it is refused at once with :class:`WorkdirBusy` naming the holder. The operating
  system releases the lock when the process ends however it ends (``kill -9`` included), so a
  lock is never stale. Buckets have no locks: there the caller must not start two runs."""
  if is_remote(workdir):
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise _busy(workdir, lock_holder(workdir) or "another process") from None
  try:
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
    yield
  finally:
    os.close(fd)


def write_json(path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def prepare(workdir: str, config: dict, overwrite: bool, *, write: bool = True,
            checkpoints: tuple[bool, dict | None] = (False, None)) -> str:
  """Claims ``workdir`` for a run of ``config``.

  Returns 'new' (empty or replaced), 'resume' (same config, unfinished), or 'completed' /
  'diverged' (same config, ended so). The run's config is read from ``config.json`` or, when
  that was lost, from the newest checkpoint: ``checkpoints`` is (whether any exist, the config
  recorded in the newest one's meta or None). A workdir holding a different config raises
  ValueError and is left as it was, unless ``overwrite``, in which case the old run's files are
  removed first. With ``write=False`` it only reads: the same status or error, and nothing
  written or removed.
  """
  config = json.loads(json.dumps(config, default=str))   # as it reads back (tuples are lists)
  root = epath.Path(workdir)
  config_path = root / CONFIG_FILE
  has_checkpoints, checkpoint_config = checkpoints
  recorded = read_json(config_path) if config_path.exists() else checkpoint_config
  if recorded is None and has_checkpoints and not overwrite:
    raise ValueError(f"workdir {workdir!r} holds checkpoints but no config.json, and the "
                     "checkpoints do not record their config (an older version wrote them); "
                     "restore config.json, use another --workdir or pass "
                     "--config.overwrite=True to replace them")
  status = "new"
  if recorded is not None:
    diffs = config_differences(recorded, config)
    if diffs and not overwrite:
      shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
      raise ValueError(f"workdir {workdir!r} holds a run of a different config ({shown}); "
                       "use another --workdir or pass --config.overwrite=True to replace it")
    if not diffs:
      summary = root / SUMMARY_FILE
      ended = read_json(summary).get("status") if summary.exists() else None
      if ended in ("completed", "diverged"):
        return ended
      status = "resume"
  if write:
    if status == "new" and (recorded is not None or has_checkpoints):
      clear(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json(config_path, config)
  return status


def prepare_once(workdir: str, config: dict, overwrite: bool,
                 checkpoints: tuple[bool, dict | None] = (False, None)) -> str:
  """:func:`prepare` for a run of any number of processes, each of which calls this.

  Every process reads the status from the same files (and raises the same error, before any
  process waits for another); then process 0 alone writes and removes, so that processes do not
  write one file at once or delete what another has just written; no process returns before it
  has.
  """
  if jax.process_count() == 1:
    return prepare(workdir, config, overwrite, checkpoints=checkpoints)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  status = prepare(workdir, config, overwrite, write=False, checkpoints=checkpoints)
  multihost_utils.sync_global_devices("workdir read")
  if jax.process_index() == 0:
    prepare(workdir, config, overwrite, checkpoints=checkpoints)
  multihost_utils.sync_global_devices("workdir prepared")
  return status


def clear(root: epath.Path) -> None:
  """Removes what a run wrote: the files this module names and TensorBoard events; nothing else."""
  for name in (CONFIG_FILE, METRICS_FILE, TIMING_FILE, SUMMARY_FILE, MEASURES_FILE,
               DATASET_FILE, LABEL_NOISE_FILE):
    if (root / name).exists():
      (root / name).unlink()
  for name in (CHECKPOINT_DIR, CORRUPT_DIR):
    if (root / name).exists():
      (root / name).rmtree()
  for path in root.glob("events.out.tfevents*"):
    path.unlink()


class JsonLog:
  """A JSON-lines log that a resumed run continues exactly.

  Opening it keeps the records with ``step <= last_step`` (those an interrupted run wrote after
  its last checkpoint are written again when the resumed run gets there).
  """

  def __init__(self, path, last_step: int):
    self.path = epath.Path(path)
    self.records = []
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          break
        if record.get("step", 0) <= last_step:
          self.records.append(record)
    self._lines = [json.dumps(r, sort_keys=True) for r in self.records]
    write_text(self.path, "".join(line + "\n" for line in self._lines))

  def append(self, record: dict) -> None:
    self.records.append(record)
    self._lines.append(json.dumps(record, sort_keys=True))
    write_text(self.path, "".join(line + "\n" for line in self._lines))
