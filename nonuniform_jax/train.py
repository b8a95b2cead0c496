"""``train_and_evaluate(config, workdir) -> summary``: the library's entry point.

A config's ``task`` selects what runs: ``'train'`` (this module's loop) or one of the small
studies in ``nonuniform_jax.experiments``. Every check of the config happens here, before any
data is loaded or anything is compiled.
"""

import contextlib
import importlib
import logging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nonuniform_jax import (checkpoints, checks, data, evaluators, models, optim, parallel,
                            recorder, steps, workdir as wd)
from nonuniform_jax.models import layers
from nonuniform_jax.optim import base, kfac
from nonuniform_jax.optim.csam import METRICS as CSAM_METRICS
from nonuniform_jax.optim.sam import validate_rho
from nonuniform_jax.optim.sam_gcm import parameter_count

STUDIES = ("toy_minima", "two_param", "sparse_regression")
TASKS = ("train",) + STUDIES
# name -> (gradient evaluations per step, what the step passes to tx.update besides grad_fn)
SAM_FAMILY = {"sam": (2, ()), "asam": (2, ()), "csam": (3, ()), "nonuniform_sam": (3, ()),
              "gam": (2, ("kfac_factors",)), "sam_gcm": (2, ("per_example_grads",)),
              "cov": (1, ("per_example_loss_fn",))}
OPTIMIZERS = base.BASE_OPTIMIZERS + tuple(SAM_FAMILY)
# Where each family member's settings live in the config (named in its errors).
_FAMILY_SETTINGS = {"sam": "sam.*", "asam": "sam.*", "csam": "csam.*, sam.eta, kfac.*",
                    "nonuniform_sam": "csam.*, sam.eta, kfac.*", "gam": "sam.rho, kfac.*",
                    "sam_gcm": "sam_gcm.*", "cov": "cov.*"}


# Settings that may be infinite: an ℓ∞ ball's p.
INFINITE_ALLOWED = ("measures.settings.worst_case_sharpness.p",)


def _setting(config, dotted: str):
  """``config.a.b`` for ``'a.b'``."""
  for part in dotted.split("."):
    config = config[part]
  return config


