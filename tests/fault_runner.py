"""Runs ``python -m nonuniform_jax.main`` with one fault injected at a chosen point, for the
fault tests: a real SIGKILL (or SIGINT, or a full disk) at a known place in a real process.

    python tests/fault_runner.py FAULT -- --config=... --workdir=... [--config.k=v ...]

FAULT is one of:
  kill_at_step:N   SIGKILL once training step N is done (before anything after it is written)
  kill_in_save:N   SIGKILL right after checkpoint N's save has started (Orbax writes it in the
                   background: the process dies mid-write)
  kill_at_summary  SIGKILL when the summary is about to be written (after the last checkpoint)
  hold_at_step:N   after step N, print 'holding' and sleep (a run that keeps its workdir)
  disk_full_in_save:N  checkpoint N's save fails with ENOSPC, as on a full disk
"""

import errno
import os
import signal
import sys
import time


def _kill():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
  from nonuniform_jax import checkpoints, data, recorder  # pylint: disable=g-import-not-at-top
  kind, _, arg = fault.partition(":")
  n = int(arg) if arg else None
  if kind in ("kill_at_step", "hold_at_step"):
    real = data.prefetch_to_device

    def prefetch(iterator, size, sharding):
      source = real(iterator, size, sharding)
      if not hasattr(iterator, "gi_frame") or "train_batches" not in repr(iterator):
        yield from source
        return
      start = iterator.gi_frame.f_locals.get("start_step", 0)
      for i, batch in enumerate(source):
        if start + i == n:   # steps start+1 .. n are done
          if kind == "kill_at_step":
            _kill()
          print("holding", flush=True)
          # In short sleeps, as a training loop returns to Python between steps: a signal that
          # the kernel hands to another thread is acted on at the main thread's next bytecode.
          for _ in range(6000):
            time.sleep(0.1)
        yield batch
    data.prefetch_to_device = prefetch
  elif kind in ("kill_in_save", "disk_full_in_save"):
    real_save = checkpoints.Checkpoints.save

    def save(self, step, state, meta):
      if step == n and kind == "disk_full_in_save":
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
      real_save(self, step, state, meta)
      if step == n:
        _kill()
    checkpoints.Checkpoints.save = save
  elif kind == "kill_at_summary":
    recorder.Recorder.write_summary = lambda self, summary: _kill()
  else:
    raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
  # Ctrl-C as in a terminal's foreground: a test worker (pytest-xdist) starts its children with
  # SIGINT ignored, as a shell does for background jobs, and Python then keeps ignoring it.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  fault, sep, *args = sys.argv[1:]
  assert sep == "--", "usage: fault_runner.py FAULT -- ARGS"
  from nonuniform_jax import main  # pylint: disable=g-import-not-at-top
  install(fault)
  sys.argv = ["nonuniform_jax.main", *args]
  main.run()
