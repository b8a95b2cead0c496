"""Figures and summary tables of a sweep or of training runs.

usage: python -m nonuniform_jax.plot --logdir DIR [--out DIR]

A logdir holding sweep.json is a sweep: each measure against the generalization gap (coloured
by each varied hyperparameter, τ in the title), the within-sharpness-bin comparison, Wu's
check, and the headline table (τ, Ψ, their bootstrap intervals and the sign-error of every
measure against the gap and the test error; the members excluded and why) as summary.md and
summary.csv. Otherwise every run below it (a directory with metrics.jsonl or summary.json):
training and test curves, measures over training, the final numbers compared across runs
grouped by dataset and optimizer, and summary.md and summary.csv. Files go to the logdir, or
to --out; each path written is printed. Statistics: nonuniform_jax.analysis, defined in
docs/measures.md. Exit status 0, or 2 with one line on stderr (no such logdir, nothing to
plot, a bad option), 130 when interrupted.
"""

import errno
import os
import sys

from nonuniform_jax import cli  # first: it quiets TensorFlow before anything imports it

from absl import flags  # pylint: disable=g-bad-import-order,wrong-import-position

USAGE = "usage: python -m nonuniform_jax.plot --logdir DIR [--out DIR] (--help lists the options)"


def _define(flag_values: flags.FlagValues) -> None:
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("logdir", None, "A sweep directory (sweep.json) or a folder of runs.", **f)
  flags.DEFINE_string("out", None, "Where the figures and tables go (default: the logdir).", **f)
  flags.DEFINE_list("measures", None, "Sweeps: the measures NAME/KEY of the scatters and the "
                    "headline table (default: every measure that varies).", **f)
  flags.DEFINE_string("sharpness", None, "Sweeps: the sharpness measure NAME/KEY that bins "
                      "the models (default lambda_max/lambda_max).", **f)
  flags.DEFINE_string("nonuniformity", None, "Sweeps: the nonuniformity measure NAME/KEY "
                      "compared within bins (default gradient_noise/trace_sigma).", **f)
  flags.DEFINE_integer("num_resamples", 1000, "Sweeps: bootstrap resamples.", **f)
  flags.DEFINE_integer("seed", 0, "Sweeps: the bootstrap's seed.", **f)


def plot(logdir: str, out: str | None = None, **sweep_options) -> list[str]:
  """Writes the figures and tables of ``logdir`` (a sweep, else runs) into ``out`` (default
  ``logdir``); returns the paths written. ValueError for a logdir with nothing to plot."""
  from nonuniform_jax import workdir as wd  # pylint: disable=g-import-not-at-top
  from nonuniform_jax.analysis import figures, table  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(logdir):
    raise ValueError(f"logdir {logdir!r} is not a directory" if os.path.exists(logdir) else
                     f"logdir {logdir!r} does not exist")
  out = out or logdir
  wd.check_writable(out)
  if os.path.exists(os.path.join(logdir, table.SWEEP_FILE)):
    return figures.plot_sweep(logdir, out, **sweep_options)
  return figures.plot_runs(logdir, out)


def command(argv) -> int:
  """The whole command for ``argv`` (``argv[0]`` is the program); prints each file written.
  Returns 0; bad input ends the process with one line and status 2 (``nonuniform_jax.cli``)."""
  flag_values = flags.FlagValues()
  _define(flag_values)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + flag_values.get_help())
    sys.exit(cli.EXIT_OK)
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    cli.fail(str(e))
  if len(rest) > 1:
    cli.fail(f"unexpected arguments {rest[1:]}; {USAGE}")
  f = flag_values
  if not f.logdir:
    cli.fail(f"missing --logdir: the sweep or runs to plot; {USAGE}")
  if f.num_resamples < 0:
    cli.fail(f"--num_resamples must be >= 0 (0: no intervals), got {f.num_resamples}")
  try:
    files = plot(f.logdir, f.out, measures=f.measures, sharpness=f.sharpness,
                 nonuniformity=f.nonuniformity, num_resamples=f.num_resamples, seed=f.seed)
  except ValueError as e:
    cli.fail(e)
  except KeyboardInterrupt:
    cli.fail("interrupted; run the same command again", cli.EXIT_INTERRUPTED)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    cli.fail(f"no space left on the device of {f.out or f.logdir!r}", cli.EXIT_DISK_FULL)
  for path in files:
    print(path)
  return cli.EXIT_OK


def run():
  cli.as_program()
  sys.exit(command(sys.argv))


if __name__ == "__main__":
  run()
