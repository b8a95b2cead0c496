"""Timing helpers shared by the benchmarks: medians of repeated, blocked calls."""

import statistics
import time

import jax


def time_fn(fn, *args, repeats: int = 20, warmup: int = 2) -> float:
  """Median wall time in seconds of ``fn(*args)``, each call blocked until its results exist.

  The first ``warmup`` calls (compilation) are not timed.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
