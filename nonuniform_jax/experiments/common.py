"""What the small studies share: minibatch orders, seed statistics and the files a study writes.

A study's workdir holds (the names of ``nonuniform_jax.workdir``)::

    config.json     the config (a workdir holding a different config is refused)
    metrics.jsonl   one JSON line per (method, logged step or epoch): means over seeds
    summary.json    per-method, per-seed final numbers, their mean and spread, and the settings
    results.md      the markdown table of the final numbers
    *.png           the figures (matplotlib, Agg backend)
"""

import json
import logging
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nonuniform_jax import workdir as wd


def shuffled_batches(key: jax.Array, n: int, batch_size: int, num_steps: int) -> jax.Array:
  """Minibatch indices [num_steps, batch_size]: epochs of a fresh random order of range(n) cut
  into n // batch_size batches (without replacement within an epoch; when batch_size does not
  divide n, each epoch leaves out the n mod batch_size examples its order puts last).

  The orders are argsorts of uniform draws: one random call site for every epoch, which keeps
  XLA's compile time down (each threefry call site costs about a second to compile on a CPU)."""
  per_epoch = n // batch_size
  epochs = -(-num_steps // per_epoch)
  orders = jnp.argsort(jax.random.uniform(key, (epochs, n)), axis=-1)
  return orders[:, :per_epoch * batch_size].reshape(-1, batch_size)[:num_steps]


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
  """One key per seed, [num_seeds]; seed k of a study is the same whatever num_seeds is."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(num_seeds))


def stats(values) -> dict:
  """Mean, standard deviation, min and max over seeds, and the per-seed values."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max()), "per_seed": [float(x) for x in v]}


def mean_std(s: dict, fmt: str = ".4g") -> str:
  """'mean ± std' of a :func:`stats` dict, for tables."""
  return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A markdown table; a '|' inside a cell (|x − 1|, min|θi|) is escaped so that it does not
  split the cell."""
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]) + "\n"


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed); imported only when plotting."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def run_study(config: ml_collections.ConfigDict, workdir: str,
              check: Callable[[ml_collections.ConfigDict], None],
              compute: Callable[[ml_collections.ConfigDict, str], tuple]) -> dict:
  """Validates ``config`` with ``check`` (ValueError, before anything is written or compiled),
  claims ``workdir`` for it and runs ``compute(config, workdir)``, which draws its
  figures into ``workdir`` and returns ``(results, records, table)``: the per-method results
  (JSON-able), the metrics lines and the markdown table. Writes metrics.jsonl, results.md and
  summary.json; returns the summary. A workdir whose run of the same config completed is not
  run again: its summary is returned."""
  check(config)
  status = wd.prepare(workdir, config.to_dict(), config.get("overwrite", False))
  summary_path = os.path.join(workdir, wd.SUMMARY_FILE)
  if status == "completed":
    logging.info("study in %s already completed", workdir)
    return wd.read_json(summary_path)
  start = time.time()
  results, records, table = compute(config, workdir)
  wall = time.time() - start
  wd.write_text(os.path.join(workdir, wd.METRICS_FILE),
                "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
  wd.write_text(os.path.join(workdir, "results.md"), table)
  summary = {"status": "completed", "task": config.task, "results": results,
             "wall_time_s": wall, "config": config.to_dict(),
             "versions": wd.package_versions(), "devices": [str(d) for d in jax.devices()]}
  wd.write_json(summary_path, summary)
  logging.info("%s finished in %.1f s; table:\n%s", config.task, wall, table)
  return json.loads(json.dumps(summary, default=str))
