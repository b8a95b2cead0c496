"""Measures as evaluators: the library's sharpness and nonuniformity measures run on a trained
model, on a fixed training subset, with a stated BatchNorm mode.

Used by the trainer (on a schedule and at the end of a run) and by the ``measure`` command (on
a finished run's checkpoint). Knows models and batches, not configs: the caller passes names
and settings.
"""

import inspect
import time
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from nonuniform_jax import measures
from nonuniform_jax.models import layers

# name -> measure function (nonuniform_jax.measures). Each takes (loss_fn, params, batches, ...),
# or capture_loss_fn first for those built on one capture pass (kfac_structure, diagnostics);
# the evaluator passes the keyword arguments it accepts among: key, per_example_loss_fn,
# metric_fn, capture_loss_fn, perturbations_fn, num_classes.
MEASURES = {
    "lambda_max": measures.lambda_max,
    "top_eigenvalues": measures.top_eigenvalues,
    "hessian_trace": measures.hessian_trace,
    "hessian_esd": measures.hessian_esd,
    "sam_sharpness": measures.sam_sharpness,
    "worst_case_sharpness": measures.worst_case_sharpness,
    "average_sharpness": measures.average_sharpness,
    "pacbayes_flatness": measures.pacbayes_flatness,
    "gradient_noise": measures.gradient_noise,
    "batch_gradient_noise": measures.batch_gradient_noise,
    "wu_nonuniformity": measures.wu_nonuniformity,
    "kfac_structure": measures.kfac_structure,
    "diagnostics": measures.nonuniformity_diagnostics,
}
# What ``measure_nonuniformity=True`` adds: the paper's central quantities.
NONUNIFORMITY = ("gradient_noise", "batch_gradient_noise", "wu_nonuniformity", "kfac_structure",
                 "diagnostics")
BN_MODES = ("running", "batch")
# Measures built on per-example gradients or Hessians: meaningless with BatchNorm in 'batch'
# mode (one example's own statistics), so a run refuses that combination.
PER_EXAMPLE = ("gradient_noise", "batch_gradient_noise", "wu_nonuniformity", "kfac_structure")
# Arguments without defaults that the settings must supply.
_REQUIRED = {"top_eigenvalues": ("k",), "sam_sharpness": ("rho",),
             "worst_case_sharpness": ("rho",), "average_sharpness": ("rho",),
             "batch_gradient_noise": ("batch_size",)}


def check(names: Sequence[str], settings: dict, bn_mode: str) -> None:
  """Validates measure names, their settings and the BatchNorm mode (no computation)."""
  for name in names:
    if name not in MEASURES:
      raise ValueError(f"unknown measure {name!r}; choose one of {sorted(MEASURES)}")
    params = inspect.signature(MEASURES[name]).parameters
    given = settings.get(name, {})
    for key in given:
      fixed = ("loss_fn", "capture_loss_fn", "params", "batches", "key", "per_example_loss_fn",
               "metric_fn", "perturbations_fn")
      if key not in params or key in fixed:
        allowed = [p for p in params if p not in fixed]
        raise ValueError(f"measure {name!r} has no setting {key!r}; its settings are {allowed}")
    for key in _REQUIRED.get(name, ()):
      if key not in given:
        raise ValueError(f"measure {name!r} needs the setting {key!r} "
                         f"(e.g. --config.measures.settings.{name}.{key}=...)")
  if bn_mode not in BN_MODES:
    raise ValueError(f"unknown measures.bn_mode {bn_mode!r}; choose one of {list(BN_MODES)}")


def subset_batches(source, num_examples: int, batch_size: int) -> list:
  """The first ``num_examples`` examples of an evaluation source, as unpadded numpy batches
  (the last may be smaller)."""
  out, taken = [], 0
  for batch in source.eval_batches(batch_size):
    real = int(np.sum(batch["mask"]))
    keep = min(real, num_examples - taken)
    if keep <= 0:
      break
    out.append({"inputs": np.asarray(batch["inputs"][:keep]),
                "labels": np.asarray(batch["labels"][:keep])})
    taken += keep
  return out


# (id(model), train) -> (model, the plain functions of ``_plain_functions``). Kept for the
# process: a run's model is one object, so every evaluation reuses the same functions.
_FUNCTIONS: dict = {}


