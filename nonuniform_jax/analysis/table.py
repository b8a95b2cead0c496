"""A sweep's members as a table: hyperparameters, measures and targets, with the exclusions.

A sweep directory holds ``sweep.json`` (its name, base config, training criterion and members,
each with its workdir and the value of every varied hyperparameter) and one run workdir per
member (``nonuniform_jax.workdir``'s files). :func:`load_table` reads them into a
:class:`Table`; the statistics of ``analysis.correlation`` are functions of it.
"""

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

SWEEP_FILE = "sweep.json"
DEFAULT_CRITERION = {"train_accuracy": 0.99}
# What a member's final metrics are compared with: the training-subset evaluation (every
# example once, no augmentation), else the running training accuracy when a run lacks it.
TRAIN_ACCURACY_KEYS = ("eval_train_accuracy", "train_accuracy")
TARGETS = ("generalization_gap", "accuracy_gap", "test_error")
# Hyperparameters that draw replicates rather than choose a setting: members that differ only
# in them train the same setting (Ψ holds them fixed inside its groups and gives them no ψ of
# their own; the sign-error averages over their pairs).
REPLICATE_KEYS = ("seed", "data_seed")


def hashable(value: Any) -> Any:
  """A value usable as a dict key (lists and dicts from JSON become their JSON text)."""
  return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


@dataclasses.dataclass(frozen=True)
class Table:
  """Members that count, one row each, and those excluded with the reason.

  rows: one dict per included member (in ``sweep.json``'s order) with the columns
    ``name``, ``workdir``, ``status``, ``train_accuracy``; every varied hyperparameter under
    its dotted key (``optimizer.learning_rate``); every measure as ``NAME/KEY``
    (``lambda_max/lambda_max``, ``gradient_noise/trace_sigma``: the scalars the trainer logs);
    the targets ``generalization_gap`` (test loss − training loss), ``accuracy_gap`` (training
    − test accuracy) and ``test_error`` (1 − test accuracy); and ``test_accuracy``,
    ``test_loss``, ``train_loss``.
  configs: each row's whole config, flattened to dotted keys (for settings that were not
    varied, such as the learning rate of a sweep over batch sizes).
  hyperparameters: the varied keys, sorted.
  measures: the ``NAME/KEY`` columns, sorted.
  excluded: ``{'name', 'workdir', 'reason'}`` for each member left out: unfinished (no
    summary), diverged, another status, no final metrics, or short of the criterion.
  criterion: the training criterion applied, e.g. ``{'train_accuracy': 0.99}``.
  """
  rows: tuple[dict, ...]
  configs: tuple[dict, ...] = ()
  hyperparameters: tuple[str, ...] = ()
  measures: tuple[str, ...] = ()
  excluded: tuple[dict, ...] = ()
  criterion: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_CRITERION))
  name: str = ""

  def __len__(self) -> int:
    return len(self.rows)

  def values(self, key: str) -> list:
    """The raw values of a column (or of a config key no row holds), None where missing."""
    if any(key in row for row in self.rows) or not self.configs:
      return [row.get(key) for row in self.rows]
    return [config.get(key) for config in self.configs]

  def column(self, key: str) -> np.ndarray:
    """A numeric column as float64 [len(self)]; NaN where missing or not a number."""
    out = np.full(len(self.rows), np.nan)
    for i, value in enumerate(self.values(key)):
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        out[i] = value
    return out

  def select(self, keep: Callable[[dict], bool] | Sequence[bool]) -> "Table":
    """The sub-table of the rows for which ``keep(row)`` is true (or a boolean mask); the
    exclusions are kept."""
    mask = [keep(row) for row in self.rows] if callable(keep) else [bool(k) for k in keep]
    configs = tuple(c for c, k in zip(self.configs, mask) if k) if self.configs else ()
    return dataclasses.replace(self, rows=tuple(r for r, k in zip(self.rows, mask) if k),
                               configs=configs)


