"""``train_and_evaluate(config, workdir) -> summary``: the library's entry point, and the loop.

A config's ``task`` selects what runs: ``'train'`` (this module's loop) or one of the small
studies in ``nonuniform_jax.experiments``. The config is read and checked once into a
``plan.Plan`` before any data is loaded, anything is compiled or anything is written; below that
everything takes the plan. Beside the loop: ``checkpoints`` (what a checkpoint holds, and the
fallback past broken ones), ``recorder`` (the logs, TensorBoard, the summary), ``workdir`` (the
files and the lock).
"""

import contextlib
import functools
import importlib
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nonuniform_jax import (checkpoints, checks, data, evaluators, parallel, plan as plan_lib,
                            recorder, steps, workdir as wd)
from nonuniform_jax.models import layers, pretrained
from nonuniform_jax.objective import Objective
from nonuniform_jax.optim import base, family, kfac

STUDIES = ("toy_minima", "two_param", "sparse_regression")
TASKS = ("train",) + STUDIES


class Interrupted(Exception):
  """A run stopped by Ctrl-C or SIGTERM, after finishing the checkpoint it was writing."""

  def __init__(self, step: int, checkpoint: int | None):
    super().__init__(f"interrupted at step {step}"
                     + (f" (last checkpoint: step {checkpoint})" if checkpoint else
                        " (no checkpoint yet)") + "; run the same command to resume")
    self.step, self.checkpoint = step, checkpoint


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs what ``config.task`` names in ``workdir`` and returns the run's summary.

  Every check that needs no training comes first — the settings, the model built abstractly
  for the data's shape, the workdir being a writable directory that no other run holds, the
  data being present — and nothing is written to the workdir before all have passed. Raises
  ValueError (one line) for bad input and ``Interrupted`` for Ctrl-C or SIGTERM; a diverged run
  returns its summary with status 'diverged'.
  """
  checks.choice("task", config.task, TASKS)
  if config.task in STUDIES:
    study = importlib.import_module(f"nonuniform_jax.experiments.{config.task}")
    checks.finite_numbers(config.to_dict())
    wd.check_writable(workdir)
    wd.check_free(workdir)
    study.check_config(config)
    with owned(workdir):
      return study.run(config, workdir)
  plan = plan_lib.read(config)
  wd.check_writable(workdir)
  return train(plan, workdir)


class Run(NamedTuple):
  """What a run is built from its plan: the data, the model's objective, the optimizer, the
  mesh and the initial train state."""
  datasets: Any
  objective: Objective
  tx: Any
  schedule: Any
  num_steps: int
  mesh: Any
  state: steps.TrainState   # freshly initialised, placed with state_sharding (or None)
  state_sharding: Any
  context: family.Context   # what the optimizer knows of the run (``optimizer``)


def build(plan: plan_lib.Plan, *, initialise: bool = True) -> Run:
  """Datasets, objective, optimizer and the initial train state of a plan. With
  ``initialise=False`` the state is None and nothing is compiled: a population initialises its
  members together (``population.py``)."""
  d = plan.data
  ds = data.get_datasets(
      d.dataset, seed=d.seed, batch_size=plan.batch_size, data_dir=d.data_dir,
      augment=d.augment, image_size=d.image_size, num_train_examples=d.num_train_examples,
      train_eval_examples=d.train_eval_examples, label_noise=d.label_noise,
      label_noise_rate=d.label_noise_rate, process_index=jax.process_index(),
      process_count=jax.process_count(), num_shards=plan.devices.num_devices)
  num_steps = plan.total_steps(ds.num_train)
  model = plan.model.build(ds.num_classes)
  x = example_input(ds)
  kfac_layers = ("probe",)
  if "kfac_factors" in plan.optimizer.needs:
    key = jax.random.key(0)
    kfac_layers = kfac.layer_names(jax.eval_shape(lambda: layers.zero_perturbations(
        model, model.init(key, x), x, train=True, rngs={"dropout": key})))
  context = family.Context(ds.num_train, kfac_layers, plan.devices.sam_groups > 1)
  schedule, tx = optimizer(plan, num_steps, context)
  mesh = parallel.data_mesh(jax.devices()[:plan.devices.num_devices])
  # A published checkpoint replaces every variable but the classifier (models.pretrained); it
  # travels into the jitted initialisation as an argument, not as constants.
  loaded = None
  if plan.model.pretrained:
    norm = ds.info.get("normalization", {})
    loaded = pretrained.load(
        plan.model.pretrained, plan.model.name, model,
        jax.eval_shape(model.init, jax.random.key(0), x),
        (norm["mean"], norm["std"]) if {"mean", "std"} <= set(norm) else None)
  init_state = functools.partial(initial_state, model, tx, x, plan.seed)
  state_sharding = parallel.state_shardings(jax.eval_shape(init_state, loaded), mesh,
                                            plan.devices.fully_sharded)
  state = jax.jit(init_state, out_shardings=state_sharding)(loaded) if initialise else None
  objective = Objective(model, label_smoothing=plan.label_smoothing, l2=plan.optimizer.l2,
                        precision=plan.precision)
  return Run(ds, objective, tx, schedule, num_steps, mesh, state, state_sharding, context)


def example_input(datasets) -> jax.Array:
  """One zero input of the data's shape: what a model is initialised on."""
  return jnp.zeros((1,) + tuple(datasets.input_shape), jnp.float32)