def check_config(config: ml_collections.ConfigDict) -> dict:
  """Validates every setting of a training run; returns the settings derived from them
  (devices, per-device batch, m-sharpness groups). Raises ValueError with one line naming the
  bad value and the valid choices."""
  checks.choice("task", config.task, TASKS)
  checks.finite_numbers(config.to_dict(), INFINITE_ALLOWED)
  for name in ("seed", "num_steps", "num_train_examples", "train_eval_examples",
               "parallel.num_devices", "measures.every_steps", "schedule.warmup_steps"):
    checks.integer(name, _setting(config, name))
  checks.non_negative("num_epochs", config.num_epochs)
  num_devices = config.parallel.num_devices or jax.device_count()
  if not 0 < num_devices <= jax.device_count() or (
      jax.process_count() > 1 and num_devices != jax.device_count()):
    raise ValueError(f"parallel.num_devices {config.parallel.num_devices!r} is not available: "
                     f"choose 0 (all {jax.device_count()} devices)"
                     + (f" or 1..{jax.device_count()}" if jax.process_count() == 1 else ""))
  checks.integer("eval_batch_size", config.eval_batch_size, 1)
  if not (isinstance(config.data_seed, int) and config.data_seed >= -1):
    raise ValueError(f"data_seed {config.data_seed!r} must be an integer >= 0, or -1 (the run's "
                     "seed)")
  # Evaluation pads and masks, so its batch is rounded up to a multiple of the devices: the
  # paper configs' 1000 then runs on 16 or 32 devices as on 8 (recorded in the summary).
  eval_batch = -(-config.eval_batch_size // num_devices) * num_devices
  data.check_args(config.dataset, batch_size=config.batch_size,
                  eval_batch_size=eval_batch,
                  num_train_examples=config.num_train_examples,
                  label_noise=config.label_noise.kind, label_noise_rate=config.label_noise.rate,
                  process_count=jax.process_count())
  model_cfg = config.model.to_dict()
  models.check_model(model_cfg.pop("name"), **model_cfg)
  opt = config.optimizer
  checks.choice("optimizer", opt.name, OPTIMIZERS)
  if opt.name in SAM_FAMILY:
    checks.choice("base optimizer", opt.base, base.BASE_OPTIMIZERS)
  checks.choice("schedule", config.schedule.name, base.SCHEDULES)
  checks.choice("weight_decay_mode", opt.weight_decay_mode, base.WEIGHT_DECAY_MODES)
  checks.positive("optimizer.learning_rate", opt.learning_rate)
  checks.in_range("optimizer.momentum", opt.momentum, 0.0, 1.0, high_open=True)
  checks.in_range("optimizer.b1", opt.b1, 0.0, 1.0, high_open=True)
  checks.in_range("optimizer.b2", opt.b2, 0.0, 1.0, high_open=True)
  checks.positive("optimizer.eps", opt.eps)
  checks.non_negative("optimizer.weight_decay", opt.weight_decay)
  checks.non_negative("optimizer.grad_clip_norm", opt.grad_clip_norm)
  checks.positive("schedule.step_factor", config.schedule.step_factor)
  checks.non_negative("schedule.end_factor", config.schedule.end_factor)
  for fraction in config.schedule.step_boundaries:
    checks.in_range("schedule.step_boundaries", fraction, 0.0, 1.0)
  checks.in_range("label_smoothing", config.label_smoothing, 0.0, 1.0, high_open=True)
  checks.integer("batch_size", config.batch_size, 1)
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError(f"num_steps ({config.num_steps!r}) or num_epochs "
                     f"({config.num_epochs!r}) must be > 0")
  for name in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
    checks.integer(name, config[name], 1)
  if config.checkpoint_every % config.log_every:
    raise ValueError(f"checkpoint_every ({config.checkpoint_every}) must be a multiple of "
                     f"log_every ({config.log_every}) so a resumed run logs what an "
                     "uninterrupted one does")
  if config.batch_size % num_devices:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {num_devices} "
                     f"devices; choose a multiple of {num_devices}")
  per_device = config.batch_size // num_devices
  m = config.sam.m
  if opt.name in SAM_FAMILY:
    validate_rho("sam.rho", config.sam.rho)
    checks.choice("sam.bn_policy", config.sam.bn_policy, steps.BN_POLICIES)
    if opt.name in ("csam", "nonuniform_sam"):
      checks.choice("csam.metric", config.csam.metric, CSAM_METRICS)
    extra = family_extra_args(config)
    if extra and (m or not config.parallel.bn_sync):
      raise ValueError(f"optimizer {opt.name!r} with {extra[0]} needs the whole batch in one "
                       f"group: set sam.m=0 and parallel.bn_sync=True (got sam.m={m}, "
                       f"parallel.bn_sync={config.parallel.bn_sync})")
    if m and opt.name not in ("sam", "asam"):
      raise ValueError(f"sam.m={m}: m-sharpness groups are implemented for sam and asam, not "
                       f"{opt.name!r}; set sam.m=0")
    if m < 0 or (m > 0 and per_device % m):
      divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
      raise ValueError(f"sam.m {m!r} must divide the per-device batch {per_device} "
                       f"(batch_size {config.batch_size} over {num_devices} devices); choose 0 "
                       f"(the whole batch) or one of {divisors}")
    if config.sam.weight_decay_in_perturbation and opt.weight_decay_mode != "coupled":
      raise ValueError("sam.weight_decay_in_perturbation needs optimizer.weight_decay_mode "
                       f"'coupled', got {opt.weight_decay_mode!r}")
    try:  # the transformation's own checks (ρ's, α, damping, refresh periods...), no tracing
      _family_transform(config, num_train=2, kfac_layers=("probe",))
    except ValueError as e:
      raise ValueError(f"optimizer {opt.name!r}, settings {_FAMILY_SETTINGS[opt.name]}: "
                       f"{e}") from None
  names = measure_names(config)
  evaluators.check(names, measure_settings(config, names), config.measures.bn_mode)
  if names:
    checks.positive("measures.num_examples", config.measures.num_examples)
    checks.positive("measures.batch_size", config.measures.batch_size)
    if "batch_gradient_noise" in names:
      b = measure_settings(config, names)["batch_gradient_noise"]["batch_size"]
      usable = min(config.measures.num_examples,
                   config.train_eval_examples or config.measures.num_examples)
      if not 1 <= b <= usable // 2:
        raise ValueError(f"measures.settings.batch_gradient_noise.batch_size {b!r} needs at least "
                         f"2 disjoint batches of the {usable} measured examples; choose 1 to "
                         f"{usable // 2}" + ("" if config.measures.settings.get(
                             "batch_gradient_noise", {}).get("batch_size") else
                             " (unset or 0, it is the training batch_size)"))
  num_params = check_model_fit(config)
  m = config.batch_size if m == 0 else m
  sam_groups = config.batch_size // m if opt.name in SAM_FAMILY else 1
  bn_groups = 1 if config.parallel.bn_sync else num_devices
  return {"num_devices": num_devices, "num_processes": jax.process_count(),
          "global_batch": config.batch_size, "per_device_batch": per_device,
          "eval_batch": eval_batch,
          "data_seed": config.seed if config.data_seed < 0 else config.data_seed,
          "sam_m": m if opt.name in SAM_FAMILY else None, "sam_groups": sam_groups,
          "forward_groups": max(sam_groups, bn_groups),
          "bn_statistics": ("per m-sharpness group" if sam_groups > 1 else
                            "per device" if bn_groups > 1 else "global batch"),
          "fully_sharded": bool(config.parallel.fully_sharded), "num_params": num_params}


