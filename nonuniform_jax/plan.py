"""A training run's config, read and checked once, into a typed, frozen ``Plan``.

``read(config)`` is the one place where the settings of a training run are validated and where
the settings derived from them (devices, per-device batch, m-sharpness groups, the data seed,
the parameter count) are computed. Everything below it — building the run, the loop, the
evaluators — takes the plan or plain values, never the config. Every refusal is one line naming
the bad value and what is valid (``nonuniform_jax.checks``), before anything is loaded, compiled
or written.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_collections

from nonuniform_jax import checks, data, evaluators, models, objective, pytree
from nonuniform_jax.optim import base, family, kfac

# Settings that may be infinite: an ℓ∞ ball's p.
INFINITE_ALLOWED = ("measures.settings.worst_case_sharpness.p",)
BN_POLICIES = ("clean", "every_pass")


@dataclasses.dataclass(frozen=True)
class Data:
  dataset: str
  data_dir: str
  augment: bool
  image_size: int
  num_train_examples: int
  train_eval_examples: int
  label_noise: str
  label_noise_rate: float
  seed: int                     # the data seed: data_seed >= 0, else the run's seed
  num_classes: int
  input_shape: tuple


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  kwargs: tuple                 # (key, value) pairs of the model's arguments
  num_params: int
  has_batchnorm: bool
  pretrained: str = ""          # a published checkpoint to start from (models.pretrained)
  pretrained_note: str = ""     # what loading it does, in words

  def build(self, num_classes: int):
    return models.get_model(self.name, num_classes, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  name: str
  entry: family.Entry
  settings: dict                # the config's groups the optimizer reads, as plain dicts
  passes: int                   # gradient evaluations per step
  needs: tuple                  # what the step hands tx.update besides grad_fn
  weight_decay_in_loss: bool    # SAM's weight_decay_in_perturbation
  l2: float                     # the L2 coefficient inside the loss (0 otherwise)
  kfac_schedule: kfac.Schedule | None   # the optimizer's K-FAC schedule, when the step captures


@dataclasses.dataclass(frozen=True)
class Devices:
  num_devices: int
  num_processes: int
  per_device_batch: int
  eval_batch: int               # rounded up to a multiple of the devices (padded and masked)
  sam_m: int | None
  sam_groups: int
  forward_groups: int
  bn_statistics: str
  bn_sync: bool
  fully_sharded: bool


@dataclasses.dataclass(frozen=True)
class Measure:
  name: str
  settings: dict
  every_steps: int              # 0: only at the end


@dataclasses.dataclass(frozen=True)
class Measures:
  items: tuple                  # of Measure
  num_examples: int
  batch_size: int
  bn_mode: str
  seed: int

  @property
  def names(self) -> list[str]:
    return [m.name for m in self.items]

  def due(self, step: int, last: bool) -> list[Measure]:
    """The measures that run after ``step``: on their own schedules and at the end."""
    return [m for m in self.items if last or (m.every_steps and step % m.every_steps == 0)]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a training run is, decided before it starts (see the module docstring)."""
  config: dict                  # the config as config.json holds it
  seed: int
  data: Data
  model: Model
  optimizer: Optimizer
  schedule: dict
  batch_size: int
  num_steps: int                # > 0; else num_epochs decides, once the data size is known
  num_epochs: float
  label_smoothing: float
  precision: str                # of the training and evaluation passes (objective.py)
  bn_policy: str
  devices: Devices
  measures: Measures
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  progress: bool
  overwrite: bool

  def total_steps(self, num_train: int) -> int:
    if self.num_steps > 0:
      return self.num_steps
    return max(1, math.ceil(self.num_epochs * num_train / self.batch_size))

  def settings(self) -> dict:
    """The derived settings, as the run's summary records them."""
    d, o = self.devices, self.optimizer
    return {"num_devices": d.num_devices, "num_processes": d.num_processes,
            "global_batch": self.batch_size, "per_device_batch": d.per_device_batch,
            "eval_batch": d.eval_batch, "data_seed": self.data.seed, "sam_m": d.sam_m,
            "sam_groups": d.sam_groups, "forward_groups": d.forward_groups,
            "bn_statistics": d.bn_statistics, "fully_sharded": d.fully_sharded,
            "num_params": self.model.num_params, "gradient_evaluations_per_step": o.passes,
            "bn_policy": self.bn_policy if o.passes > 1 else None,
            "weight_decay_in_loss": o.l2, "precision": self.precision,
            "pretrained": self.model.pretrained_note or None}