def optimizer(plan: plan_lib.Plan, num_steps: int, context: family.Context,
              settings: dict | None = None) -> tuple[Any, Any]:
  """The learning-rate schedule and the whole transformation of ``plan``. ``settings`` (the
  plan's optimizer settings by default) may hold traced values: a population's members, built
  inside the vmapped step (``population.py``)."""
  settings = plan.optimizer.settings if settings is None else settings
  s = settings["schedule"]
  schedule = base.learning_rate_schedule(
      s["name"], settings["optimizer"]["learning_rate"], num_steps,
      warmup_steps=s["warmup_steps"], step_boundaries=s["step_boundaries"],
      step_factor=s["step_factor"], end_factor=s["end_factor"])
  tx = family.make(plan.optimizer.name, settings, schedule, context,
                   plan.optimizer.weight_decay_in_loss)
  return schedule, tx


def initial_state(model, tx, x, seed, loaded=None) -> steps.TrainState:
  """The train state at step 0: the model initialised on ``x`` from ``key(seed)``, every
  variable but the classifier replaced by ``loaded`` (a published checkpoint) when given, and the
  optimizer's state (traceable: a population vmaps it over its members' seeds)."""
  variables = model.init(jax.random.key(seed), x)
  if loaded is not None:
    variables = pretrained.merge(variables, loaded)
  params = variables["params"]
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params))


def train(plan: plan_lib.Plan, workdir: str) -> dict:
  """The run of ``plan`` in ``workdir``: claim the workdir, resume, loop, summarise."""
  started = time.time()
  ckpts = checkpoints.Checkpoints(workdir, plan.keep_checkpoints)
  # Read first: another run holding the workdir or a different config is refused here, and an
  # ended run only reports; then build (what only the data can refuse stops here); only then
  # take the workdir and write to it.
  ended = ended_run(plan, workdir, ckpts)
  if ended is not None:
    if jax.process_index() == 0:
      print(_final_line(ended))
    return ended
  run = build(plan)
  with owned(workdir):
    opened = open_run(plan, run, workdir, ckpts)
    if opened is None:   # it ended while this run was being built
      return _report_ended(workdir)
    if jax.process_index() == 0:
      print(_start_line(plan, run, workdir, opened.start), flush=True)
    try:
      diverged_step = _loop(plan, run, opened.state, opened.start, ckpts, opened.rec)
    finally:
      opened.rec.close()
    summary = close_run(plan, run, opened, diverged_step, ckpts, time.time() - started)
  if jax.process_index() == 0:
    print(_final_line(summary))
  return summary


# The phases of ``train`` around its loop, which a population of runs (``population.py``) goes
# through member by member.


class Opened(NamedTuple):
  """A run claimed in its workdir: the step it starts from, its state there and its logs."""
  start: int
  state: steps.TrainState
  rec: recorder.Recorder


def ended_run(plan: plan_lib.Plan, workdir: str, ckpts: checkpoints.Checkpoints) -> dict | None:
  """Reading only: refuses a workdir held by another run or holding a different config; the
  summary of a run of ``plan`` that already ended there, else None."""
  _on_process_0(lambda: wd.check_free(workdir), workdir)
  status = wd.prepare(workdir, plan.config, plan.overwrite, write=False,
                      checkpoints=_checkpoint_facts(ckpts))
  if status in ("completed", "diverged"):
    return wd.read_json(os.path.join(workdir, wd.SUMMARY_FILE))
  return None