def measure_names(config) -> list[str]:
  """The measures a run computes: ``measures.names`` plus, with ``measure_nonuniformity``, the
  standard nonuniformity set."""
  names = list(config.measures.names)
  if config.measure_nonuniformity:
    names += [n for n in evaluators.NONUNIFORMITY if n not in names]
  return names


def measure_settings(config, names) -> dict:
  """Each measure's settings from the config; batch_gradient_noise's batch_size 0 (the
  default) is the training batch size, the b whose noise it estimates."""
  settings = config.measures.settings
  out = {n: settings[n].to_dict() if n in settings else {} for n in names}
  if "batch_gradient_noise" in out and not out["batch_gradient_noise"].get("batch_size"):
    out["batch_gradient_noise"]["batch_size"] = config.batch_size
  return out


def total_steps(config, num_train: int) -> int:
  if config.num_steps > 0:
    return int(config.num_steps)
  return max(1, math.ceil(config.num_epochs * num_train / config.batch_size))


def family_extra_args(config) -> tuple:
  """What the train step must hand the optimizer besides ``grad_fn``."""
  name = config.optimizer.name
  if name in ("csam", "nonuniform_sam") and config.csam.metric == "kfac":
    return ("kfac_factors",)
  return SAM_FAMILY.get(name, (1, ()))[1]


def _family_transform(config, num_train: int, kfac_layers):
  """The SAM-family transformation named by ``config.optimizer.name``."""
  name, k = config.optimizer.name, config.kfac
  groups = config.batch_size // (config.sam.m or config.batch_size)
  kfac_kwargs = dict(damping=k.damping, stats_every=k.stats_every,
                     inverse_every=k.inverse_every, ema_decay=k.ema_decay,
                     unfactored=k.unfactored, kfac_layers=kfac_layers, factor_init=k.init,
                     inverse=k.inverse)
  if name in ("sam", "asam"):
    return optim.sam(config.sam.rho, adaptive=name == "asam", eta=config.sam.eta,
                     grouped=groups > 1)
  if name in ("csam", "nonuniform_sam"):
    c = config.csam
    kwargs = kfac_kwargs if c.metric == "kfac" else {}
    return optim.csam(c.rho1, c.rho2, c.alpha, metric=c.metric, eta=config.sam.eta,
                      momentum_sign=c.momentum_sign, **kwargs)
  if name == "gam":
    return optim.gam(config.sam.rho, **kfac_kwargs)
  if name == "sam_gcm":
    return optim.sam_gcm(config.sam_gcm.rho, config.sam_gcm.xi,
                         max_params=config.sam_gcm.max_params)
  return optim.cov(config.cov.lam, num_train)


