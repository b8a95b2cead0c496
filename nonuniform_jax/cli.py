"""What the package's commands share: a quiet start, exit statuses, one-line errors, signals.

Exit statuses (every command):

    0    completed
    2    bad input: a setting, a config file, a workdir — one line on stderr, nothing written
    3    the run diverged (a non-finite training loss); its summary says at which step
    69   another process of a multi-process run was lost (killed, crashed, hung) or ended
         while this one ran: one line naming it; the same command resumes
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
import re
import shutil
import signal
import subprocess
import sys
import threading

from nonuniform_jax import parallel

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")    # TensorFlow's start-up notices
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # its oneDNN banner (printed twice)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PEER_LOST = 69
EXIT_DISK_FULL = 75
EXIT_INTERRUPTED = 130


def _drop_disk_full(record: logging.LogRecord) -> bool:
  """Orbax logs a full disk from each of its writer threads, with tracebacks; ``guarded`` says
  it once, in one line. And it warns when it looks for the metadata of a checkpoint still being
  written (its temporary folder), which is not missing but not yet there."""
  text = record.getMessage() + (f" {record.exc_info[1]}" if record.exc_info else "")
  if "Metadata file does not exist" in text and ".orbax-checkpoint-tmp" in text:
    return False
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
  logging.getLogger("absl").addFilter(_drop_disk_full)   # handlers added later see it too
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


def fail(message: str | None, status: int = EXIT_BAD_INPUT):
  """Ends the process with ``error: message`` (one line) on stderr (None: no line). After an
  interruption or a failed write, a library thread left waiting (a writer, a prefetcher) must
  not keep the process alive: if the normal shutdown has not ended it within 30 s, it is ended
  then."""
  if message is not None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  if status in (EXIT_INTERRUPTED, EXIT_DISK_FULL) and _PROGRAM:
    timer = threading.Timer(30.0, os._exit, args=(status,))
    timer.daemon = True
    timer.start()
  sys.exit(status)


_PROGRAM = []   # set when a command runs as the process's program (not called in-process)


def peer_lost(message: str) -> None:
  """Ends this process at once with ``error: message`` and status 69: another process of the
  run is gone, so every collective would wait for it (``parallel.initialize_distributed``
  calls this from its watch thread). Nothing is half-written: every file is renamed into
  place, and a checkpoint left unfinished is not one Orbax reads back."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_PEER_LOST)


def as_program() -> None:
  """Marks this process as running a command (``python -m nonuniform_jax.X``): SIGTERM
  (a scheduler's preemption, ``timeout``, ``kill``) then stops it as Ctrl-C does — the run
  finishes the checkpoint it is writing and exits with 130 — and ``fail`` may end a process
  whose shutdown hangs. BLAS runs single-threaded (``parallel.single_blas_thread``: XLA has the
  cores)."""
  _PROGRAM.append(True)
  parallel.single_blas_thread()

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


def guarded(fn, workdir: str | None = None, say_interrupted: bool = True):
  """Runs ``fn()`` and turns the ways a command ends into exit statuses and one-line messages
  (bad input, interruption, a full disk); returns what ``fn`` returns. ``say_interrupted``
  False: an interruption ends with its status and no line (a process whose parent says it)."""
  from nonuniform_jax import train  # pylint: disable=g-import-not-at-top
  try:
    return fn()
  except train.Interrupted as e:
    fail(str(e) if say_interrupted else None, EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    fail("interrupted; run the same command to resume" if say_interrupted else None,
         EXIT_INTERRUPTED)
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


# What JAX's C++ runtime and gloo write to the process's own stdout and stderr in a
# multi-process run: a banner per device and process at the first collective, and, when another
# process is lost and JAX's runtime ends this one itself (it does so at once when the lost one
# was the coordinator, process 0), a fatal log with a stack trace, after error logs of its own.
# Gloo's threads write the banner's pieces (text, a number, text...) concurrently, so the pieces
# of several banners interleave, and a line may hold only a number of one.
_BANNER = re.compile(rb"\[Gloo\] Rank \d*| is connected to \d*| peer ranks\. Expected number "
                     rb"of connected peer ranks is : \d*")
_BANNER_LEFTOVER = re.compile(rb"\s*\d*\s*")
_RUNTIME_ERROR = re.compile(rb"^E\d{4} [\d:.]+ +\d+ (coordination_service_agent|preemption_sync_"
                            rb"manager|coordination_service)\.cc:\d+\]")
_FATAL = re.compile(rb"Terminating process because the JAX distributed service detected fatal "
                    rb"errors.*?(?:absl::Status: ([^\n]*))?$|^terminate called after throwing an "
                    rb"instance of 'gloo::")


def one_line_runtime_errors(process_index: int, process_count: int) -> None:
  """Routes this process's stdout and stderr (file descriptors 1 and 2, where JAX's C++ runtime
  and gloo write as well as Python) through a small filter process: gloo's banners are dropped,
  and when JAX's runtime ends this process because another was lost, its fatal log, stack trace
  and the error logs before it become one line (the exit status is then the abort's, 134).
  Everything else passes unchanged, progress bars included. The filter ends with this
  process."""
  for fd in (1, 2):
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    target = os.dup(fd)
    filter_process = subprocess.Popen(
        [sys.executable, "-c", "from nonuniform_jax import cli; cli.filter_runtime_output()",
         str(process_index), str(process_count)],
        stdin=subprocess.PIPE, stdout=target, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    os.close(target)
    os.dup2(filter_process.stdin.fileno(), fd)
    filter_process.stdin.close()


def filter_runtime_output() -> None:
  """The filter process of ``one_line_runtime_errors``: standard input to standard output."""
  index, count = sys.argv[1:3]
  read, out = sys.stdin.buffer.raw, sys.stdout.buffer
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # it ends when its writer does, not before
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  pending, ended = b"", False
  while chunk := read.read(65536):
    if ended:
      continue
    pending += chunk
    *lines, pending = pending.split(b"\n")
    for line in lines:
      fatal = _FATAL.search(line)
      if fatal:
        reason = (fatal.group(1) or b"").decode(errors="replace").strip().rstrip(":")
        out.write(f"error: process {index} of {count} was ended by JAX's runtime: another process "
                  f"of the run was lost{f' ({reason})' if reason else ''}; run the same command "
                  "to resume from the last checkpoint\n".encode())
        ended = True
        break
      if _RUNTIME_ERROR.match(line):
        continue
      kept = _BANNER.sub(b"", line)
      if not _BANNER_LEFTOVER.fullmatch(kept) or (kept == line and not line.strip()):
        out.write(kept + b"\n")
    if b"\r" in pending and not ended:   # a progress bar redrawing its line: show it now
      out.write(pending)
      pending = b""
    out.flush()
  if pending and not ended:
    out.write(pending)
    out.flush()
