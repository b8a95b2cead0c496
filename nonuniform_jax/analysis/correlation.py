"""Correlation of measures with generalization over a population of trained models.

The definitions are those of docs/measures.md (section "Correlation statistics"); where they
leave a choice, the docstring says which was made. Kendall τ here is τ-b, computed from the
matrices of pairwise signs: with S_x[i, j] = sign(x_i − x_j) and w the multiplicity of each
model (ones, or a bootstrap resample's counts),

    τ_b = wᵀ(S_x ∘ S_y)w / sqrt(wᵀ|S_x|w · wᵀ|S_y|w),

which is (C − D)/sqrt((P − T_x)(P − T_y)) over the (resampled) models: a pair of copies of one
model is tied in both and counts in neither. Memory grows as N²: 8 MB at 1000 models.

Every statistic drops the models whose values it needs are not finite (NaN: a measure not
computed for that member). Bootstrap draws come from ``numpy.random.default_rng(seed)``; with
the same seed and the same models, every measure sees the same resamples, so their intervals
are paired.
"""

import collections
import itertools
import math
from typing import Sequence

import numpy as np

from nonuniform_jax.analysis.table import REPLICATE_KEYS, TARGETS, Table, hashable

DEFAULT_SHARPNESS = "lambda_max/lambda_max"
DEFAULT_NONUNIFORMITY = "gradient_noise/trace_sigma"
WU_SHARPNESS = "lambda_max/lambda_max"
WU_NONUNIFORMITY = "wu_nonuniformity/nonuniformity"
HEADLINE_TARGETS = ("generalization_gap", "test_error")


def _finite_rows(*columns) -> tuple[np.ndarray, ...]:
  arrays = [np.asarray(c, np.float64) for c in columns]
  keep = np.all([np.isfinite(a) for a in arrays], axis=0)
  return tuple(a[keep] for a in arrays)


def _sign_matrix(x: np.ndarray) -> np.ndarray:
  return np.sign(x[:, None] - x[None, :])