def build_optimizer(config, num_steps: int, num_train: int = 0, kfac_layers=None):
  """(transformation, schedule, gradient evaluations per step, L2 coefficient in the loss).

  ``num_train`` (COV's n) and ``kfac_layers`` (the captured layers, for the K-FAC metric) are
  needed only by the optimizers that use them."""
  opt = config.optimizer
  s = config.schedule
  schedule = base.learning_rate_schedule(
      s.name, opt.learning_rate, num_steps, warmup_steps=s.warmup_steps,
      step_boundaries=s.step_boundaries, step_factor=s.step_factor, end_factor=s.end_factor)
  family = opt.name in SAM_FAMILY
  wd_in_loss = family and config.sam.weight_decay_in_perturbation
  base_tx = base.base_optimizer(
      opt.base if family else opt.name, schedule, momentum=opt.momentum,
      nesterov=opt.nesterov, b1=opt.b1, b2=opt.b2, eps=opt.eps,
      weight_decay=0.0 if wd_in_loss else opt.weight_decay,
      weight_decay_mode=opt.weight_decay_mode, grad_clip_norm=opt.grad_clip_norm)
  l2 = opt.weight_decay if wd_in_loss else 0.0
  if not family:
    return base_tx, schedule, 1, l2
  perturb = _family_transform(config, num_train, kfac_layers)
  return optax.chain(perturb, base_tx), schedule, SAM_FAMILY[opt.name][0], l2


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
    wd.check_writable(workdir)
    wd.check_free(workdir)
    study.check_config(config)
    with owned(workdir):
      return study.run(config, workdir)
  settings = check_config(config)
  wd.check_writable(workdir)
  return _train(config, workdir, settings)


def _evaluate(eval_step, state, source, batch_size, sharding) -> dict:
  totals = None
  for batch in data.prefetch_to_device(source.eval_batches(batch_size), 2, sharding):
    sums = eval_step(state.params, state.batch_stats, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
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


def check_model_fit(config: ml_collections.ConfigDict) -> int:
  """Builds the model abstractly (``jax.eval_shape``) for the dataset's shape
  (``data.describe``) and returns its parameter count: a model that cannot be built for that
  input, and the refusals only the model can tell (BatchNorm or dropout under per-example
  gradients, SAM-GCM's size limit), stop here, before any data are read or anything is compiled
  or written."""
  extra = set(family_extra_args(config))
  per_example = sorted(set(measure_names(config)) & set(evaluators.PER_EXAMPLE))
  needs_examples = bool({"per_example_grads", "per_example_loss_fn"} & extra)
  model_cfg = config.model.to_dict()
  name = model_cfg.pop("name")
  num_classes, shape = data.describe(config.dataset, config.image_size)
  model = models.get_model(name, num_classes, **model_cfg)
  x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
  try:
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  except Exception as e:  # pylint: disable=broad-except
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"model {name!r} with {model_cfg} cannot be built for the inputs of "
                     f"{config.dataset!r} (shape {tuple(shape)}): {type(e).__name__}: "
                     f"{text}") from None
  count = parameter_count(variables["params"])
  has_bn = "batch_stats" in variables
  if needs_examples and has_bn:
    raise ValueError(f"optimizer {config.optimizer.name!r} needs per-example gradients, "
                     f"which BatchNorm (in model {config.model.name!r}) does not have; "
                     "choose a model without BatchNorm")
  dropout = {k: v for k, v in model_cfg.items() if "dropout" in k and v}
  if needs_examples and dropout:
    raise ValueError(f"optimizer {config.optimizer.name!r} needs per-example gradients, which "
                     f"dropout ({', '.join(f'model.{k}={v}' for k, v in dropout.items())}) "
                     "would draw apart from the batch's masks; set it to 0")
  if "per_example_grads" in extra and count > config.sam_gcm.max_params:
    raise ValueError(f"optimizer 'sam_gcm' needs the per-example gradient covariance: model "
                     f"{config.model.name!r} on {config.dataset!r} has {count} parameters, "
                     f"more than sam_gcm.max_params={config.sam_gcm.max_params}; use a "
                     "smaller model or raise sam_gcm.max_params")
  if has_bn and config.measures.bn_mode == "batch" and per_example:
    raise ValueError(f"measures {per_example} take per-example gradients or Hessians, which "
                     f"BatchNorm in 'batch' mode (model {config.model.name!r}) would normalise "
                     "by each example's own statistics; use measures.bn_mode 'running'")
  return count