def open_run(plan: plan_lib.Plan, run: Run, workdir: str,
             ckpts: checkpoints.Checkpoints) -> Opened | None:
  """Inside the workdir's lock: claims it for ``plan``, restores its newest intact checkpoint
  (placed like ``run.state``), opens its logs and writes the data's facts. None when the run
  ended meanwhile."""
  status = wd.prepare_once(workdir, plan.config, plan.overwrite,
                           checkpoints=_checkpoint_facts(ckpts))
  if status in ("completed", "diverged"):
    return None
  restored = ckpts.restore_latest(run.state) if status == "resume" else None
  start = restored.step if restored else 0
  rec = recorder.Recorder(workdir, start_step=start, total_steps=run.num_steps,
                          restored=restored.meta if restored else None,
                          progress=plan.progress, hparams=wd.flatten(plan.config))
  if jax.process_index() == 0:
    data.write_label_noise(run.datasets, workdir)
    # The data facts as soon as they are known: a run that dies early still says what it
    # trained on.
    wd.write_json(os.path.join(workdir, wd.DATASET_FILE), run.datasets.info)
  return Opened(start, restored.state if restored else run.state, rec)


def close_run(plan: plan_lib.Plan, run: Run, opened: Opened, diverged_step: int | None,
              ckpts: checkpoints.Checkpoints, wall_time: float, **extra) -> dict:
  """Writes and returns the summary of a run whose loop has ended (its logs closed), with the
  entries ``extra`` beside the usual ones."""
  final = opened.rec.last("metrics", "test_accuracy")
  if not final and not diverged_step and opened.start == run.num_steps:
    # A finished run whose last checkpoint kept no logs (an older version wrote it).
    final = evaluate_state(plan, run, opened.state)
  summary = {**_summary(plan, run, diverged_step, final, opened.rec, ckpts, wall_time), **extra}
  opened.rec.write_summary(summary)
  return summary


def _loop(plan: plan_lib.Plan, run: Run, state, start: int, ckpts, rec) -> int | None:
  """Trains from step ``start`` to ``run.num_steps``: logs, evaluates, measures and saves on
  their schedules. Returns the first step whose loss was not finite (None if none). Ctrl-C or
  SIGTERM ends it with ``Interrupted``, after the checkpoint being written is finished; with
  several processes, all stop before the same step (``parallel.stop_requested``)."""
  train_step = jit_train_step(plan, run)
  eval_step = jax.jit(steps.make_eval_step(run.objective))
  # The global subset, the same on every process (each measures it alone: see _measure).
  measured_subset = (evaluators.subset_batches(run.datasets.train_eval,
                                               plan.measures.num_examples,
                                               plan.measures.batch_size)
                     if plan.measures.items else [])
  batches = data.prefetch_to_device(
      run.datasets.train.train_batches(plan.batch_size, plan.data.seed, start), 2,
      parallel.batch_sharding(run.mesh))
  kfac_schedule = plan.optimizer.kfac_schedule
  window, window_start, window_time, done = [], start, time.time(), start
  try:
    for step in range(start + 1, run.num_steps + 1):
      if parallel.stop_requested(step - start):
        raise KeyboardInterrupt("SIGTERM")
      # Whether update step - 1 refreshes the K-FAC statistics, from the optimizer's own
      # schedule: told to the step as a static bool (two programs) rather than a traced
      # lax.cond, which XLA:CPU runs slower.
      due = kfac_schedule.stats_due(step - 1) if kfac_schedule else None
      state, step_metrics = train_step(state, next(batches), due)
      window.append(step_metrics)
      done, last = step, step == run.num_steps
      is_eval = step % plan.eval_every == 0 or last
      is_ckpt = step % plan.checkpoint_every == 0 or last
      measures_due = plan.measures.due(step, last)
      if not (step % plan.log_every == 0 or is_eval or is_ckpt or measures_due):
        continue
      stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *window))
      bad = np.flatnonzero(~np.isfinite(stacked["train_loss"]))
      if bad.size:
        return window_start + int(bad[0]) + 1
      elapsed = time.time() - window_time
      record = {"step": step, "learning_rate": float(run.schedule(step - 1)),
                **{k: float(np.mean(v)) for k, v in stacked.items()}}
      if is_eval:
        record.update(evaluate_state(plan, run, state, eval_step))
      measured = _measure(plan, run, state, measures_due, measured_subset)
      record.update(evaluators.scalars(measured))
      rec.record(step, record, {"step": step, "step_time_s": elapsed / len(window),
                                "examples_per_second": plan.batch_size * len(window) / elapsed},
                 measured)
      if is_ckpt:
        ckpts.save(step, state, {"config": plan.config, **rec.meta()})
      window, window_start, window_time = [], step, time.time()
  except KeyboardInterrupt:
    ckpts.wait()
    saved = ckpts.steps()
    raise Interrupted(done, saved[-1] if saved else None) from None
  finally:
    # Interrupted or not, finish the checkpoint being written, so that a rerun resumes from it.
    ckpts.wait()
  return None