def _member_row(member: dict, sweep_dir: str, threshold: float) -> tuple[dict | None, dict,
                                                                          str | None]:
  """(row, flat config, None) for a member that counts, else (None, {}, why it does not)."""
  from nonuniform_jax import evaluators, workdir as wd  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(sweep_dir, member["workdir"])
  path = os.path.join(workdir, wd.SUMMARY_FILE)
  if not os.path.exists(path):
    return None, {}, f"unfinished: no {wd.SUMMARY_FILE}"
  summary = wd.read_json(path)
  status = summary.get("status")
  if status == "diverged":
    return None, {}, f"diverged at step {summary.get('diverged_step')}"
  if status != "completed":
    return None, {}, f"status {status!r}"
  final = summary.get("final") or {}
  needed = ("test_accuracy", "test_loss", "eval_train_loss")
  missing = [k for k in needed if not _finite(final.get(k))]
  if missing:
    return None, {}, f"no final {', '.join(missing)}"
  accuracy_key = next((k for k in TRAIN_ACCURACY_KEYS if _finite(final.get(k))), None)
  if accuracy_key is None:
    return None, {}, "no final training accuracy"
  train_accuracy = final[accuracy_key]
  if train_accuracy < threshold:
    return None, {}, (f"missed the training criterion: {accuracy_key} {train_accuracy:.4g} "
                      f"< {threshold:g}")
  gap = final.get("generalization_gap", final["test_loss"] - final["eval_train_loss"])
  accuracy_gap = final.get("accuracy_gap", train_accuracy - final["test_accuracy"])
  row = {"name": member["name"], "workdir": workdir, "status": status,
         "train_accuracy": train_accuracy, **member.get("hyperparameters", {}),
         **{k.removeprefix("measure/"): v
            for k, v in evaluators.scalars(summary.get("measures") or {}).items()},
         "generalization_gap": gap, "accuracy_gap": accuracy_gap,
         "test_error": 1.0 - final["test_accuracy"], "test_accuracy": final["test_accuracy"],
         "test_loss": final["test_loss"], "train_loss": final["eval_train_loss"]}
  return row, wd.flatten(summary.get("config") or {}), None


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_table(sweep_dir: str, criterion: dict | None = None) -> Table:
  """Reads ``sweep_dir/sweep.json`` and every member's ``summary.json`` into a :class:`Table`.

  A member counts when its summary says ``completed``, its final metrics hold the test and
  training losses and accuracies, and its training accuracy (``eval_train_accuracy``: the
  fixed training subset without augmentation; the running ``train_accuracy`` only for a run
  without it) is at least the criterion's: ``criterion`` if given, else the sweep's, else
  0.99. The others are listed in ``excluded`` with the reason. Measures are the scalars of
  ``summary['measures']`` that the trainer logs (``evaluators.scalars``: values, not the
  settings recorded beside them). Raises ValueError for a missing or malformed sweep.json.
  """
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{sweep_dir!r} holds no {SWEEP_FILE}: not a sweep directory")
  try:
    sweep = json.loads(open(path).read())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  members = sweep.get("members")
  if not isinstance(members, list) or any(
      not isinstance(m, dict) or "name" not in m or "workdir" not in m for m in members):
    raise ValueError(f"{path}: 'members' must be a list of objects with 'name' and 'workdir'")
  criterion = dict(criterion or sweep.get("criterion") or DEFAULT_CRITERION)
  unknown = sorted(set(criterion) - set(DEFAULT_CRITERION))
  if unknown:
    raise ValueError(f"{path}: unknown training criterion {unknown}; the criterion is "
                     f"{sorted(DEFAULT_CRITERION)}")
  threshold = float(criterion["train_accuracy"])
  rows, configs, excluded = [], [], []
  for member in members:
    row, config, reason = _member_row(member, sweep_dir, threshold)
    if reason:
      excluded.append({"name": member["name"],
                       "workdir": os.path.join(sweep_dir, member["workdir"]), "reason": reason})
    else:
      rows.append(row)
      configs.append(config)
  varied = sorted({k for m in members for k in m.get("hyperparameters", {})})
  measures = sorted({k for row in rows for k in row if "/" in k and k not in varied})
  return Table(rows=tuple(rows), configs=tuple(configs), hyperparameters=tuple(varied),
               measures=tuple(measures), excluded=tuple(excluded), criterion=criterion,
               name=str(sweep.get("name", "")))