def _plain_functions(model, train: bool) -> dict:
  """The loss functions of ``model`` with the BatchNorm statistics as their first argument.

  Built once per (model, mode): the measures jit on the function's identity and trace its
  arguments, so evaluations at later steps (new parameters, new statistics) reuse their
  compilations instead of tracing and compiling every measure again.
  """
  key = (id(model), train)
  if key in _FUNCTIONS and _FUNCTIONS[key][0] is model:
    return _FUNCTIONS[key][1]

  def variables(batch_stats, params, **extra):
    v = {"params": params, **extra}
    if batch_stats:
      v["batch_stats"] = batch_stats
    return v

  def logits_of(batch_stats, params, x):
    if train and batch_stats:
      return model.apply(variables(batch_stats, params), x, train=True,
                         mutable=["batch_stats"])[0]
    return model.apply(variables(batch_stats, params), x, train=False)

  def per_example_loss_fn(batch_stats, params, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_of(batch_stats, params, batch["inputs"]).astype(jnp.float32), batch["labels"])

  def loss_fn(batch_stats, params, batch):
    return jnp.mean(per_example_loss_fn(batch_stats, params, batch))

  def metric_fn(batch_stats, params, batch):
    return jnp.mean(jnp.argmax(logits_of(batch_stats, params, batch["inputs"]), -1)
                    == batch["labels"])

  def capture_loss_fn(batch_stats, params, perturbations, batch):
    bn_train = train and bool(batch_stats)
    logits, state = model.apply(variables(batch_stats, params, perturbations=perturbations),
                                batch["inputs"], train=bn_train,
                                mutable=["kfac"] + (["batch_stats"] if bn_train else []))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             batch["labels"])
    return losses, state["kfac"]

  def perturbations_fn(batch_stats, params, batch):   # shapes only: jax.eval_shape inside
    return layers.zero_perturbations(model, variables(batch_stats, params), batch["inputs"],
                                     train=train and bool(batch_stats))

  fns = {"loss_fn": loss_fn, "per_example_loss_fn": per_example_loss_fn,
         "metric_fn": metric_fn, "capture_loss_fn": capture_loss_fn,
         "perturbations_fn": perturbations_fn}
  _FUNCTIONS[key] = (model, fns)
  return fns


def loss_functions(model, batch_stats, bn_mode: str) -> dict:
  """Loss, per-example loss, accuracy and capture functions of ``params`` for the measures.

  ``bn_mode='running'`` normalises with the running averages (evaluation mode);
  ``'batch'`` with each batch's own statistics (training mode, running averages untouched).
  Dropout is off in both. Each is a ``jax.tree_util.Partial`` over ``batch_stats``: new
  statistics are traced arguments, so the measures do not recompile when they change.
  ``perturbations_fn`` takes ``(params, batch)``.
  """
  fns = _plain_functions(model, bn_mode == "batch")
  return {name: Partial(fn, batch_stats) for name, fn in fns.items()}


def _jsonable(value) -> Any:
  """Scalars and small arrays as Python numbers/lists; parameter-shaped pytrees dropped."""
  if isinstance(value, dict):
    return {k: v for k, v in ((k, _jsonable(v)) for k, v in value.items()) if v is not None}
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  array = np.asarray(value) if hasattr(value, "shape") or isinstance(value, (list, tuple)) \
      else None
  if array is None or array.dtype == object:
    return None
  if array.ndim == 0:
    return array.item()
  return array.tolist() if array.size <= 4096 else None


# Result fields that restate settings or bookkeeping (kept in measures.jsonl and the summary,
# not repeated as scalars).
_SETTING_KEYS = {"num_iters", "tol", "seed", "num_examples", "num_batches", "seconds", "rho", "eta",
                 "num_steps", "step_size", "num_draws", "num_probes", "target", "magnitude_eps",
                 "sigma_max", "search_depth", "tolerance", "num_samples", "chunk_size", "k",
                 "batch_size", "iterations", "num_hvps", "gsnr_num_params", "subset_batch_size",
                 "capture_bytes"}


def scalars(results: dict) -> dict:
  """The measured values as ``measure/<name>/<key>`` scalars for TensorBoard and metrics.jsonl."""
  out = {}
  for name, result in results.items():
    for key, value in result.items():
      if (isinstance(value, (int, float)) and not isinstance(value, bool)
          and key not in _SETTING_KEYS):
        out[f"measure/{name}/{key}"] = float(value)
  return out


def run(names: Sequence[str], settings: dict, model, params, batch_stats, batches: list, *,
        bn_mode: str = "running", seed: int = 0, num_classes: int | None = None) -> dict:
  """Computes each measure in ``names`` at ``params``; returns {name: JSON-able result} with
  the settings used (the measure's own, plus subset size, BatchNorm mode, seed, seconds).

  A measure that draws takes the key ``fold_in(key(seed), crc32(name))``: its draws depend on
  its name and the seed, not on which other measures run or in what order."""
  fns = loss_functions(model, batch_stats, bn_mode)
  # The measures call perturbations_fn(batch); its parameters are traced arguments too.
  perturbations_fn = Partial(_plain_functions(model, bn_mode == "batch")["perturbations_fn"],
                             batch_stats, params)
  available = {**fns, "perturbations_fn": perturbations_fn, "num_classes": num_classes}
  results = {}
  for name in names:
    fn = MEASURES[name]
    accepted = inspect.signature(fn).parameters
    first = next(iter(accepted))   # loss_fn, or capture_loss_fn for the K-FAC measures
    kwargs = {k: v for k, v in available.items()
              if k in accepted and k != first and v is not None}
    if "key" in accepted:
      kwargs["key"] = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    kwargs.update(settings.get(name, {}))
    start = time.time()
    result = fn(fns[first], params, batches, **kwargs)
    result = _jsonable(result)
    result.update({"num_examples": sum(len(b["labels"]) for b in batches),
                   "subset_batch_size": max(len(b["labels"]) for b in batches),
                   "bn_mode": bn_mode,
                   "seed": seed, "seconds": time.time() - start})
    results[name] = result
  return results