def jit_train_step(plan: plan_lib.Plan, run: Run):
  """The jitted step: the state donated, the batch sharded over the mesh, metrics replicated;
  argument 2 (K-FAC statistics due) static, positionally (a keyword is refused with
  shardings)."""
  step = train_step(plan, run.objective, run.tx, plan.seed)
  return jax.jit(step, in_shardings=(run.state_sharding, parallel.batch_sharding(run.mesh)),
                 out_shardings=(run.state_sharding, parallel.replicated(run.mesh)),
                 static_argnums=2, donate_argnums=0)


def train_step(plan: plan_lib.Plan, objective: Objective, tx, seed):
  """The plan's train step (``steps.make_train_step``, not jitted) for an objective, a
  transformation and a seed, which a population passes traced."""
  d, o = plan.devices, plan.optimizer
  return steps.make_train_step(objective, tx, seed=seed, passes=o.passes,
                               groups=d.forward_groups, grouped_perturbation=d.sam_groups > 1,
                               bn_policy=plan.bn_policy, extra_args=o.needs)


def _measure(plan: plan_lib.Plan, run: Run, state, due, subset) -> dict:
  """The measures due now, on the fixed training subset. Each process computes them alone on
  one of its devices, from the same parameters and the same (global) subset, so every process
  holds the values that process 0 logs, and they are those of one process."""
  if not due:
    return {}
  params, batch_stats = parallel.host_local((state.params, state.batch_stats))
  return evaluators.run([m.name for m in due], {m.name: m.settings for m in due},
                        run.objective, params, batch_stats, subset,
                        bn_mode=plan.measures.bn_mode, seed=plan.measures.seed,
                        num_classes=run.datasets.num_classes)


