"""The SAM family on MNIST-1D: final test accuracy, generalization gap and step time, 5 seeds.

    python -m benchmarks.sam_family_table --workdir workdirs/sam_family_table

Trains ``configs/sam_family.py:mnist1d,METHOD`` (the default MLP, SGD with momentum 0.9, cosine
learning rate 0.1, batch 128, 3000 steps) for each method and seed, one run after another in
this process, into ``WORKDIR/METHOD/seed_S``, then prints one markdown table. A run already
completed there is not trained again (its summary is read back), so an interrupted table resumes
with the same command. ``--seeds``, ``--methods`` and ``--num_steps`` narrow it (the first to
quick checks; the README's table is the default).

Columns, over the seeds (mean ± standard deviation, ddof = 1):

* test accuracy at the end of training;
* generalization gap: test loss − training loss, and training accuracy − test accuracy, on the
  run's fixed training subset (``generalization_gap`` and ``accuracy_gap`` of metrics.jsonl);
* time per step as a multiple of SGD's: the median over the runs of each run's median
  ``step_time_s`` (timing.jsonl, the logging windows after the first, which holds compilation),
  over the same for SGD. These are wall times of whatever else ran on the machine meanwhile.
"""

import argparse
import json
import os
import pathlib
import runpy
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "csam": "CSAM identity",
           "csam_adaptive": "CSAM adaptive", "csam_kfac": "CSAM K-FAC", "gam": "GAM"}


def run_one(method: str, seed: int, workdir: str, num_steps: int) -> dict:
  """Trains (or reads back) one run; returns its final record and median step time."""
  from nonuniform_jax import train  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(str(ROOT / "configs" / "sam_family.py"))["get_config"](
      f"mnist1d,{method}")
  config.seed, config.progress = seed, False
  if num_steps:
    config.num_steps = num_steps
  summary = train.train_and_evaluate(config, workdir)
  if summary["status"] != "completed":
    raise RuntimeError(f"{method} seed {seed} in {workdir}: {summary['status']}")
  with open(os.path.join(workdir, "timing.jsonl")) as f:
    times = [json.loads(line)["step_time_s"] for line in f]
  times = times[1:] or times   # a short run has one window, compilation included
  return {**summary["final"], "step_time_s": statistics.median(times)}


def _spread(values, digits: int) -> str:
  mean = statistics.mean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(results: dict) -> str:
  """Markdown table of ``{method: [final record per seed]}``; step times over SGD's."""
  sgd = statistics.median(r["step_time_s"] for r in results["sgd"]) if "sgd" in results else None
  lines = ["| method | test accuracy | gap: test − train loss | gap: train − test accuracy "
           "| time per step (× SGD) |", "|---|---|---|---|---|"]
  for method, runs in results.items():
    step = statistics.median(r["step_time_s"] for r in runs)
    lines.append(
        f"| {METHODS[method]} | {_spread([r['test_accuracy'] for r in runs], 3)} | "
        f"{_spread([r['generalization_gap'] for r in runs], 3)} | "
        f"{_spread([r['accuracy_gap'] for r in runs], 3)} | "
        + (f"{step / sgd:.2f} |" if sgd else f"{1e3 * step:.2f} ms |"))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--num_steps", type=int, default=0, help="0: the config's (3000)")
  args = parser.parse_args(argv)
  sys.path.insert(0, str(ROOT))
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  results = {m: [run_one(m, s, os.path.join(args.workdir, m, f"seed_{s}"), args.num_steps)
                 for s in seeds] for m in methods}
  print(f"MNIST-1D, default MLP, {args.num_steps or 3000} steps, seeds {seeds}:\n")
  print(table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
