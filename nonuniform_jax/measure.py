"""Measures on a finished (or interrupted) run's latest checkpoint, without retraining.

    python -m nonuniform_jax.measure --workdir DIR --measures=lambda_max,gradient_noise \\
        [--num_examples=1024] [--bn_mode=running] [--step=N] [--set=sam_sharpness.rho=0.1]

The run's own config (DIR/config.json) rebuilds the data, model and train state; the results,
with their settings, are appended to DIR/measures.jsonl, written to TensorBoard at the
checkpoint's step, and added to DIR/summary.json under "measures".
"""

import json
import os
import sys

from nonuniform_jax import cli  # first: it quiets TensorFlow before anything imports it

from absl import flags  # pylint: disable=g-bad-import-order,wrong-import-position


def _define(flag_values: flags.FlagValues) -> None:
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A run's workdir.", **f)
  flags.DEFINE_list("measures", None, "Measure names (nonuniform_jax.evaluators).", **f)
  flags.DEFINE_bool("nonuniformity", False, "Add the standard nonuniformity set.", **f)
  flags.DEFINE_integer("num_examples", None, "Training-subset size.", **f)
  flags.DEFINE_integer("batch_size", None, "Batch size of the measures.", **f)
  flags.DEFINE_string("bn_mode", None, "running | batch", **f)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", **f)
  flags.DEFINE_multi_string("set", [], "MEASURE.SETTING=VALUE (value parsed as JSON).", **f)


def measure(workdir: str, names, *, nonuniformity=False, num_examples=None, batch_size=None,
            bn_mode=None, step=None, overrides=()) -> dict:
  """Computes ``names`` on a checkpoint of the run in ``workdir``; returns {name: result}."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import (checkpoints, evaluators,  # pylint: disable=g-import-not-at-top
                              plan as plan_lib, train, workdir as wd)

  config_path = os.path.join(workdir, wd.CONFIG_FILE)
  recorded = (wd.read_json(config_path) if os.path.exists(config_path) else
              (checkpoints.Checkpoints(workdir, 1).newest_meta() or {}).get("config"))
  if recorded is None:
    raise ValueError(f"no run in workdir {workdir!r}: {config_path} does not exist and no "
                     "checkpoint records a config")
  config = ml_collections.ConfigDict(wd.with_added_defaults(recorded))
  if config.model.get("pretrained"):   # the weights come from the run's checkpoint
    config.model.pretrained = ""
  config.measures.names = tuple(names or ())
  config.measure_nonuniformity = nonuniformity
  for key, value in (("num_examples", num_examples), ("batch_size", batch_size),
                     ("bn_mode", bn_mode)):
    if value is not None:
      config.measures[key] = value
  for item in overrides:
    target, _, value = item.partition("=")
    name, _, setting = target.partition(".")
    if not (name and setting and value):
      raise ValueError(f"--set {item!r} must look like MEASURE.SETTING=VALUE")
    if name not in config.measures.settings:
      config.measures.settings[name] = ml_collections.ConfigDict()
    try:
      config.measures.settings[name][setting] = json.loads(value)
    except json.JSONDecodeError:
      raise ValueError(f"--set {item!r}: {value!r} is not a JSON value (numbers as 200 or 0.1, "
                       "strings in double quotes, true/false)") from None
  plan = plan_lib.read(config)
  if not plan.measures.items:
    raise ValueError(f"no measure chosen; pass --measures from {sorted(evaluators.EVALUATORS)} "
                     "or --nonuniformity")
  wd.check_free(workdir)
  ckpts = checkpoints.Checkpoints(workdir, plan.keep_checkpoints)
  available = ckpts.steps()
  if step is not None and step not in available:
    raise ValueError(f"no checkpoint at step {step!r} in {workdir}; saved steps: {available}")
  if not available:
    raise ValueError(f"no checkpoint in {workdir} to measure (the run saved none yet)")
  run = train.build(plan)
  with train.owned(workdir):
    if step is None:
      restored = ckpts.restore_latest(run.state)
      if restored is None:
        raise ValueError(f"no checkpoint in {workdir} reads back intact")
    else:
      restored = ckpts.restore(step, run.state)
    step, state = restored.step, restored.state
    m = plan.measures
    batches = evaluators.subset_batches(run.datasets.train_eval, m.num_examples, m.batch_size)
    results = evaluators.run(m.names, {x.name: x.settings for x in m.items}, run.objective,
                             state.params, state.batch_stats, batches, bn_mode=m.bn_mode,
                             seed=m.seed, num_classes=run.datasets.num_classes)
    if jax.process_index() == 0:
      path = os.path.join(workdir, wd.MEASURES_FILE)
      text = open(path).read() if os.path.exists(path) else ""
      record = {"step": step, "source": "measure command", **results}
      wd.write_text(path, text + json.dumps(record, sort_keys=True) + "\n")
      writer = metric_writers.create_default_writer(workdir)
      writer.write_scalars(step, evaluators.scalars(results))
      writer.flush()
      summary_path = os.path.join(workdir, wd.SUMMARY_FILE)
      if os.path.exists(summary_path):
        summary = wd.read_json(summary_path)
        summary.setdefault("measures", {}).update(results)
        wd.write_json(summary_path, summary)
  return results


def command(argv) -> int:
  """The whole command for ``argv`` (``argv[0]`` is the program); prints each measured value.
  Bad input ends the process with one line and status 2 (``nonuniform_jax.cli``)."""
  flag_values = flags.FlagValues()
  _define(flag_values)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + flag_values.get_help())
    sys.exit(cli.EXIT_OK)
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    cli.fail(str(e))
  usage = ("usage: python -m nonuniform_jax.measure --workdir DIR --measures=NAME,... "
           "(--help lists the options)")
  if len(rest) > 1:
    cli.fail(f"unexpected arguments {rest[1:]}; {usage}")
  f = flag_values
  if not f.workdir:
    cli.fail(f"missing --workdir: the run to measure; {usage}")
  cli.quiet_logs()
  results = cli.guarded(lambda: measure(
      f.workdir, f.measures, nonuniformity=f.nonuniformity, num_examples=f.num_examples,
      batch_size=f.batch_size, bn_mode=f.bn_mode, step=f.step, overrides=f.set), f.workdir)
  from nonuniform_jax import evaluators  # pylint: disable=g-import-not-at-top
  for key, value in evaluators.scalars(results).items():
    print(f"{key} = {value:.6g}")
  return cli.EXIT_OK


def run():
  cli.as_program()
  sys.exit(command(sys.argv))


if __name__ == "__main__":
  run()
