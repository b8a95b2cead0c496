"""``train_and_evaluate(config, workdir) -> summary``: the library's entry point.

A config's ``task`` selects what runs: ``'train'`` (this module's loop) or one of the small
studies in ``nonuniform_jax.experiments``. Every check of the config happens here, before any
data is loaded or anything is compiled.
"""

import functools
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

from nonuniform_jax import data, evaluators, models, optim, parallel, steps, workdir as wd
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


def _choice(kind: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"unknown {kind} {value!r}; choose one of {list(choices)}")


def _positive(name: str, value) -> None:
  if not (isinstance(value, (int, float)) and value > 0):
    raise ValueError(f"{name} must be > 0, got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> dict:
  """Validates every setting of a training run; returns the settings derived from them
  (devices, per-device batch, m-sharpness groups). Raises ValueError with one line naming the
  bad value and the valid choices."""
  _choice("task", config.task, TASKS)
  num_devices = config.parallel.num_devices or jax.device_count()
  if not 0 < num_devices <= jax.device_count() or (
      jax.process_count() > 1 and num_devices != jax.device_count()):
    raise ValueError(f"parallel.num_devices {config.parallel.num_devices!r} is not available: "
                     f"choose 0 (all {jax.device_count()} devices)"
                     + (f" or 1..{jax.device_count()}" if jax.process_count() == 1 else ""))
  _positive("eval_batch_size", config.eval_batch_size)
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
  _choice("optimizer", opt.name, OPTIMIZERS)
  if opt.name in SAM_FAMILY:
    _choice("base optimizer", opt.base, base.BASE_OPTIMIZERS)
  _choice("schedule", config.schedule.name, base.SCHEDULES)
  _choice("weight_decay_mode", opt.weight_decay_mode, base.WEIGHT_DECAY_MODES)
  _positive("optimizer.learning_rate", opt.learning_rate)
  _positive("batch_size", config.batch_size)
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError(f"num_steps ({config.num_steps!r}) or num_epochs "
                     f"({config.num_epochs!r}) must be > 0")
  for name in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive(name, config[name])
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
    _choice("sam.bn_policy", config.sam.bn_policy, steps.BN_POLICIES)
    if opt.name in ("csam", "nonuniform_sam"):
      _choice("csam.metric", config.csam.metric, CSAM_METRICS)
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
    _positive("measures.num_examples", config.measures.num_examples)
    _positive("measures.batch_size", config.measures.batch_size)
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
  check_model_fit(config)
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
          "fully_sharded": bool(config.parallel.fully_sharded)}


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
                     unfactored=k.unfactored, kfac_layers=kfac_layers)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs what ``config.task`` names in ``workdir`` and returns the run's summary."""
  _choice("task", config.task, TASKS)
  if config.task in STUDIES:
    study = importlib.import_module(f"nonuniform_jax.experiments.{config.task}")
    return study.run(config, workdir)
  settings = check_config(config)
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


def check_model_fit(config: ml_collections.ConfigDict) -> None:
  """The refusals only the model can tell (BatchNorm or dropout under per-example gradients,
  SAM-GCM's size limit), from the dataset's shape (``data.describe``) and the model's abstract
  initialisation: before any data are read or anything is compiled or written."""
  extra = set(family_extra_args(config))
  per_example = sorted(set(measure_names(config)) & set(evaluators.PER_EXAMPLE))
  needs_examples = bool({"per_example_grads", "per_example_loss_fn"} & extra)
  if not (needs_examples or per_example):
    return
  model_cfg = config.model.to_dict()
  num_classes, shape = data.describe(config.dataset, config.image_size)
  model = models.get_model(model_cfg.pop("name"), num_classes, **model_cfg)
  x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
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
  if "per_example_grads" in extra:   # SAM-GCM: b per-example gradients of the whole model
    count = parameter_count(variables["params"])
    if count > config.sam_gcm.max_params:
      raise ValueError(f"optimizer 'sam_gcm' needs the per-example gradient covariance: model "
                       f"{config.model.name!r} on {config.dataset!r} has {count} parameters, "
                       f"more than sam_gcm.max_params={config.sam_gcm.max_params}; use a "
                       "smaller model or raise sam_gcm.max_params")
  if has_bn and config.measures.bn_mode == "batch" and per_example:
    raise ValueError(f"measures {per_example} take per-example gradients or Hessians, which "
                     f"BatchNorm in 'batch' mode (model {config.model.name!r}) would normalise "
                     "by each example's own statistics; use measures.bn_mode 'running'")


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
      config.dataset, seed=settings["data_seed"], data_dir=config.data_dir, augment=config.augment,
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