class Run(NamedTuple):
  """Everything a run is built from, derived from its config."""
  datasets: Any
  model: Any
  tx: Any
  schedule: Any
  passes: int          # gradient evaluations per step
  l2: float            # weight decay inside the loss (SAM's weight_decay_in_perturbation)
  num_steps: int
  mesh: Any
  state: steps.TrainState   # freshly initialised, placed with state_sharding
  state_sharding: Any


def build(config, settings: dict) -> Run:
  """Datasets, model, optimizer and the initial train state of a checked config."""
  ds = data.get_datasets(
      config.dataset, seed=settings["data_seed"], batch_size=config.batch_size,
      data_dir=config.data_dir, augment=config.augment,
      image_size=config.image_size, num_train_examples=config.num_train_examples,
      train_eval_examples=config.train_eval_examples, label_noise=config.label_noise.kind,
      label_noise_rate=config.label_noise.rate, process_index=jax.process_index(),
      process_count=jax.process_count())
  num_steps = total_steps(config, ds.num_train)
  model_cfg = config.model.to_dict()
  model = models.get_model(model_cfg.pop("name"), ds.num_classes, **model_cfg)
  x = jnp.zeros((1,) + tuple(ds.input_shape), jnp.float32)
  extra = family_extra_args(config)
  kfac_layers = None
  if "kfac_factors" in extra:
    key = jax.random.key(0)
    kfac_layers = kfac.layer_names(jax.eval_shape(lambda: layers.zero_perturbations(
        model, model.init(key, x), x, train=True, rngs={"dropout": key})))
  tx, schedule, passes, l2 = build_optimizer(config, num_steps, ds.num_train, kfac_layers)
  mesh = parallel.data_mesh(jax.devices()[:settings["num_devices"]])

  def init_state():
    variables = model.init(jax.random.key(config.seed), x)
    params = variables["params"]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables.get("batch_stats", {}),
                            opt_state=tx.init(params))

  state_sharding = parallel.state_shardings(jax.eval_shape(init_state), mesh,
                                            config.parallel.fully_sharded)
  state = jax.jit(init_state, out_shardings=state_sharding)()
  return Run(ds, model, tx, schedule, passes, l2, num_steps, mesh, state, state_sharding)


@contextlib.contextmanager
def owned(workdir: str):
  """Holds the workdir's lock for the block (``workdir.locked``): process 0 takes it, and every
  process learns whether it did, so that all refuse alike when another run holds it."""
  if jax.process_count() == 1:
    with wd.locked(workdir):
      yield
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(wd.locked(workdir))
      except wd.WorkdirBusy as e:
        error = e
    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
      raise error or wd.WorkdirBusy(f"workdir {workdir!r} is in use by another run")
    yield


def _checkpoint_facts(ckpts: checkpoints.Checkpoints) -> tuple[bool, dict | None]:
  """(whether the workdir has checkpoints, the config the newest one records)."""
  meta = ckpts.newest_meta()
  return bool(ckpts.steps()), meta.get("config") if meta else None