def _evaluate(eval_step, state, source, batch_size, sharding) -> dict:
  """The summed ``Objective.eval_sums`` of one pass over ``source``."""
  totals = None
  for batch in data.prefetch_to_device(source.eval_batches(batch_size), 2, sharding):
    sums = eval_step(state.params, state.batch_stats, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return jax.device_get(totals)


def _rates(totals: dict) -> dict:
  out = {"loss": float(totals["loss"] / totals["count"]),
         "accuracy": float(totals["correct"] / totals["count"])}
  if "noisy_count" in totals:
    noisy, count = totals["noisy_count"], totals["count"]
    out["accuracy_noisy"] = float(totals["noisy_correct"] / max(noisy, 1))
    out["accuracy_clean"] = float((totals["correct"] - totals["noisy_correct"])
                                  / max(count - noisy, 1))
    if "noisy_true_correct" in totals:   # the flipped examples against their true labels
      out["accuracy_noisy_true"] = float(totals["noisy_true_correct"] / max(noisy, 1))
  return out


def evaluation(test_totals: dict, train_totals: dict) -> dict:
  """The evaluation record from the summed ``eval_sums`` of the test set and of the training
  subset: their losses and accuracies, and the gaps."""
  test, train_side = _rates(test_totals), _rates(train_totals)
  out = {f"test_{k}": v for k, v in test.items()}
  out.update({f"eval_train_{k}": v for k, v in train_side.items()})
  out["generalization_gap"] = test["loss"] - train_side["loss"]
  out["accuracy_gap"] = train_side["accuracy"] - test["accuracy"]
  return out


def evaluate_state(plan: plan_lib.Plan, run: Run, state, eval_step=None) -> dict:
  """Test and training-subset loss and accuracy of ``state``, and the gaps."""
  eval_step = eval_step or jax.jit(steps.make_eval_step(run.objective))
  sharding = parallel.batch_sharding(run.mesh)
  batch = plan.devices.eval_batch
  return evaluation(_evaluate(eval_step, state, run.datasets.test, batch, sharding),
                    _evaluate(eval_step, state, run.datasets.train_eval, batch, sharding))


@contextlib.contextmanager
def owned(workdir: str):
  """Holds the workdir's lock for the block (``workdir.locked``): process 0 takes it, and every
  process learns whether it did, so that all refuse alike when another run holds it."""
  with contextlib.ExitStack() as stack:
    _on_process_0(lambda: stack.enter_context(wd.locked(workdir)), workdir)
    yield


def _on_process_0(claim, workdir: str) -> None:
  """Runs ``claim`` (a look at or a hold of the workdir's lock) on process 0 alone, and raises
  its ``WorkdirBusy`` on every process: the others would see process 0's own hold, and all must
  refuse together or none (one refusing alone leaves the others waiting in a collective)."""
  if jax.process_count() == 1:
    claim()
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error = None
  if jax.process_index() == 0:
    try:
      claim()
    except wd.WorkdirBusy as e:
      error = e
  if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
    raise error or wd.WorkdirBusy(f"workdir {workdir!r} is in use by another run (process 0 "
                                  "names it)")


def _checkpoint_facts(ckpts: checkpoints.Checkpoints) -> tuple[bool, dict | None]:
  """(whether the workdir has checkpoints, the config the newest one records)."""
  meta = ckpts.newest_meta()
  return bool(ckpts.steps()), meta.get("config") if meta else None


def _summary(plan, run: Run, diverged_step, final, rec, ckpts, wall_time) -> dict:
  summary = {
      "status": "diverged" if diverged_step else "completed",
      "diverged_step": diverged_step,
      "config": plan.config,
      "settings": {**plan.settings(), "num_steps": run.num_steps},
      "devices": parallel.device_summary(run.mesh),
      "dataset": run.datasets.info,
      "versions": wd.package_versions(),
      "final": final,
      "measures": {k: v for k, v in rec.last("measures").items() if k != "step"},
      "wall_time_s": wall_time,
  }
  if diverged_step:
    saved = [s for s in ckpts.steps() if s < diverged_step]
    summary["last_good_checkpoint"] = saved[-1] if saved else None
  return summary


def _report_ended(workdir: str) -> dict:
  summary = wd.read_json(os.path.join(workdir, wd.SUMMARY_FILE))
  if jax.process_index() == 0:
    print(_final_line(summary))
  return summary


def _start_line(plan: plan_lib.Plan, run: Run, workdir: str, start: int) -> str:
  """What runs, in one line: data, model, optimizer, length, devices, workdir."""
  ds, d = run.datasets, plan.devices
  subset = (f"{ds.num_train:,} of {ds.info.get('num_train_full', ds.num_train):,}"
            if plan.data.num_train_examples else f"{ds.num_train:,}")
  platform = run.mesh.devices.ravel()[0].platform
  where = f"resuming at step {start:,}" if start else "starting"
  source = (f" from {plan.model.pretrained} ({plan.model.pretrained_note})"
            if plan.model.pretrained and not start else "")
  return (f"{plan.data.dataset} ({subset} training examples) -> {plan.model.name} "
          f"({plan.model.num_params:,} parameters{source}), "
          f"{family.describe(plan.optimizer.name, plan.optimizer.settings)}, "
          f"{run.num_steps:,} steps of batch {plan.batch_size} on {d.num_devices} {platform} "
          f"device{'s' if d.num_devices > 1 else ''}"
          + (f" in {d.num_processes} processes" if d.num_processes > 1 else "")
          + f"; {where} in {workdir}")


def _final_line(summary: dict) -> str:
  if summary["status"] == "diverged":
    good = summary.get("last_good_checkpoint")
    return (f"diverged at step {summary['diverged_step']} (non-finite training loss); "
            + (f"the last good checkpoint, step {good}, is kept" if good else
               "no checkpoint was saved before it"))
  f = summary["final"]
  return (f"test accuracy {f['test_accuracy']:.4f}  train accuracy "
          f"{f['eval_train_accuracy']:.4f}  generalization gap (loss) "
          f"{f['generalization_gap']:.4f}  accuracy gap {f['accuracy_gap']:.4f}")