def checkpoint_manager(workdir: str, keep: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir if "://" in workdir else os.path.abspath(workdir),
                      wd.CHECKPOINT_DIR)
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                          create=True))


def restore(manager, step: int, like: steps.TrainState) -> steps.TrainState:
  """The checkpoint at ``step``, placed like ``like`` (any device count)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _train(config, workdir: str, settings: dict) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  started = time.time()
  # Read first (a different config is refused here), build (what only the data can refuse stops
  # here; the model's refusals came in check_config), and only then write to the workdir.
  status = wd.prepare(workdir, config.to_dict(), config.overwrite, write=False)
  summary_path = os.path.join(workdir, wd.SUMMARY_FILE)
  if status == "completed":
    summary = wd.read_json(summary_path)
    logging.info("run in %s already completed; its summary: %s", workdir, summary["final"])
    print(_final_line(summary))
    return summary
  is_main = jax.process_index() == 0

  ds, model, tx, schedule, passes, l2, num_steps, mesh, state, state_sharding = build(
      config, settings)
  wd.prepare_once(workdir, config.to_dict(), config.overwrite)
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  if is_main:
    data.write_label_noise(ds, workdir)
    # The data facts (subset, class balance, label noise) as soon as they are known: a long run
    # that dies before its summary still says what it trained on.
    wd.write_json(os.path.join(workdir, wd.DATASET_FILE), ds.info)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  start_step = 0
  if manager.latest_step() is not None:
    start_step = manager.latest_step()
    state = restore(manager, start_step, state)
    logging.info("resumed from step %d of %s", start_step, workdir)
  metrics_log = timing_log = None
  if is_main:
    metrics_log = wd.JsonLog(os.path.join(workdir, wd.METRICS_FILE), start_step)
    timing_log = wd.JsonLog(os.path.join(workdir, wd.TIMING_FILE), start_step)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start_step == 0:
    writer.write_hparams({k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                          for k, v in wd.flatten(config.to_dict()).items()})

  train_step = jax.jit(
      steps.make_train_step(model, tx, seed=config.seed, label_smoothing=config.label_smoothing,
                            l2=l2, passes=passes, groups=settings["forward_groups"],
                            grouped_perturbation=settings["sam_groups"] > 1,
                            bn_policy=config.sam.bn_policy,
                            extra_args=family_extra_args(config)),
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
      static_argnums=2, donate_argnums=0)   # 2: kfac_due (a keyword is refused with shardings)
  # K-FAC statistics refresh on update indices 0, stats_every, ...: told to the step as a
  # static bool (two programs) rather than a traced lax.cond, which XLA:CPU runs far slower.
  kfac_every = (config.kfac.stats_every if "kfac_factors" in family_extra_args(config)
                else None)
  eval_step = jax.jit(steps.make_eval_step(model))

  names = measure_names(config)
  measure_batches = (evaluators.subset_batches(ds.train_eval, config.measures.num_examples,
                                               config.measures.batch_size) if names else [])
  measures_log = (wd.JsonLog(os.path.join(workdir, wd.MEASURES_FILE), start_step)
                  if names and is_main else None)
  measured = {}

  batches = data.prefetch_to_device(
      ds.train.train_batches(config.batch_size, settings["data_seed"], start_step), 2,
      batch_sharding)
  progress = _progress(config, start_step, num_steps, is_main)
  window, window_start, window_time = [], start_step, time.time()
  final, diverged_step = {}, None
  try:
    for step in range(start_step + 1, num_steps + 1):
      if kfac_every:
        state, step_metrics = train_step(state, next(batches), (step - 1) % kfac_every == 0)
      else:
        state, step_metrics = train_step(state, next(batches), None)
      window.append(step_metrics)
      is_log = step % config.log_every == 0 or step == num_steps
      is_eval = step % config.eval_every == 0 or step == num_steps
      is_ckpt = step % config.checkpoint_every == 0 or step == num_steps
      every = config.measures.every_steps
      is_measure = bool(names) and ((every > 0 and step % every == 0) or step == num_steps)
      if not (is_log or is_eval or is_ckpt or is_measure):
        continue
      stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *window))
      bad = np.flatnonzero(~np.isfinite(stacked["train_loss"]))
      if bad.size:
        diverged_step = window_start + int(bad[0]) + 1
        break
      elapsed = time.time() - window_time
      record = {"step": step, "learning_rate": float(schedule(step - 1))}
      record.update({k: float(np.mean(v)) for k, v in stacked.items()})
      if is_eval:
        test = _evaluate(eval_step, state, ds.test, settings["eval_batch"], batch_sharding)
        train_side = _evaluate(eval_step, state, ds.train_eval, settings["eval_batch"],
                               batch_sharding)
        record.update({f"test_{k}": v for k, v in test.items()})
        record.update({f"eval_train_{k}": v for k, v in train_side.items()})
        record["generalization_gap"] = test["loss"] - train_side["loss"]
        record["accuracy_gap"] = train_side["accuracy"] - test["accuracy"]
        final = record
      if is_measure:
        measured = evaluators.run(names, measure_settings(config, names), model, state.params,
                                  state.batch_stats, measure_batches,
                                  bn_mode=config.measures.bn_mode, seed=config.measures.seed,
                                  num_classes=ds.num_classes)
        record.update(evaluators.scalars(measured))
        if is_main:
          measures_log.append({"step": step, **measured})
      timing = {"step": step, "step_time_s": elapsed / len(window),
                "examples_per_second": config.batch_size * len(window) / elapsed}
      if is_main:
        metrics_log.append(record)
        timing_log.append(timing)
        writer.write_scalars(step, {**record, **timing})
      if is_ckpt:
        manager.save(step, args=ocp.args.StandardSave(state))
      progress.update(step - progress.n)
      progress.set_postfix(loss=f"{record['train_loss']:.4f}")
      window, window_start, window_time = [], step, time.time()
  finally:
    # Interrupted (KeyboardInterrupt, an error) or not, finish the checkpoint being written, so
    # that a rerun resumes from it instead of from the one before.
    manager.wait_until_finished()
  progress.close()
  writer.flush()

  summary = {
      "status": "diverged" if diverged_step else "completed",
      "diverged_step": diverged_step,
      "config": config.to_dict(),
      "settings": {**settings, "num_steps": num_steps, "gradient_evaluations_per_step": passes,
                   "bn_policy": config.sam.bn_policy if passes > 1 else None,
                   "weight_decay_in_loss": l2},
      "devices": parallel.device_summary(mesh),
      "dataset": ds.info,
      "versions": wd.package_versions(),
      "final": final,
      "measures": measured,
      "wall_time_s": time.time() - started,
  }
  if is_main:
    wd.write_json(summary_path, summary)
  if diverged_step:
    logging.error("training diverged: non-finite loss at step %d; the last good checkpoint is "
                  "step %s", diverged_step, manager.latest_step())
  print(_final_line(summary))
  return summary


def _final_line(summary: dict) -> str:
  if summary["status"] == "diverged":
    return (f"diverged at step {summary['diverged_step']} (non-finite loss); the last good "
            "checkpoint is kept")
  f = summary["final"]
  return (f"test accuracy {f['test_accuracy']:.4f}  train accuracy "
          f"{f['eval_train_accuracy']:.4f}  generalization gap (loss) "
          f"{f['generalization_gap']:.4f}  accuracy gap {f['accuracy_gap']:.4f}")


def _progress(config, start: int, total: int, is_main: bool):
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=start, disable=not (config.progress and is_main),
                   unit="step", dynamic_ncols=True)