def _train(config, workdir: str, settings: dict) -> dict:
  started = time.time()
  config_dict = recorder.jsonable(config.to_dict())
  summary_path = os.path.join(workdir, wd.SUMMARY_FILE)
  ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
  # Read first: another run holding the workdir or a different config is refused here, and an
  # ended run only reports; then build (what only the data can refuse stops here); only then
  # take the workdir and write to it.
  wd.check_free(workdir)
  status = wd.prepare(workdir, config_dict, config.overwrite, write=False,
                      checkpoints=_checkpoint_facts(ckpts))
  if status in ("completed", "diverged"):
    return _report_ended(summary_path)
  run = build(config, settings)
  with owned(workdir):
    status = wd.prepare_once(workdir, config_dict, config.overwrite,
                             checkpoints=_checkpoint_facts(ckpts))
    if status in ("completed", "diverged"):   # it ended while this run was being built
      return _report_ended(summary_path)
    restored = ckpts.restore_latest(run.state) if status == "resume" else None
    start = restored.step if restored else 0
    rec = recorder.Recorder(workdir, start_step=start, total_steps=run.num_steps,
                            restored=restored.meta if restored else None,
                            progress=config.progress, hparams=wd.flatten(config_dict))
    if jax.process_index() == 0:
      data.write_label_noise(run.datasets, workdir)
      # The data facts as soon as they are known: a run that dies early still says what it
      # trained on.
      wd.write_json(os.path.join(workdir, wd.DATASET_FILE), run.datasets.info)
    print(_start_line(config, settings, run, workdir, start), flush=True)
    state = restored.state if restored else run.state
    try:
      diverged_step = _loop(config, settings, run, state, start, ckpts, rec, config_dict)
    finally:
      rec.close()
    final = rec.last("metrics", "test_accuracy")
    if not final:   # a finished run whose checkpoint kept no logs (an older version wrote it)
      final = _evaluate_state(run, settings, restored.state if restored else state)
    summary = {
        "status": "diverged" if diverged_step else "completed",
        "diverged_step": diverged_step,
        "config": config.to_dict(),
        "settings": {**settings, "num_steps": run.num_steps,
                     "gradient_evaluations_per_step": run.passes,
                     "bn_policy": config.sam.bn_policy if run.passes > 1 else None,
                     "weight_decay_in_loss": run.l2},
        "devices": parallel.device_summary(run.mesh),
        "dataset": run.datasets.info,
        "versions": wd.package_versions(),
        "final": final,
        "measures": {k: v for k, v in rec.last("measures").items() if k != "step"},
        "wall_time_s": time.time() - started,
    }
    if diverged_step:
      saved = [s for s in ckpts.steps() if s < diverged_step]
      summary["last_good_checkpoint"] = saved[-1] if saved else None
    rec.write_summary(summary)
  print(_final_line(summary))
  return summary


def _loop(config, settings, run: "Run", state, start: int, ckpts, rec, config_dict) -> int | None:
  """Trains from step ``start`` to ``run.num_steps``: logs, evaluates, measures and saves on
  their schedules. Returns the first step whose loss was not finite (None if none). Ctrl-C or
  SIGTERM ends it with ``Interrupted``, after the checkpoint being written is finished."""
  mesh = run.mesh
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  extra = family_extra_args(config)
  train_step = jax.jit(
      steps.make_train_step(run.model, run.tx, seed=config.seed,
                            label_smoothing=config.label_smoothing, l2=run.l2,
                            passes=run.passes, groups=settings["forward_groups"],
                            grouped_perturbation=settings["sam_groups"] > 1,
                            bn_policy=config.sam.bn_policy, extra_args=extra),
      in_shardings=(run.state_sharding, batch_sharding), out_shardings=(run.state_sharding,
                                                                        replicated),
      static_argnums=2, donate_argnums=0)   # 2: kfac_due (a keyword is refused with shardings)
  # K-FAC statistics refresh on update indices 0, stats_every, ...: told to the step as a
  # static bool (two programs) rather than a traced lax.cond, which XLA:CPU runs far slower.
  kfac_every = config.kfac.stats_every if "kfac_factors" in extra else None
  eval_step = jax.jit(steps.make_eval_step(run.model))
  names = measure_names(config)
  measure_batches = (evaluators.subset_batches(run.datasets.train_eval,
                                               config.measures.num_examples,
                                               config.measures.batch_size) if names else [])
  batches = data.prefetch_to_device(
      run.datasets.train.train_batches(config.batch_size, settings["data_seed"], start), 2,
      batch_sharding)
  window, window_start, window_time = [], start, time.time()
  done = start
  try:
    for step in range(start + 1, run.num_steps + 1):
      due = (step - 1) % kfac_every == 0 if kfac_every else None
      state, step_metrics = train_step(state, next(batches), due)
      done = step
      window.append(step_metrics)
      last = step == run.num_steps
      is_eval = step % config.eval_every == 0 or last
      is_ckpt = step % config.checkpoint_every == 0 or last
      every = config.measures.every_steps
      is_measure = bool(names) and ((every > 0 and step % every == 0) or last)
      if not (step % config.log_every == 0 or is_eval or is_ckpt or is_measure):
        continue
      stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *window))
      bad = np.flatnonzero(~np.isfinite(stacked["train_loss"]))
      if bad.size:
        return window_start + int(bad[0]) + 1
      elapsed = time.time() - window_time
      record = {"step": step, "learning_rate": float(run.schedule(step - 1))}
      record.update({k: float(np.mean(v)) for k, v in stacked.items()})
      if is_eval:
        record.update(_evaluate_state(run, settings, state, eval_step))
      measured = None
      if is_measure:
        measured = evaluators.run(names, measure_settings(config, names), run.model,
                                  state.params, state.batch_stats, measure_batches,
                                  bn_mode=config.measures.bn_mode, seed=config.measures.seed,
                                  num_classes=run.datasets.num_classes)
        record.update(evaluators.scalars(measured))
      timing = {"step": step, "step_time_s": elapsed / len(window),
                "examples_per_second": config.batch_size * len(window) / elapsed}
      rec.record(step, record, timing, measured)
      if is_ckpt:
        ckpts.save(step, state, {"config": config_dict, **rec.meta()})
      window, window_start, window_time = [], step, time.time()
  except KeyboardInterrupt:
    ckpts.wait()
    saved = ckpts.steps()
    raise Interrupted(done, saved[-1] if saved else None) from None
  finally:
    # Interrupted or not, finish the checkpoint being written, so that a rerun resumes from it.
    ckpts.wait()
  return None