def _weighted_tau(sx: np.ndarray, sy: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """τ-b for each row of ``weights`` [B, N] (model multiplicities); NaN where undefined.
  Without ties in x, wᵀ|S_x|w = (Σw)² − Σw², which spares its matrix product."""
  n = sx.shape[0]
  tied_x, tied_y = (np.count_nonzero(s) < n * (n - 1) for s in (sx, sy))
  matrices = np.concatenate(
      [sx * sy] + [np.abs(s) for s, tied in ((sx, tied_x), (sy, tied_y)) if tied], axis=1)
  out = np.empty(weights.shape[0])
  chunk = max(1, (1 << 22) // matrices.shape[1])
  for start in range(0, weights.shape[0], chunk):
    w = weights[start:start + chunk]
    products = iter(np.einsum("bkn,bn->kb", (w @ matrices).reshape(len(w), -1, n), w))
    untied = w.sum(axis=1) ** 2 - (w ** 2).sum(axis=1)
    num = next(products)
    dx = next(products) if tied_x else untied
    dy = next(products) if tied_y else untied
    with np.errstate(invalid="ignore", divide="ignore"):
      out[start:start + chunk] = np.where(dx * dy > 0, num / np.sqrt(dx * dy), np.nan)
  return out


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's τ-b between ``x`` and ``y`` over the models where both are finite; NaN when
  fewer than two remain or when either is constant (as ``scipy.stats.kendalltau``)."""
  x, y = _finite_rows(x, y)
  if len(x) < 2:
    return math.nan
  return float(_weighted_tau(_sign_matrix(x), _sign_matrix(y), np.ones((1, len(x))))[0])


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
  samples = samples[np.isfinite(samples)]
  if not len(samples):
    return math.nan, math.nan
  tail = 50.0 * (1.0 - level)
  low, high = np.percentile(samples, [tail, 100.0 - tail])
  return float(low), float(high)


def bootstrap_tau(x: Sequence[float], y: Sequence[float], num_resamples: int = 1000,
                  seed: int = 0, level: float = 0.95) -> dict:
  """τ-b with its percentile bootstrap interval: the models (where both values are finite)
  resampled with replacement ``num_resamples`` times, τ-b recomputed on each (resamples where
  it is undefined are left out), the interval from the (1 − level)/2 to (1 + level)/2
  percentiles. Returns ``tau``, ``low``, ``high``, ``num_models``; also ``abs_low`` and
  ``abs_high``, the same percentiles of |τ| over the resamples."""
  x, y = _finite_rows(x, y)
  n = len(x)
  out = {"tau": math.nan, "low": math.nan, "high": math.nan, "abs_low": math.nan,
         "abs_high": math.nan, "num_models": n}
  if n < 2:
    return out
  sx, sy = _sign_matrix(x), _sign_matrix(y)
  out["tau"] = float(_weighted_tau(sx, sy, np.ones((1, n)))[0])
  if num_resamples > 0:
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=num_resamples).astype(np.float64)
    samples = _weighted_tau(sx, sy, weights)
    out["low"], out["high"] = _interval(samples, level)
    out["abs_low"], out["abs_high"] = _interval(np.abs(samples), level)
  return out


def partial_kendall_tau(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
  """Kendall's partial τ of x and y given z, over the models where all three are finite:

      τ_xy·z = (τ_xy − τ_xz τ_yz) / sqrt((1 − τ_xz²)(1 − τ_yz²)),

  NaN when z orders x or y perfectly (|τ_xz| = 1 or |τ_yz| = 1) or a τ is undefined."""
  x, y, z = _finite_rows(x, y, z)
  txy, txz, tyz = kendall_tau(x, y), kendall_tau(x, z), kendall_tau(y, z)
  denominator = (1.0 - txz ** 2) * (1.0 - tyz ** 2)
  if not denominator > 0:
    return math.nan
  return float((txy - txz * tyz) / math.sqrt(denominator))


def _settings_key(row: dict, keys: Sequence[str]) -> tuple:
  return tuple(hashable(row.get(k)) for k in keys)


def hyperparameter_groups(table: Table, key: str) -> list[list[int]]:
  """The groups of ``key``: row indices of the models that share every other varied
  hyperparameter (replicate keys such as the seed included), groups of at least two only."""
  others = [k for k in table.hyperparameters if k != key]
  groups = collections.defaultdict(list)
  for i, row in enumerate(table.rows):
    groups[_settings_key(row, others)].append(i)
  return [g for g in groups.values() if len(g) >= 2]


def granulated_psi(table: Table, measure: str, target: str = "generalization_gap",
                   num_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
  """Jiang et al.'s (ICLR 2020) granulated Kendall Ψ of ``measure`` against ``target``.

  For each varied hyperparameter k (replicate keys, ``REPLICATE_KEYS``, excepted: they are held
  fixed inside the groups and get no ψ), the groups of :func:`hyperparameter_groups`; in each
  group τ-b over its models with finite values (a group with fewer than two such models is
  skipped); ψ_k is the mean over k's groups, Ψ the mean of ψ_k over the hyperparameters that
  have a group. Choice: a group whose τ-b is undefined (the measure, or the target, equal for
  all its models) counts as τ = 0 — the measure orders none of its pairs — rather than being
  dropped, which would credit a measure blind to k.

  Intervals: ψ_k's resamples k's groups with replacement (the docs' unit), Ψ's resamples every
  hyperparameter's groups independently and averages; a hyperparameter with a single group
  has no interval, and then neither has Ψ. Returns ``psi``, ``low``, ``high``, ``num_models``
  (models in at least one group) and ``per_hyperparameter`` {k: ``psi``, ``low``, ``high``,
  ``num_groups``, ``num_models``}."""
  values, gaps = table.column(measure), table.column(target)
  rng = np.random.default_rng(seed)
  per, draws, used = {}, [], set()
  for key in table.hyperparameters:
    if key in REPLICATE_KEYS:
      continue
    taus, members = [], 0
    for group in hyperparameter_groups(table, key):
      x, y = _finite_rows(values[group], gaps[group])
      if len(x) < 2:
        continue
      tau = kendall_tau(x, y)
      taus.append(0.0 if math.isnan(tau) else tau)
      members += len(x)
      used.update(i for i in group if np.isfinite(values[i]) and np.isfinite(gaps[i]))
    if not taus:
      continue
    taus = np.asarray(taus)
    entry = {"psi": float(taus.mean()), "low": math.nan, "high": math.nan,
             "num_groups": len(taus), "num_models": members}
    if num_resamples > 0 and len(taus) >= 2:
      draws.append(taus[rng.integers(0, len(taus), (num_resamples, len(taus)))].mean(axis=1))
      entry["low"], entry["high"] = _interval(draws[-1], level)
    per[key] = entry
  out = {"psi": float(np.mean([e["psi"] for e in per.values()])) if per else math.nan,
         "low": math.nan, "high": math.nan, "num_models": len(used), "per_hyperparameter": per}
  if per and len(draws) == len(per):   # every ψ_k resampled
    out["low"], out["high"] = _interval(np.mean(draws, axis=0), level)
  return out


def sign_error(table: Table, measure: str, target: str = "generalization_gap") -> dict:
  """The robust sign-error of Dziugaite et al. (NeurIPS 2020).

  A setting is the models sharing every varied hyperparameter but the replicate keys
  (``REPLICATE_KEYS``: seeds); an environment is a pair of settings that differ in exactly
  one hyperparameter k. Its error is the mean over the pairs (i, j), i from one setting and j
  from the other (every cross pair of seeds: independent runs), of

      e_ij = ½ (1 − sign(μ_i − μ_j) · sign(gap_i − gap_j)),

  with sign(0) = 0, so a tie in either gives ½ (the docs' choice). Pairs with a non-finite
  value are skipped, and environments left without a pair. Reported: ``mean`` over all
  environments (each weighing one), per hyperparameter its environments' ``mean`` and ``max``;
  the worst cases ``worst_hyperparameter`` (the largest per-hyperparameter mean, and its name
  in ``worst_hyperparameter_name``) and ``worst_environment`` (the largest error of any
  environment, its two settings in ``worst_environment_settings``: of several, the first in
  the hyperparameters' sorted order); ``num_environments``."""
  values, gaps = table.column(measure), table.column(target)
  keys = [k for k in table.hyperparameters if k not in REPLICATE_KEYS]
  settings = collections.defaultdict(list)
  for i, row in enumerate(table.rows):
    settings[_settings_key(row, keys)].append(i)
  per, every, worst = {}, [], (-1.0, None)
  for position, key in enumerate(keys):
    families = collections.defaultdict(list)
    for setting in settings:
      families[setting[:position] + setting[position + 1:]].append(setting)
    errors = []
    for family in families.values():
      for a, b in itertools.combinations(family, 2):
        ia, ib = np.asarray(settings[a]), np.asarray(settings[b])
        dm = np.sign(values[ia][:, None] - values[ib][None, :])
        dg = np.sign(gaps[ia][:, None] - gaps[ib][None, :])
        e = 0.5 * (1.0 - dm * dg)
        e = e[np.isfinite(e)]
        if not e.size:
          continue
        errors.append(float(e.mean()))
        if errors[-1] > worst[0]:
          worst = (errors[-1], (dict(zip(keys, a)), dict(zip(keys, b))))
    if errors:
      per[key] = {"mean": float(np.mean(errors)), "max": float(np.max(errors)),
                  "num_environments": len(errors)}
      every.extend(errors)
  worst_key = max(per, key=lambda k: per[k]["mean"]) if per else None
  return {"mean": float(np.mean(every)) if every else math.nan,
          "worst_hyperparameter": per[worst_key]["mean"] if per else math.nan,
          "worst_hyperparameter_name": worst_key,
          "worst_environment": worst[0] if every else math.nan,
          "worst_environment_settings": worst[1],
          "num_environments": len(every), "per_hyperparameter": per}


def within_sharpness_bins(table: Table, nonuniformity: str = DEFAULT_NONUNIFORMITY,
                          sharpness: str = DEFAULT_SHARPNESS,
                          target: str = "generalization_gap", num_bins: int = 5,
                          min_size: int = 5) -> dict:
  """τ of ``nonuniformity`` against ``target`` among models of similar ``sharpness``.

  The models with all three values finite are sorted by sharpness (ties kept in table order)
  and cut into B = min(num_bins, N // min_size) contiguous quantile bins whose sizes differ by
  at most one, each of at least ``min_size`` models (no bin when N < min_size). Returns
  ``bins`` (each ``low``, ``high`` sharpness, ``size``, ``tau`` and its ``members``' names),
  ``weighted_tau`` = Σ_b N_b τ_b / Σ_b N_b over the bins where τ_b is defined, and
  ``num_models``."""
  s, x, y = table.column(sharpness), table.column(nonuniformity), table.column(target)
  rows = np.flatnonzero(np.isfinite(s) & np.isfinite(x) & np.isfinite(y))
  count = min(num_bins, len(rows) // min_size)
  bins = []
  if count >= 1:
    for part in np.array_split(rows[np.argsort(s[rows], kind="stable")], count):
      bins.append({"low": float(s[part].min()), "high": float(s[part].max()),
                   "size": int(len(part)), "tau": kendall_tau(x[part], y[part]),
                   "members": [table.rows[i]["name"] for i in part]})
  defined = [b for b in bins if not math.isnan(b["tau"])]
  weighted = (sum(b["size"] * b["tau"] for b in defined) / sum(b["size"] for b in defined)
              if defined else math.nan)
  return {"sharpness": sharpness, "nonuniformity": nonuniformity, "target": target,
          "bins": bins, "weighted_tau": float(weighted), "num_models": int(len(rows))}


def wu_check(table: Table, sharpness: str = WU_SHARPNESS, nonuniformity: str = WU_NONUNIFORMITY,
             learning_rate: str = "optimizer.learning_rate",
             batch_size: str = "batch_size") -> dict:
  """Wu, Ma & E's (NeurIPS 2018) linear-stability check on the final models.

  For each model with a finite sharpness a, nonuniformity s, learning rate η and batch b
  (columns of the table, or of its configs when not varied): a·η/2 (linear stability needs
  ≤ 1, i.e. a ≤ 2/η) and s·η/√b (predicted ≲ 1). Per learning rate: the batch sizes, whether
  every model has a ≤ 2/η, the largest a·η/2, and τ(s, b) (at fixed η, √b/η orders as b).
  Over all: τ(s, √b/η) and the fraction of models with a ≤ 2/η. Other hyperparameters are not
  held fixed; pass ``table.select(...)`` to hold them."""
  a, s = table.column(sharpness), table.column(nonuniformity)
  eta, b = table.column(learning_rate), table.column(batch_size)
  names = [row["name"] for row in table.rows]
  members = []
  for i in range(len(table)):
    if all(np.isfinite(v[i]) for v in (a, s, eta, b)) and eta[i] > 0 and b[i] > 0:
      members.append({"name": names[i], "learning_rate": float(eta[i]),
                      "batch_size": int(b[i]), "sharpness": float(a[i]),
                      "nonuniformity": float(s[i]), "sharpness_ratio": float(a[i] * eta[i] / 2),
                      "nonuniformity_ratio": float(s[i] * eta[i] / math.sqrt(b[i])),
                      "stable": bool(a[i] <= 2.0 / eta[i])})
  by_rate = collections.defaultdict(list)
  for m in members:
    by_rate[m["learning_rate"]].append(m)
  rates = []
  for rate in sorted(by_rate):
    group = by_rate[rate]
    rates.append({"learning_rate": rate,
                  "batch_sizes": sorted({m["batch_size"] for m in group}),
                  "num_models": len(group), "all_stable": all(m["stable"] for m in group),
                  "max_sharpness_ratio": max(m["sharpness_ratio"] for m in group),
                  "tau_nonuniformity_batch": kendall_tau([m["nonuniformity"] for m in group],
                                                         [m["batch_size"] for m in group])})
  return {"sharpness": sharpness, "nonuniformity": nonuniformity, "members": members,
          "learning_rates": rates,
          "tau_nonuniformity_sqrt_b_over_eta": kendall_tau(
              [m["nonuniformity"] for m in members],
              [math.sqrt(m["batch_size"]) / m["learning_rate"] for m in members]),
          "fraction_stable": (sum(m["stable"] for m in members) / len(members)
                              if members else math.nan)}


def measure_kind(measure: str) -> str:
  """'nonuniformity' for a column of the trainer's nonuniformity set
  (``evaluators.NONUNIFORMITY``), else 'sharpness'."""
  from nonuniform_jax import evaluators  # pylint: disable=g-import-not-at-top
  return "nonuniformity" if measure.split("/")[0] in evaluators.NONUNIFORMITY else "sharpness"


def varying_measures(table: Table) -> list[str]:
  """The measure columns with at least two distinct finite values (the others rank nothing)."""
  out = []
  for measure in table.measures:
    column = table.column(measure)
    if len(np.unique(column[np.isfinite(column)])) >= 2:
      out.append(measure)
  return out


def summary(table: Table, measures: Sequence[str] | None = None,
            targets: Sequence[str] = HEADLINE_TARGETS, num_resamples: int = 1000,
            seed: int = 0, level: float = 0.95) -> dict:
  """The headline table: for each measure (default :func:`varying_measures`, sharpness
  first) and target, τ-b with its bootstrap interval (and |τ| with the interval of |τ|), Ψ
  with its interval, the sign-error's mean and worst hyperparameter, and the models used.
  Returns ``rows`` (one dict per measure and target), ``num_models`` and ``excluded``."""
  for target in targets:
    if target not in TARGETS:
      raise ValueError(f"unknown target {target!r}; choose from {list(TARGETS)}")
  chosen = list(measures) if measures is not None else varying_measures(table)
  missing = [m for m in chosen if m not in table.measures]
  if missing:
    raise ValueError(f"no measure {missing[0]!r} in the table; it has {list(table.measures)}")
  chosen.sort(key=lambda m: (measure_kind(m) != "sharpness", m))
  rows = []
  for measure in chosen:
    for target in targets:
      tau = bootstrap_tau(table.column(measure), table.column(target), num_resamples, seed,
                          level)
      psi = granulated_psi(table, measure, target, num_resamples, seed, level)
      errors = sign_error(table, measure, target)
      rows.append({"measure": measure, "kind": measure_kind(measure), "target": target,
                   "num_models": tau["num_models"], "tau": tau["tau"],
                   "tau_low": tau["low"], "tau_high": tau["high"],
                   "abs_tau": abs(tau["tau"]), "abs_tau_low": tau["abs_low"],
                   "abs_tau_high": tau["abs_high"], "psi": psi["psi"],
                   "psi_low": psi["low"], "psi_high": psi["high"],
                   "sign_error": errors["mean"],
                   "sign_error_worst": errors["worst_hyperparameter"]})
  return {"rows": rows, "num_models": len(table), "excluded": list(table.excluded),
          "criterion": table.criterion, "num_resamples": num_resamples, "level": level}