def _setting(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _groups(config: dict, keys) -> dict:
  """The config groups (``optimizer``, ``sam``...) an optimizer reads, as plain nested dicts."""
  return {k: json.loads(json.dumps(config[k])) for k in keys if k in config}


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  checks.finite_numbers(config.to_dict(), INFINITE_ALLOWED)
  for name in ("seed", "num_steps", "num_train_examples", "train_eval_examples",
               "parallel.num_devices", "measures.every_steps", "schedule.warmup_steps"):
    checks.integer(name, _setting(config, name))
  checks.non_negative("num_epochs", config.num_epochs)
  checks.integer("eval_batch_size", config.eval_batch_size, 1)
  checks.integer("batch_size", config.batch_size, 1)
  if not (isinstance(config.data_seed, int) and config.data_seed >= -1):
    raise ValueError(f"data_seed {config.data_seed!r} must be an integer >= 0, or -1 (the run's "
                     "seed)")
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError(f"num_steps ({config.num_steps!r}) or num_epochs "
                     f"({config.num_epochs!r}) must be > 0")
  for name in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
    checks.integer(name, config[name], 1)
  if config.checkpoint_every % config.log_every:
    raise ValueError(f"checkpoint_every ({config.checkpoint_every}) must be a multiple of "
                     f"log_every ({config.log_every}) so a resumed run logs what an "
                     "uninterrupted one does")
  checks.in_range("label_smoothing", config.label_smoothing, 0.0, 1.0, high_open=True)
  checks.choice("precision", config.precision, objective.PRECISIONS)


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  opt, s = config.optimizer, config.schedule
  checks.choice("schedule", s.name, base.SCHEDULES)
  checks.choice("weight_decay_mode", opt.weight_decay_mode, base.WEIGHT_DECAY_MODES)
  checks.positive("optimizer.learning_rate", opt.learning_rate)
  checks.in_range("optimizer.momentum", opt.momentum, 0.0, 1.0, high_open=True)
  checks.in_range("optimizer.b1", opt.b1, 0.0, 1.0, high_open=True)
  checks.in_range("optimizer.b2", opt.b2, 0.0, 1.0, high_open=True)
  checks.positive("optimizer.eps", opt.eps)
  checks.non_negative("optimizer.weight_decay", opt.weight_decay)
  checks.non_negative("optimizer.grad_clip_norm", opt.grad_clip_norm)
  checks.positive("schedule.step_factor", s.step_factor)
  checks.non_negative("schedule.end_factor", s.end_factor)
  for fraction in s.step_boundaries:
    checks.in_range("schedule.step_boundaries", fraction, 0.0, 1.0)


def _devices(config, entry: family.Entry, needs: tuple) -> Devices:
  count = jax.device_count()
  num_devices = config.parallel.num_devices or count
  if not 0 < num_devices <= count or (jax.process_count() > 1 and num_devices != count):
    raise ValueError(f"parallel.num_devices {config.parallel.num_devices!r} is not available: "
                     f"choose 0 (all {count} devices)"
                     + (f" or 1..{count}" if jax.process_count() == 1 else ""))
  if config.batch_size % num_devices:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {num_devices} "
                     f"devices; choose a multiple of {num_devices}")
  per_device = config.batch_size // num_devices
  m = config.sam.m
  if entry.is_family:
    if needs and (m or not config.parallel.bn_sync):
      raise ValueError(f"optimizer {entry.name!r} with {needs[0]} needs the whole batch in one "
                       f"group: set sam.m=0 and parallel.bn_sync=True (got sam.m={m}, "
                       f"parallel.bn_sync={config.parallel.bn_sync})")
    if m and not entry.grouped:
      grouped = [e.name for e in family.ENTRIES if e.grouped]
      raise ValueError(f"sam.m={m}: m-sharpness groups are implemented for {grouped}, not "
                       f"{config.optimizer.name!r}; set sam.m=0")
    if m < 0 or (m > 0 and per_device % m):
      divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
      raise ValueError(f"sam.m {m!r} must divide the per-device batch {per_device} "
                       f"(batch_size {config.batch_size} over {num_devices} devices); choose 0 "
                       f"(the whole batch) or one of {divisors}")
  m = config.batch_size if m == 0 else m
  sam_groups = config.batch_size // m if entry.is_family else 1
  bn_groups = 1 if config.parallel.bn_sync else num_devices
  return Devices(
      num_devices=num_devices, num_processes=jax.process_count(), per_device_batch=per_device,
      # Evaluation pads and masks, so its batch is rounded up to a multiple of the devices:
      # the paper configs' 1000 then runs on 16 or 32 devices as on 8.
      eval_batch=-(-config.eval_batch_size // num_devices) * num_devices,
      sam_m=m if entry.is_family else None, sam_groups=sam_groups,
      forward_groups=max(sam_groups, bn_groups),
      bn_statistics=("per m-sharpness group" if sam_groups > 1 else
                     "per device" if bn_groups > 1 else "global batch"),
      bn_sync=bool(config.parallel.bn_sync), fully_sharded=bool(config.parallel.fully_sharded))


def _measures(config) -> Measures:
  """The measures a run computes: ``measures.names`` plus, with ``measure_nonuniformity``, the
  standard nonuniformity set; each with its settings and schedule
  (``measures.settings.NAME.every_steps``, else ``measures.every_steps``)."""
  m = config.measures
  names = list(m.names)
  if config.measure_nonuniformity:
    names += [n for n in evaluators.NONUNIFORMITY if n not in names]
  given = {n: m.settings[n].to_dict() if n in m.settings else {} for n in names}
  every = {n: given[n].pop("every_steps", m.every_steps) for n in names}
  # batch_gradient_noise's batch_size 0 (the default) is the training batch size: the b whose
  # noise it estimates.
  if "batch_gradient_noise" in given and not given["batch_gradient_noise"].get("batch_size"):
    given["batch_gradient_noise"]["batch_size"] = config.batch_size
  evaluators.check(names, given, m.bn_mode)
  for name in names:
    checks.integer(f"measures.settings.{name}.every_steps", every[name])
  if names:
    checks.integer("measures.num_examples", m.num_examples, 1)
    checks.integer("measures.batch_size", m.batch_size, 1)
  if "batch_gradient_noise" in names:
    b = given["batch_gradient_noise"]["batch_size"]
    usable = min(m.num_examples, config.train_eval_examples or m.num_examples)
    if not 1 <= b <= usable // 2:
      raise ValueError(f"measures.settings.batch_gradient_noise.batch_size {b!r} needs at least "
                       f"2 disjoint batches of the {usable} measured examples; choose 1 to "
                       f"{usable // 2}" + ("" if m.settings.get("batch_gradient_noise", {}).get(
                           "batch_size") else " (unset or 0, it is the training batch_size)"))
  return Measures(tuple(Measure(n, given[n], every[n]) for n in names), m.num_examples,
                  m.batch_size, m.bn_mode, m.seed)


def _model(config, needs: tuple, measures: Measures) -> tuple[Model, int, tuple]:
  """Builds the model abstractly (``jax.eval_shape``) for the dataset's shape: a model that
  cannot be built for that input, and the refusals only the model can tell (BatchNorm or dropout
  under per-example gradients, SAM-GCM's size limit, per-example measures on BatchNorm in batch
  mode), stop here, before any data are read."""
  kwargs = config.model.to_dict()
  name = kwargs.pop("name")
  pretrained = kwargs.pop("pretrained", "")
  models.check_model(name, **kwargs)
  num_classes, shape = data.describe(config.dataset, config.image_size)
  model = models.get_model(name, num_classes, **kwargs)
  x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
  try:
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  except Exception as e:  # pylint: disable=broad-except
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"model {name!r} with {kwargs} cannot be built for the inputs of "
                     f"{config.dataset!r} (shape {tuple(shape)}): {type(e).__name__}: "
                     f"{text}") from None
  # A published checkpoint must fit the model, from its array headers, before anything runs.
  note = models.pretrained.check(pretrained, name, model, variables) if pretrained else ""
  count = pytree.parameter_count(variables["params"])
  has_bn = "batch_stats" in variables
  per_example = bool({"per_example_grads", "per_example_loss_fn"} & set(needs))
  opt = config.optimizer.name
  if per_example and has_bn:
    raise ValueError(f"optimizer {opt!r} needs per-example gradients, which BatchNorm (in model "
                     f"{name!r}) does not have; choose a model without BatchNorm")
  dropout = {k: v for k, v in kwargs.items() if "dropout" in k and v}
  if per_example and dropout:
    raise ValueError(f"optimizer {opt!r} needs per-example gradients, which dropout "
                     f"({', '.join(f'model.{k}={v}' for k, v in dropout.items())}) would draw "
                     "apart from the batch's masks; set it to 0")
  if "per_example_grads" in needs and count > config.sam_gcm.max_params:
    raise ValueError(f"optimizer 'sam_gcm' needs the per-example gradient covariance: model "
                     f"{name!r} on {config.dataset!r} has {count} parameters, more than "
                     f"sam_gcm.max_params={config.sam_gcm.max_params}; use a smaller model or "
                     "raise sam_gcm.max_params")
  refused = sorted(set(measures.names) & set(evaluators.PER_EXAMPLE))
  if has_bn and measures.bn_mode == "batch" and refused:
    raise ValueError(f"measures {refused} take per-example gradients or Hessians, which "
                     f"BatchNorm in 'batch' mode (model {name!r}) would normalise by each "
                     "example's own statistics; use measures.bn_mode 'running'")
  model_plan = Model(name, tuple(sorted(kwargs.items())), count, has_bn, pretrained, note)
  return model_plan, num_classes, tuple(shape)


