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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nonuniform_jax import data, models, optim, parallel, steps, workdir as wd
from nonuniform_jax.optim import base
from nonuniform_jax.optim.sam import validate_rho

STUDIES = ("toy_minima", "two_param", "sparse_regression")
TASKS = ("train",) + STUDIES
SAM_FAMILY = {"sam": 2, "asam": 2}            # name -> gradient evaluations per step
OPTIMIZERS = base.BASE_OPTIMIZERS + tuple(SAM_FAMILY)


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
  data.check_args(config.dataset, batch_size=config.batch_size,
                  eval_batch_size=config.eval_batch_size,
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
  _positive("eval_batch_size", config.eval_batch_size)
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError(f"num_steps ({config.num_steps!r}) or num_epochs "
                     f"({config.num_epochs!r}) must be > 0")
  for name in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive(name, config[name])
  if config.checkpoint_every % config.log_every:
    raise ValueError(f"checkpoint_every ({config.checkpoint_every}) must be a multiple of "
                     f"log_every ({config.log_every}) so a resumed run logs what an "
                     "uninterrupted one does")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % num_devices:
      raise ValueError(f"{name} {config[name]} is not divisible by the {num_devices} devices; "
                       f"choose a multiple of {num_devices}")
  per_device = config.batch_size // num_devices
  m = config.sam.m
  if opt.name in SAM_FAMILY:
    validate_rho("sam.rho", config.sam.rho)
    _choice("sam.bn_policy", config.sam.bn_policy, steps.BN_POLICIES)
    if m < 0 or (m > 0 and per_device % m):
      divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
      raise ValueError(f"sam.m {m!r} must divide the per-device batch {per_device} "
                       f"(batch_size {config.batch_size} over {num_devices} devices); choose 0 "
                       f"(the whole batch) or one of {divisors}")
    if config.sam.weight_decay_in_perturbation and opt.weight_decay_mode != "coupled":
      raise ValueError("sam.weight_decay_in_perturbation needs optimizer.weight_decay_mode "
                       f"'coupled', got {opt.weight_decay_mode!r}")
  m = config.batch_size if m == 0 else m
  sam_groups = config.batch_size // m if opt.name in SAM_FAMILY else 1
  bn_groups = 1 if config.parallel.bn_sync else num_devices
  return {"num_devices": num_devices, "num_processes": jax.process_count(),
          "global_batch": config.batch_size, "per_device_batch": per_device,
          "sam_m": m if opt.name in SAM_FAMILY else None, "sam_groups": sam_groups,
          "forward_groups": max(sam_groups, bn_groups),
          "bn_statistics": ("per m-sharpness group" if sam_groups > 1 else
                            "per device" if bn_groups > 1 else "global batch"),
          "fully_sharded": bool(config.parallel.fully_sharded)}


def total_steps(config, num_train: int) -> int:
  if config.num_steps > 0:
    return int(config.num_steps)
  return max(1, math.ceil(config.num_epochs * num_train / config.batch_size))


def build_optimizer(config, num_steps: int):
  """(transformation, schedule, gradient evaluations per step, L2 coefficient in the loss)."""
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
  groups = config.batch_size // (config.sam.m or config.batch_size)
  perturb = optim.sam(config.sam.rho, adaptive=opt.name == "asam", eta=config.sam.eta,
                      grouped=groups > 1)
  return optax.chain(perturb, base_tx), schedule, SAM_FAMILY[opt.name], l2


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
  return out


def _train(config, workdir: str, settings: dict) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  started = time.time()
  status = wd.prepare(workdir, config.to_dict(), config.overwrite)
  summary_path = os.path.join(workdir, wd.SUMMARY_FILE)
  if status == "completed":
    summary = wd.read_json(summary_path)
    logging.info("run in %s already completed; its summary: %s", workdir, summary["final"])
    print(_final_line(summary))
    return summary
  is_main = jax.process_index() == 0

  ds = data.get_datasets(
      config.dataset, seed=config.seed, data_dir=config.data_dir, augment=config.augment,
      image_size=config.image_size, num_train_examples=config.num_train_examples,
      train_eval_examples=config.train_eval_examples, label_noise=config.label_noise.kind,
      label_noise_rate=config.label_noise.rate, process_index=jax.process_index(),
      process_count=jax.process_count())
  if is_main:
    data.write_label_noise(ds, workdir)
  num_steps = total_steps(config, ds.num_train)
  model_cfg = config.model.to_dict()
  model = models.get_model(model_cfg.pop("name"), ds.num_classes, **model_cfg)
  tx, schedule, passes, l2 = build_optimizer(config, num_steps)

  mesh = parallel.data_mesh(jax.devices()[:settings["num_devices"]])
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)

  def init_state():
    variables = model.init(jax.random.key(config.seed),
                           jnp.zeros((1,) + tuple(ds.input_shape), jnp.float32))
    params = variables["params"]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables.get("batch_stats", {}),
                            opt_state=tx.init(params))

  state_sharding = parallel.state_shardings(jax.eval_shape(init_state), mesh,
                                            config.parallel.fully_sharded)
  state = jax.jit(init_state, out_shardings=state_sharding)()
  ckpt_dir = os.path.join(workdir if "://" in workdir else os.path.abspath(workdir),
                          wd.CHECKPOINT_DIR)
  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                                     create=True))
  start_step = 0
  if manager.latest_step() is not None:
    start_step = manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(start_step, args=ocp.args.StandardRestore(abstract))
    logging.info("resumed from step %d of %s", start_step, ckpt_dir)
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
                            bn_policy=config.sam.bn_policy),
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
      donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(model))

  batches = data.prefetch_to_device(
      ds.train.train_batches(config.batch_size, config.seed, start_step), 2, batch_sharding)
  progress = _progress(config, start_step, num_steps, is_main)
  window, window_start, window_time = [], start_step, time.time()
  final, diverged_step = {}, None
  for step in range(start_step + 1, num_steps + 1):
    state, step_metrics = train_step(state, next(batches))
    window.append(step_metrics)
    is_log = step % config.log_every == 0 or step == num_steps
    is_eval = step % config.eval_every == 0 or step == num_steps
    is_ckpt = step % config.checkpoint_every == 0 or step == num_steps
    if not (is_log or is_eval or is_ckpt):
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
      test = _evaluate(eval_step, state, ds.test, config.eval_batch_size, batch_sharding)
      train_side = _evaluate(eval_step, state, ds.train_eval, config.eval_batch_size,
                             batch_sharding)
      record.update({f"test_{k}": v for k, v in test.items()})
      record.update({f"eval_train_{k}": v for k, v in train_side.items()})
      record["generalization_gap"] = test["loss"] - train_side["loss"]
      record["accuracy_gap"] = train_side["accuracy"] - test["accuracy"]
      final = record
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
  progress.close()
  manager.wait_until_finished()
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
