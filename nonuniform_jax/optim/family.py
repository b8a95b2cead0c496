"""Every optimizer the trainer knows, one entry each: adding an optimizer means adding its
transformation (its own module here) and one ``Entry`` below (with a test in
``tests/test_family.py``); nothing in the trainer names an optimizer.

An entry says what a step must do for it and how to build it from plain settings (the config's
groups as nested dicts: ``settings["sam"]["rho"]``), never from a config object:

* ``passes``: gradient evaluations per step (SGD 1, SAM 2, CSAM 3);
* ``needs(settings)``: what the train step hands ``tx.update`` besides ``grad_fn`` —
  ``'kfac_factors'`` (the clean pass also captures the Kronecker factors, on refresh steps),
  ``'per_example_grads'``, ``'per_example_loss_fn'`` (with the batch);
* ``settings``: the config keys it reads (named in its errors and in the run's start-up line);
* ``build(settings, context)``: the transformation that goes before the base optimizer (None for
  a base optimizer alone); ``context`` holds what only the run knows (training-set size, the
  captured layers, whether the batch is split into m-sharpness groups).
"""

import dataclasses
from typing import Callable, NamedTuple, Sequence

import optax

from nonuniform_jax import checks
from nonuniform_jax.optim import base, kfac
from nonuniform_jax.optim.cov import cov
from nonuniform_jax.optim.csam import csam
from nonuniform_jax.optim.gam import gam
from nonuniform_jax.optim.sam import sam
from nonuniform_jax.optim.sam_gcm import sam_gcm

NEEDS = ("kfac_factors", "per_example_grads", "per_example_loss_fn")


class Context(NamedTuple):
  """What the run knows and the settings do not: COV's n, the captured layers of the model
  (``kfac.layer_names``) and whether the batch is split into m-sharpness groups."""
  num_train: int = 2
  kfac_layers: Sequence[str] = ("probe",)
  grouped: bool = False


@dataclasses.dataclass(frozen=True)
class Entry:
  names: tuple[str, ...]
  passes: int
  settings: tuple[str, ...]
  build: Callable[[dict, Context], optax.GradientTransformation] | None = None
  needs: Callable[[dict], tuple[str, ...]] = lambda settings: ()
  grouped: bool = False        # supports m-sharpness groups (sam.m > 0)

  @property
  def name(self) -> str:
    return self.names[0]

  @property
  def is_family(self) -> bool:
    """Whether it perturbs before a base optimizer (the SAM family)."""
    return self.build is not None


def kfac_schedule(settings: dict) -> kfac.Schedule:
  """The K-FAC ``Schedule`` of the settings' ``kfac`` group: the optimizer is built with it and
  the trainer's loop reads it (``plan.Optimizer.kfac_schedule``) to know which steps capture."""
  k = settings["kfac"]
  return kfac.Schedule(k["stats_every"], k["inverse_every"], k["ema_decay"])


def check_kfac(settings: dict) -> None:
  """The settings' ``kfac`` group checked whatever the optimizer (it is refused even where it
  is not read), in a one-line ValueError that names the key: ``kfac.stats_every must be an
  integer >= 1, got 0``."""
  if "kfac" not in settings:
    return
  k = settings["kfac"]
  try:
    kfac.validate_settings(damping=k["damping"], unfactored=k["unfactored"], layers=("probe",),
                           init=k["init"], inverse=k["inverse"],
                           schedule=kfac_schedule(settings))
  except ValueError as e:
    raise ValueError(f"kfac.{e}") from None


def _kfac(s: dict, context: Context) -> dict:
  k = s["kfac"]
  return dict(damping=k["damping"], schedule=kfac_schedule(s), unfactored=k["unfactored"],
              kfac_layers=context.kfac_layers, factor_init=k["init"], inverse=k["inverse"])


def _csam(s: dict, context: Context):
  c = s["csam"]
  kwargs = _kfac(s, context) if c["metric"] == "kfac" else {}
  return csam(c["rho1"], c["rho2"], c["alpha"], metric=c["metric"], eta=s["sam"]["eta"],
                   momentum_sign=c["momentum_sign"], **kwargs)