def _evaluate_state(run: "Run", settings: dict, state, eval_step=None) -> dict:
  """Test and training-subset loss and accuracy of ``state``, and the gaps."""
  eval_step = eval_step or jax.jit(steps.make_eval_step(run.model))
  sharding = parallel.batch_sharding(run.mesh)
  test = _evaluate(eval_step, state, run.datasets.test, settings["eval_batch"], sharding)
  train_side = _evaluate(eval_step, state, run.datasets.train_eval, settings["eval_batch"],
                         sharding)
  out = {f"test_{k}": v for k, v in test.items()}
  out.update({f"eval_train_{k}": v for k, v in train_side.items()})
  out["generalization_gap"] = test["loss"] - train_side["loss"]
  out["accuracy_gap"] = train_side["accuracy"] - test["accuracy"]
  return out


def _report_ended(summary_path: str) -> dict:
  summary = wd.read_json(summary_path)
  logging.info("run already ended (%s); its summary: %s", summary["status"],
               summary.get("final"))
  print(_final_line(summary))
  return summary


def _describe_optimizer(config) -> str:
  opt = config.optimizer
  family = opt.name in SAM_FAMILY
  base_name = opt.base if family else opt.name
  parts = [f"lr {opt.learning_rate:g} {config.schedule.name}"]
  if base_name == "sgd" and opt.momentum:
    parts.append(f"momentum {opt.momentum:g}" + (" nesterov" if opt.nesterov else ""))
  if opt.weight_decay:
    parts.append(f"weight decay {opt.weight_decay:g}")
  base = f"{base_name} ({', '.join(parts)})"
  if not family:
    return base
  keys = {"sam": ("sam.rho",), "asam": ("sam.rho", "sam.eta"),
          "csam": ("csam.rho1", "csam.rho2", "csam.alpha", "csam.metric"),
          "nonuniform_sam": ("csam.rho1", "csam.rho2", "csam.alpha", "csam.metric"),
          "gam": ("sam.rho",), "sam_gcm": ("sam_gcm.rho", "sam_gcm.xi"),
          "cov": ("cov.lam",)}[opt.name]
  flat = wd.flatten(config.to_dict())
  shown = " ".join(f"{k.split('.')[-1]}={flat[k]}" for k in keys)
  return f"{opt.name} ({shown}) over {base}"


def _start_line(config, settings: dict, run: "Run", workdir: str, start: int) -> str:
  """What runs, in one line: data, model, optimizer, length, devices, workdir."""
  ds = run.datasets
  subset = (f"{ds.num_train:,} of {ds.info.get('num_train_full', ds.num_train):,}"
            if config.num_train_examples else f"{ds.num_train:,}")
  devices = settings["num_devices"]
  platform = run.mesh.devices.ravel()[0].platform
  where = f"resuming at step {start:,}" if start else "starting"
  return (f"{config.dataset} ({subset} training examples) -> {config.model.name} "
          f"({settings['num_params']:,} parameters), {_describe_optimizer(config)}, "
          f"{run.num_steps:,} steps of batch {config.batch_size} on {devices} {platform} "
          f"device{'s' if devices > 1 else ''}"
          + (f" in {settings['num_processes']} processes" if settings["num_processes"] > 1
             else "") + f"; {where} in {workdir}")


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
