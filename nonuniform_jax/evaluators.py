"""Measures as evaluators: the library's sharpness and nonuniformity measures run on a trained
model, on a fixed training subset, with a stated BatchNorm mode.

Used by the trainer (each measure on its own schedule and at the end of a run) and by the
``measure`` command (on a finished run's checkpoint). Knows an ``Objective`` and batches, not
configs: the caller passes names and settings. Each evaluator is declared below with what it
takes from the Objective; nothing is discovered by reflection at run time.
"""

import dataclasses
import inspect
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.tree_util import Partial

from nonuniform_jax import checks, measures
from nonuniform_jax.objective import Objective

# What an evaluator can be handed besides ``params`` and ``batches``: the Objective's measure
# functions (``Objective.measure_functions``), a key, the number of classes.
INPUTS = ("loss_fn", "capture_loss_fn", "per_example_loss_fn", "metric_fn", "perturbations_fn",
          "key", "num_classes")


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A measure ``fn(first, params, batches, **keywords, **settings)``.

  first: the Objective function it takes first ('loss_fn', or 'capture_loss_fn' for those built
    on one capture pass); keywords: what else it takes, from ``INPUTS``; required: settings
    without defaults, which the config must give; per_example: built on per-example gradients
    or Hessians (meaningless with BatchNorm in 'batch' mode: one example's own statistics).
  """
  fn: Callable
  first: str = "loss_fn"
  keywords: tuple[str, ...] = ()
  required: tuple[str, ...] = ()
  per_example: bool = False

  @property
  def settings(self) -> list[str]:
    """The settings it accepts (its other parameters)."""
    taken = {self.first, "params", "batches", *self.keywords}
    return [p for p in inspect.signature(self.fn).parameters if p not in taken]


_CAPTURE = ("perturbations_fn", "key")
EVALUATORS = {
    "lambda_max": Evaluator(measures.lambda_max, keywords=("key",)),
    "top_eigenvalues": Evaluator(measures.top_eigenvalues, keywords=("key",), required=("k",)),
    "hessian_trace": Evaluator(measures.hessian_trace, keywords=("key",)),
    "hessian_esd": Evaluator(measures.hessian_esd, keywords=("key",)),
    "sam_sharpness": Evaluator(measures.sam_sharpness, required=("rho",)),
    "worst_case_sharpness": Evaluator(measures.worst_case_sharpness, keywords=("key",),
                                      required=("rho",)),
    "average_sharpness": Evaluator(measures.average_sharpness, keywords=("key",),
                                   required=("rho",)),
    "pacbayes_flatness": Evaluator(measures.pacbayes_flatness, keywords=("metric_fn", "key")),
    "gradient_noise": Evaluator(measures.gradient_noise, keywords=(
        "per_example_loss_fn", "capture_loss_fn", "perturbations_fn", "key"), per_example=True),
    "batch_gradient_noise": Evaluator(measures.batch_gradient_noise, keywords=(
        "key", "per_example_loss_fn"), required=("batch_size",), per_example=True),
    "wu_nonuniformity": Evaluator(measures.wu_nonuniformity, keywords=(
        "key", "per_example_loss_fn"), per_example=True),
    "kfac_structure": Evaluator(measures.kfac_structure, first="capture_loss_fn",
                                keywords=_CAPTURE, per_example=True),
    "diagnostics": Evaluator(measures.nonuniformity_diagnostics, first="capture_loss_fn",
                             keywords=_CAPTURE + ("num_classes",)),
}
MEASURES = {name: e.fn for name, e in EVALUATORS.items()}
# What ``measure_nonuniformity=True`` adds: the paper's central quantities.
NONUNIFORMITY = ("gradient_noise", "batch_gradient_noise", "wu_nonuniformity", "kfac_structure",
                 "diagnostics")
BN_MODES = ("running", "batch")
PER_EXAMPLE = tuple(name for name, e in EVALUATORS.items() if e.per_example)


def check(names: Sequence[str], settings: dict, bn_mode: str) -> None:
  """Validates measure names, their settings and the BatchNorm mode (no computation)."""
  for name in names:
    if name not in EVALUATORS:
      raise ValueError(f"unknown measure {name!r}; choose one of {sorted(EVALUATORS)}")
    evaluator, given = EVALUATORS[name], settings.get(name, {})
    for key in given:
      if key not in evaluator.settings:
        raise ValueError(f"measure {name!r} has no setting {key!r}; its settings are "
                         f"{evaluator.settings + ['every_steps']}")
    for key in evaluator.required:
      if key not in given:
        raise ValueError(f"measure {name!r} needs the setting {key!r} "
                         f"(e.g. --config.measures.settings.{name}.{key}=...)")
  checks.choice("measures.bn_mode", bn_mode, BN_MODES)


def subset_batches(source, num_examples: int, batch_size: int) -> list:
  """The first ``num_examples`` examples of an evaluation source (the whole split's, whichever
  process calls this: see the sources' ``first_examples``), as unpadded numpy batches of
  ``batch_size`` (the last may be smaller)."""
  examples = source.first_examples(num_examples)
  return [{k: v[i:i + batch_size] for k, v in examples.items()}
          for i in range(0, len(examples["labels"]), batch_size)]


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


def run(names: Sequence[str], settings: dict, objective: Objective, params, batch_stats,
        batches: list, *, bn_mode: str = "running", seed: int = 0,
        num_classes: int | None = None) -> dict:
  """Computes each measure in ``names`` at ``params``; returns {name: JSON-able result} with
  the settings used (the measure's own, plus subset size, BatchNorm mode, seed, seconds).
  ``objective`` is an ``Objective`` (or a Flax model, wrapped in one).

  A measure that draws takes the key ``fold_in(key(seed), crc32(name))``: its draws depend on
  its name and the seed, not on which other measures run or in what order."""
  if not isinstance(objective, Objective):
    objective = Objective(objective)
  available = objective.measure_functions(batch_stats, bn_mode)
  # The measures call perturbations_fn(batch); its parameters are traced arguments too. One
  # flat Partial: a Partial of a Partial compares by identity, so the measures would recompile
  # at every call.
  perturbations = available["perturbations_fn"]
  available["perturbations_fn"] = Partial(perturbations.func, *perturbations.args, params)
  available["num_classes"] = num_classes
  results = {}
  for name in names:
    evaluator = EVALUATORS[name]
    kwargs = {k: available[k] for k in evaluator.keywords if k != "key"
              and available.get(k) is not None}
    if "key" in evaluator.keywords:
      kwargs["key"] = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    kwargs.update(settings.get(name, {}))
    start = time.time()
    result = _jsonable(evaluator.fn(available[evaluator.first], params, batches, **kwargs))
    result.update({"num_examples": sum(len(b["labels"]) for b in batches),
                   "subset_batch_size": max(len(b["labels"]) for b in batches),
                   "bn_mode": bn_mode, "seed": seed, "seconds": time.time() - start})
    results[name] = result
  return results
