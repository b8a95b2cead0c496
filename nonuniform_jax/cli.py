"""What the package's commands share: a quiet start, exit statuses, one-line errors, signals.

Exit statuses (every command):

    0    completed
    2    bad input: a setting, a config file, a workdir — one line on stderr, nothing written
    3    the run diverged (a non-finite training loss); its summary says at which step
    75   the disk filled up: one line naming the path and its free space; nothing already
         saved is lost, and the same command resumes once there is room
    130  interrupted (Ctrl-C or SIGTERM) after finishing the checkpoint being written; the
         same command resumes

Import this module before TensorFlow or JAX: it sets the environment that keeps their start-up
banners off the console (TensorFlow serves only the input pipelines here, whose results its
oneDNN setting does not change).
"""

import errno
import logging
import os
import shutil
import signal
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")    # TensorFlow's start-up notices
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # its oneDNN banner (printed twice)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_DISK_FULL = 75
EXIT_INTERRUPTED = 130


def _drop_disk_full(record: logging.LogRecord) -> bool:
  """Orbax logs a full disk from each of its writer threads, with tracebacks; ``guarded`` says
  it once, in one line."""
  text = record.getMessage() + (f" {record.exc_info[1]}" if record.exc_info else "")
  return "No space left on device" not in text


_QUIET = []


def quiet_logs() -> None:
  """JAX reports at INFO each accelerator backend it does not find, Orbax and CLU every save
  and scalar; the progress bar and the workdir's files already say what matters. And a broken
  checkpoint, reported in one line by ``nonuniform_jax.checkpoints``, leaves Orbax's reads of
  its other arrays failing in background coroutines, which Python would print as a traceback
  each when they are collected: those are logged at debug level instead."""
  if _QUIET:   # once per process
    return
  _QUIET.append(True)
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():   # absl's own flags, which absl logging reads: defaults
    flags.FLAGS.mark_as_parsed()
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_drop_disk_full)
  default_hook = sys.unraisablehook

  def hook(info):
    text = f"{getattr(info, 'exc_value', '')}"
    if ("Encountered error while reading array index" in text
        or "Event loop is closed" in text):
      logging.debug("ignored after a failed checkpoint read: %s", text[:200])
      return
    default_hook(info)
  sys.unraisablehook = hook


def fail(message: str, status: int = EXIT_BAD_INPUT):
  """Ends the process with ``error: message`` (one line) on stderr. After an interruption or
  a failed write, a library thread left waiting (a writer, a prefetcher) must not keep the
  process alive: if the normal shutdown has not ended it within 30 s, it is ended then."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  if status in (EXIT_INTERRUPTED, EXIT_DISK_FULL) and _PROGRAM:
    timer = threading.Timer(30.0, os._exit, args=(status,))
    timer.daemon = True
    timer.start()
  sys.exit(status)


_PROGRAM = []   # set when a command runs as the process's program (not called in-process)


def as_program() -> None:
  """Marks this process as running a command (``python -m nonuniform_jax.X``): SIGTERM
  (a scheduler's preemption, ``timeout``, ``kill``) then stops it as Ctrl-C does — the run
  finishes the checkpoint it is writing and exits with 130 — and ``fail`` may end a process
  whose shutdown hangs."""
  _PROGRAM.append(True)

  def handler(signum, frame):
    del signum, frame
    raise KeyboardInterrupt("SIGTERM")
  signal.signal(signal.SIGTERM, handler)


def is_disk_full(error: BaseException) -> bool:
  """Whether ``error`` (or an error it was raised from) says the disk is full."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    text = str(error)
    if "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and "space" in text):
      return True
    error = error.__cause__ or error.__context__
  return False


def _free_space(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  free = shutil.disk_usage(path).free
  for unit in ("bytes", "KiB", "MiB", "GiB"):
    if free < 1024 or unit == "GiB":
      return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
    free /= 1024
  return ""


def guarded(fn, workdir: str | None = None):
  """Runs ``fn()`` and turns the ways a command ends into exit statuses and one-line messages
  (bad input, interruption, a full disk); returns what ``fn`` returns."""
  from nonuniform_jax import train  # pylint: disable=g-import-not-at-top
  try:
    return fn()
  except train.Interrupted as e:
    fail(str(e), EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    fail("interrupted; run the same command to resume", EXIT_INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    if workdir is not None and is_disk_full(e):   # Orbax reports it as a ValueError too
      logging.debug("disk full", exc_info=True)
      fail(f"no space left on the device of workdir {workdir!r} ({_free_space(workdir)} free); "
           "what was saved is intact: free some space and run the same command to resume",
           EXIT_DISK_FULL)
    if isinstance(e, ValueError):
      logging.debug("bad input", exc_info=True)
      fail(e)
    raise
