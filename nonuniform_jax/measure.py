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

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir.")
_MEASURES = flags.DEFINE_list("measures", None, "Measure names (nonuniform_jax.evaluators).")
_NONUNIFORMITY = flags.DEFINE_bool("nonuniformity", False,
                                   "Add the standard nonuniformity set.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Training-subset size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Batch size of the measures.")
_BN_MODE = flags.DEFINE_string("bn_mode", None, "running | batch")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SET = flags.DEFINE_multi_string("set", [], "MEASURE.SETTING=VALUE (value parsed as JSON).")
flags.mark_flags_as_required(["workdir"])


def measure(workdir: str, names, *, nonuniformity=False, num_examples=None, batch_size=None,
            bn_mode=None, step=None, overrides=()) -> dict:
  """Computes ``names`` on a checkpoint of the run in ``workdir``; returns {name: result}."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import evaluators, train, workdir as wd  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(workdir, wd.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise ValueError(f"no run in workdir {workdir!r}: {config_path} does not exist")
  config = ml_collections.ConfigDict(wd.with_added_defaults(wd.read_json(config_path)))
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
    config.measures.settings[name][setting] = json.loads(value)
  settings = train.check_config(config)
  chosen = train.measure_names(config)
  if not chosen:
    raise ValueError(f"no measure chosen; pass --measures from {sorted(evaluators.MEASURES)} "
                     "or --nonuniformity")
  manager = train.checkpoint_manager(workdir, config.keep_checkpoints)
  available = sorted(manager.all_steps())
  step = available[-1] if step is None and available else step
  if step not in available:
    raise ValueError(f"no checkpoint at step {step!r} in {workdir}; saved steps: {available}")
  run = train.build(config, settings)
  state = train.restore(manager, step, run.state)
  batches = evaluators.subset_batches(run.datasets.train_eval, config.measures.num_examples,
                                      config.measures.batch_size)
  results = evaluators.run(chosen, train.measure_settings(config, chosen), run.model,
                           state.params, state.batch_stats, batches,
                           bn_mode=config.measures.bn_mode, seed=config.measures.seed,
                           num_classes=run.datasets.num_classes)
  if jax.process_index() == 0:
    log = wd.JsonLog(os.path.join(workdir, wd.MEASURES_FILE), last_step=2**62)
    log.append({"step": step, "source": "measure command", **results})
    writer = metric_writers.create_default_writer(workdir)
    writer.write_scalars(step, evaluators.scalars(results))
    writer.flush()
    summary_path = os.path.join(workdir, wd.SUMMARY_FILE)
    if os.path.exists(summary_path):
      summary = wd.read_json(summary_path)
      summary.setdefault("measures", {}).update(results)
      wd.write_json(summary_path, summary)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from nonuniform_jax.main import quiet_logs  # pylint: disable=g-import-not-at-top
  quiet_logs()
  try:
    results = measure(_WORKDIR.value, _MEASURES.value, nonuniformity=_NONUNIFORMITY.value,
                      num_examples=_NUM_EXAMPLES.value, batch_size=_BATCH_SIZE.value,
                      bn_mode=_BN_MODE.value, step=_STEP.value, overrides=_SET.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from nonuniform_jax import evaluators  # pylint: disable=g-import-not-at-top
  for key, value in evaluators.scalars(results).items():
    print(f"{key} = {value:.6g}")


if __name__ == "__main__":
  app.run(main)