def read(config: ml_collections.ConfigDict) -> Plan:
  """The plan of a training run's ``config``; ValueError (one line) for any bad setting."""
  checks.choice("task", config.task, ("train",))
  _check_numbers(config)
  config_dict = json.loads(json.dumps(config.to_dict(), default=str))
  _check_optimizer(config)
  settings = _groups(config_dict, family.SETTING_GROUPS)
  family.check_kfac(settings)
  if family.get(config.optimizer.name).is_family:
    checks.non_negative("sam.rho", config.sam.rho)
  entry = family.check(config.optimizer.name, settings)
  needs = entry.needs(settings)
  if entry.is_family:
    checks.choice("sam.bn_policy", config.sam.bn_policy, BN_POLICIES)
    if config.sam.weight_decay_in_perturbation and (
        config.optimizer.weight_decay_mode != "coupled"):
      raise ValueError("sam.weight_decay_in_perturbation needs optimizer.weight_decay_mode "
                       f"'coupled', got {config.optimizer.weight_decay_mode!r}")
  devices = _devices(config, entry, needs)
  data.check_args(config.dataset, batch_size=config.batch_size,
                  eval_batch_size=devices.eval_batch,
                  num_train_examples=config.num_train_examples,
                  label_noise=config.label_noise.kind, label_noise_rate=config.label_noise.rate,
                  process_count=jax.process_count())
  measures = _measures(config)
  model, num_classes, shape = _model(config, needs, measures)
  in_loss = entry.is_family and bool(config.sam.weight_decay_in_perturbation)
  optimizer = Optimizer(
      name=config.optimizer.name, entry=entry, settings=settings, passes=entry.passes,
      needs=needs, weight_decay_in_loss=in_loss,
      l2=config.optimizer.weight_decay if in_loss else 0.0,
      kfac_schedule=family.kfac_schedule(settings) if "kfac_factors" in needs else None)
  data_plan = Data(
      dataset=config.dataset, data_dir=config.data_dir, augment=config.augment,
      image_size=config.image_size, num_train_examples=config.num_train_examples,
      train_eval_examples=config.train_eval_examples, label_noise=config.label_noise.kind,
      label_noise_rate=config.label_noise.rate,
      seed=config.seed if config.data_seed < 0 else config.data_seed,
      num_classes=num_classes, input_shape=shape)
  return Plan(
      config=config_dict, seed=config.seed, data=data_plan, model=model, optimizer=optimizer,
      schedule=settings["schedule"], batch_size=config.batch_size, num_steps=config.num_steps,
      num_epochs=config.num_epochs, label_smoothing=config.label_smoothing,
      precision=config.precision, bn_policy=config.sam.bn_policy, devices=devices,
      measures=measures,
      log_every=config.log_every, eval_every=config.eval_every,
      checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
      progress=bool(config.progress), overwrite=bool(config.overwrite))