ENTRIES = (
    Entry(("sgd",), 1, ("optimizer.momentum", "optimizer.nesterov")),
    Entry(("adam",), 1, ("optimizer.b1", "optimizer.b2", "optimizer.eps")),
    Entry(("adamw",), 1, ("optimizer.b1", "optimizer.b2", "optimizer.eps")),
    Entry(("sam",), 2, ("sam.rho",), grouped=True,
          build=lambda s, c: sam(s["sam"]["rho"], eta=s["sam"]["eta"], grouped=c.grouped)),
    Entry(("asam",), 2, ("sam.rho", "sam.eta"), grouped=True,
          build=lambda s, c: sam(s["sam"]["rho"], adaptive=True, eta=s["sam"]["eta"],
                                     grouped=c.grouped)),
    Entry(("csam", "nonuniform_sam"), 3, ("csam.rho1", "csam.rho2", "csam.alpha", "csam.metric",
                                          "csam.momentum_sign", "sam.eta", "kfac.*"),
          build=_csam,
          needs=lambda s: ("kfac_factors",) if s["csam"]["metric"] == "kfac" else ()),
    Entry(("gam",), 2, ("sam.rho", "kfac.*"),
          build=lambda s, c: gam(s["sam"]["rho"], **_kfac(s, c)),
          needs=lambda s: ("kfac_factors",)),
    Entry(("sam_gcm",), 2, ("sam_gcm.rho", "sam_gcm.xi", "sam_gcm.max_params"),
          build=lambda s, c: sam_gcm(s["sam_gcm"]["rho"], s["sam_gcm"]["xi"],
                                             max_params=s["sam_gcm"]["max_params"]),
          needs=lambda s: ("per_example_grads",)),
    Entry(("cov",), 1, ("cov.lam",),
          build=lambda s, c: cov(s["cov"]["lam"], c.num_train),
          needs=lambda s: ("per_example_loss_fn",)),
)
BY_NAME = {name: entry for entry in ENTRIES for name in entry.names}
# The config groups an optimizer's settings come from.
SETTING_GROUPS = ("optimizer", "schedule") + tuple(sorted(
    {key.split(".")[0] for e in ENTRIES for key in e.settings} - {"optimizer"}))
NAMES = tuple(BY_NAME)
BASES = tuple(e.name for e in ENTRIES if not e.is_family)


def get(name: str) -> Entry:
  checks.choice("optimizer", name, NAMES)
  return BY_NAME[name]


def check(name: str, settings: dict) -> Entry:
  """The entry of optimizer ``name`` after its own checks on ``settings`` (radii, α, damping,
  refresh periods...: built once with a probe context, nothing traced); one-line ValueError
  naming the settings it reads."""
  entry = get(name)
  if entry.is_family:
    checks.choice("base optimizer", settings["optimizer"]["base"], BASES)
    try:
      entry.build(settings, Context())
    except ValueError as e:
      raise ValueError(f"optimizer {name!r}, settings {', '.join(entry.settings)}: "
                       f"{e}") from None
  return entry


def describe(name: str, settings: dict) -> str:
  """The optimizer in a few words with its key settings (the run's start-up line)."""
  entry = get(name)
  opt = settings["optimizer"]
  base_name = opt["base"] if entry.is_family else name
  parts = [f"lr {opt['learning_rate']:g} {settings['schedule']['name']}"]
  if base_name == "sgd" and opt["momentum"]:
    parts.append(f"momentum {opt['momentum']:g}" + (" nesterov" if opt["nesterov"] else ""))
  if opt["weight_decay"]:
    parts.append(f"weight decay {opt['weight_decay']:g}")
  base_text = f"{base_name} ({', '.join(parts)})"
  if not entry.is_family:
    return base_text
  shown = []
  for key in entry.settings:
    group, _, leaf = key.partition(".")
    if leaf != "*" and group != "optimizer":
      shown.append(f"{leaf}={settings[group][leaf]}")
  if "kfac_factors" in entry.needs(settings):   # the K-FAC group, named with its keys
    shown.append("kfac." + " kfac.".join(f"{k}={v}" for k, v in settings["kfac"].items()))
  return f"{name} ({' '.join(shown)}) over {base_text}"


def make(name: str, settings: dict, schedule: optax.Schedule, context: Context,
         weight_decay_in_loss: bool) -> optax.GradientTransformation:
  """The whole transformation: the family member's (if any), then its base optimizer with the
  learning-rate ``schedule``. With ``weight_decay_in_loss`` the base optimizer applies none
  (the loss carries it)."""
  entry = get(name)
  opt = settings["optimizer"]
  base_tx = base.base_optimizer(
      opt["base"] if entry.is_family else name, schedule, momentum=opt["momentum"],
      nesterov=opt["nesterov"], b1=opt["b1"], b2=opt["b2"], eps=opt["eps"],
      weight_decay=0.0 if weight_decay_in_loss else opt["weight_decay"],
      weight_decay_mode=opt["weight_decay_mode"], grad_clip_norm=opt["grad_clip_norm"])
  if not entry.is_family:
    return base_tx
  return optax.chain(entry.build(settings, context), base_tx)
