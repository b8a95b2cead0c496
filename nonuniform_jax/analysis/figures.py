"""Figures and summary tables of a sweep, or of training runs (matplotlib, Agg backend).

A sweep (a directory with ``sweep.json``; ``analysis.load_table``) gives:

    scatter_NAME-KEY.png   each varying measure against the generalization gap, one panel per
                           varied hyperparameter (points coloured by its value), τ in the title
    within_bins.png        nonuniformity against the gap within each sharpness bin
    wu_check.png           a·η/2 and s·η/√b per model against the batch size, coloured by η
    summary.md, .csv       the headline table (``analysis.summary``); the markdown also lists
                           the exclusions, the bins, partial τ and Wu's check

(``within_bins.png`` and ``wu_check.png`` only when the table holds the measures they need.)
Runs (every directory below the logdir holding ``metrics.jsonl`` or ``summary.json``) give:

    curves.png             training and test loss and accuracy over steps, one colour per run
    measures.png           each logged measure over steps (only when some run logged one)
    comparison.png         final test accuracy and generalization gap per run, grouped by
                           dataset and optimizer
    summary.md, .csv       one row per run: its config's dataset, model and optimizer, status,
                           steps and final numbers; the markdown adds the means per group
"""

import collections
import csv
import io
import json
import math
import os

import numpy as np

from nonuniform_jax import workdir as wd
from nonuniform_jax.analysis import correlation, table as table_lib

SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
SKIP_DIRS = (wd.CHECKPOINT_DIR, wd.CORRUPT_DIR)


def _common():
  from nonuniform_jax.experiments import common  # pylint: disable=g-import-not-at-top
  return common


def _fmt(value) -> str:
  if isinstance(value, float):
    return "n/a" if math.isnan(value) else f"{value:.3g}"
  return "" if value is None else str(value)


def _interval(low, high) -> str:
  return "n/a" if math.isnan(low) or math.isnan(high) else f"[{low:.3g}, {high:.3g}]"


def _csv(header, rows) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([["" if isinstance(v, float) and math.isnan(v) else v for v in row]
                    for row in rows])   # every digit; a missing value is an empty cell
  return buffer.getvalue()


def _save(fig, path: str, files: list) -> None:
  fig.savefig(path, dpi=110, bbox_inches="tight")
  _common().pyplot().close(fig)
  files.append(path)


def _colours(values: list):
  """(colour per value, legend handles): a legend of up to 8 distinct values (numbers in
  order), else for numbers a colour bar (a ScalarMappable; logarithmic over a span of 10 or
  more)."""
  plt = _common().pyplot()
  import matplotlib  # pylint: disable=g-import-not-at-top
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  distinct = {table_lib.hashable(v) for v in values}
  if numeric and len(distinct) > 8:
    low, high = min(values), max(values)
    norm = (matplotlib.colors.LogNorm(low, high) if low > 0 and high / low >= 10
            else matplotlib.colors.Normalize(low, high))
    cmap = plt.get_cmap("viridis")
    return [cmap(norm(v)) for v in values], matplotlib.cm.ScalarMappable(norm, cmap)
  cmap = plt.get_cmap("tab10")
  index = {label: i for i, label in enumerate(sorted(distinct, key=None if numeric else str))}
  colours = [cmap(index[table_lib.hashable(v)] % 10) for v in values]
  handles = [matplotlib.lines.Line2D([], [], marker="o", linestyle="", color=cmap(i % 10),
                                     label=f"{label:g}" if numeric else str(label))
             for label, i in index.items()]
  return colours, handles


def _pick(table, wanted, kind: str) -> str | None:
  """``wanted`` if given; else the default column of that kind if present, else the first
  varying measure of that kind."""
  if wanted:
    if wanted not in table.measures:
      raise ValueError(f"no measure {wanted!r} in the sweep; it has {list(table.measures)}")
    return wanted
  default = (correlation.DEFAULT_SHARPNESS if kind == "sharpness"
             else correlation.DEFAULT_NONUNIFORMITY)
  varying = correlation.varying_measures(table)
  if default in varying:
    return default
  return next((m for m in varying if correlation.measure_kind(m) == kind), None)


def _scatter(table, measure: str, row: dict, path: str, files: list) -> None:
  plt = _common().pyplot()
  keys = list(table.hyperparameters) or [None]
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
  x, y = table.column(measure), table.column("generalization_gap")
  for ax, key in zip(axes[0], keys):
    if key is None:
      ax.scatter(x, y, s=16)
    else:
      colours, legend = _colours(table.values(key))
      ax.scatter(x, y, c=colours, s=16)
      if isinstance(legend, list):
        ax.legend(handles=legend, title=key, fontsize=7, title_fontsize=7)
      else:
        fig.colorbar(legend, ax=ax, label=key)
    ax.set_xlabel(measure)
    ax.set_ylabel("generalization gap")
    ax.set_title(f"coloured by {key}" if key else "", fontsize=9)
  fig.suptitle(f"{measure} vs gap: τ = {row['tau']:.3f} "
               f"{_interval(row['tau_low'], row['tau_high'])}, Ψ = {_fmt(row['psi'])}, "
               f"n = {row['num_models']}", fontsize=10)
  fig.tight_layout()
  _save(fig, path, files)


def _within_bins_figure(table, bins: dict, path: str, files: list) -> None:
  plt = _common().pyplot()
  count = max(1, len(bins["bins"]))
  fig, axes = plt.subplots(1, count, figsize=(3.4 * count, 3.3), squeeze=False)
  names = [row["name"] for row in table.rows]
  x, y = table.column(bins["nonuniformity"]), table.column(bins["target"])
  for ax, b in zip(axes[0], bins["bins"]):
    inside = np.isin(names, b["members"])
    ax.scatter(x[inside], y[inside], s=14)
    ax.set_title(f"{b['low']:.3g} ≤ sharpness ≤ {b['high']:.3g}\nn = {b['size']}, "
                 f"τ = {_fmt(b['tau'])}", fontsize=8)
    ax.set_xlabel(bins["nonuniformity"], fontsize=8)
  axes[0][0].set_ylabel("generalization gap")
  fig.suptitle(f"within bins of {bins['sharpness']}: size-weighted τ = "
               f"{_fmt(bins['weighted_tau'])} over {bins['num_models']} models", fontsize=10)
  fig.tight_layout()
  _save(fig, path, files)


def _wu_figure(check: dict, path: str, files: list) -> None:
  plt = _common().pyplot()
  members = check["members"]
  colours, legend = _colours([m["learning_rate"] for m in members])
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  b = [m["batch_size"] for m in members]
  for ax, key, label in ((axes[0], "sharpness_ratio", "a·η/2 (stable: ≤ 1)"),
                         (axes[1], "nonuniformity_ratio", "s·η/√b (predicted ≲ 1)")):
    ax.scatter(b, [m[key] for m in members], c=colours, s=16)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size b")
    ax.set_ylabel(label)
  if isinstance(legend, list):
    axes[1].legend(handles=legend, title="η", fontsize=7, title_fontsize=7)
  else:
    fig.colorbar(legend, ax=axes[1], label="η")
  fig.suptitle(f"Wu's check ({check['sharpness']}, {check['nonuniformity']}): "
               f"τ(s, √b/η) = {_fmt(check['tau_nonuniformity_sqrt_b_over_eta'])}, "
               f"a ≤ 2/η for {_fmt(100 * check['fraction_stable'])}% of models", fontsize=10)
  fig.tight_layout()
  _save(fig, path, files)


HEADLINE = ("measure", "kind", "target", "num_models", "tau", "tau_low", "tau_high", "abs_tau",
            "abs_tau_low", "abs_tau_high", "psi", "psi_low", "psi_high", "sign_error",
            "sign_error_worst")


def plot_sweep(sweep_dir: str, out: str, *, measures=None, sharpness: str | None = None,
               nonuniformity: str | None = None, num_resamples: int = 1000,
               seed: int = 0) -> list[str]:
  """The sweep's figures and tables (the module docstring) in ``out``, for ``measures``
  (default: every measure that varies); returns the paths written. Raises ValueError, writing
  nothing, when no member counts or a measure named is not in the table."""
  common = _common()
  table = table_lib.load_table(sweep_dir)
  if not len(table):
    reasons = collections.Counter(e["reason"].split(":")[0].split(" at step")[0]
                                  for e in table.excluded)
    shown = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "no members"
    raise ValueError(f"no member of the sweep in {sweep_dir!r} counts yet ({shown}); "
                     "nothing to plot")
  sharp = _pick(table, sharpness, "sharpness")
  noisy = _pick(table, nonuniformity, "nonuniformity")
  head = correlation.summary(table, measures, num_resamples=num_resamples, seed=seed)
  os.makedirs(out, exist_ok=True)
  files = []
  gap_rows = {r["measure"]: r for r in head["rows"] if r["target"] == "generalization_gap"}
  for measure, row in gap_rows.items():
    _scatter(table, measure, row, os.path.join(out, f"scatter_{measure.replace('/', '-')}.png"),
             files)
  lines = [f"# Sweep {table.name or sweep_dir}", "",
           f"{len(table)} models count, {len(table.excluded)} excluded; criterion: "
           f"{json.dumps(table.criterion)}; intervals: {100 * head['level']:g}% percentile "
           f"bootstrap, {num_resamples} resamples, seed {seed}.", "",
           "## Measures against the generalization gap and the test error", "",
           common.markdown_table(
               ["measure", "kind", "target", "N", "τ", "τ interval", "|τ|", "|τ| interval",
                "Ψ", "Ψ interval", "sign-error", "worst hyperparameter's"],
               [[r["measure"], r["kind"], r["target"], r["num_models"], _fmt(r["tau"]),
                 _interval(r["tau_low"], r["tau_high"]), _fmt(r["abs_tau"]),
                 _interval(r["abs_tau_low"], r["abs_tau_high"]), _fmt(r["psi"]),
                 _interval(r["psi_low"], r["psi_high"]), _fmt(r["sign_error"]),
                 _fmt(r["sign_error_worst"])] for r in head["rows"]])]
  if table.excluded:
    lines += ["## Excluded", "", common.markdown_table(
        ["member", "reason"], [[e["name"], e["reason"]] for e in table.excluded])]
  if sharp and noisy:
    bins = correlation.within_sharpness_bins(table, noisy, sharp)
    if bins["bins"]:
      _within_bins_figure(table, bins, os.path.join(out, "within_bins.png"), files)
    partial = [[m, _fmt(correlation.partial_kendall_tau(
        table.column(m), table.column("generalization_gap"), table.column(sharp)))]
               for m in gap_rows if correlation.measure_kind(m) == "nonuniformity"]
    lines += [f"## Within bins of {sharp}", "",
              f"{noisy} against the gap; size-weighted τ = {_fmt(bins['weighted_tau'])} over "
              f"{bins['num_models']} models.", "",
              common.markdown_table(["sharpness from", "to", "models", "τ"],
                                    [[_fmt(b["low"]), _fmt(b["high"]), b["size"],
                                      _fmt(b["tau"])] for b in bins["bins"]]),
              f"Partial τ with the gap given {sharp}:", "",
              common.markdown_table(["measure", "partial τ"], partial)]
  else:
    lines += ["No within-bin comparison: the sweep lacks a varying sharpness or "
              "nonuniformity measure.", ""]
  if {correlation.WU_SHARPNESS, correlation.WU_NONUNIFORMITY} <= set(table.measures):
    check = correlation.wu_check(table)
    if check["members"]:
      _wu_figure(check, os.path.join(out, "wu_check.png"), files)
    lines += ["## Wu's check", "",
              f"τ(s, √b/η) = {_fmt(check['tau_nonuniformity_sqrt_b_over_eta'])}; a ≤ 2/η for "
              f"{_fmt(100 * check['fraction_stable'])}% of {len(check['members'])} models.", "",
              common.markdown_table(
                  ["η", "batch sizes", "models", "all a ≤ 2/η", "max a·η/2", "τ(s, b)"],
                  [[_fmt(r["learning_rate"]), " ".join(map(str, r["batch_sizes"])),
                    r["num_models"], r["all_stable"], _fmt(r["max_sharpness_ratio"]),
                    _fmt(r["tau_nonuniformity_batch"])] for r in check["learning_rates"]])]
  else:
    lines += [f"No Wu's check: the sweep lacks {correlation.WU_SHARPNESS} or "
              f"{correlation.WU_NONUNIFORMITY}.", ""]
  lines += ["## Figures", ""] + [f"* [{os.path.basename(f)}]({os.path.basename(f)})"
                                 for f in files]
  return _write_tables(out, "\n".join(lines) + "\n",
                       _csv(HEADLINE, [[r[k] for k in HEADLINE] for r in head["rows"]]), files)


def _write_tables(out: str, markdown: str, text_csv: str, files: list) -> list[str]:
  for name, text in ((SUMMARY_MD, markdown), (SUMMARY_CSV, text_csv)):
    wd.write_text(os.path.join(out, name), text)
    files.append(os.path.join(out, name))
  return files


def find_runs(logdir: str) -> list[dict]:
  """Every run below ``logdir`` (itself included): a directory holding ``metrics.jsonl`` or
  ``summary.json``, checkpoint folders not searched. Each as ``path``, ``name`` (relative to
  the logdir), ``summary`` ({} if none), ``config`` and ``records`` (metrics lines with a
  ``step``, unreadable lines skipped)."""
  runs = []
  for folder, dirs, names in os.walk(logdir):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    if wd.METRICS_FILE not in names and wd.SUMMARY_FILE not in names:
      continue
    summary = (wd.read_json(os.path.join(folder, wd.SUMMARY_FILE))
               if wd.SUMMARY_FILE in names else {})
    config = summary.get("config") or (
        wd.read_json(os.path.join(folder, wd.CONFIG_FILE)) if wd.CONFIG_FILE in names else {})
    records = []
    if wd.METRICS_FILE in names:
      for line in open(os.path.join(folder, wd.METRICS_FILE)):
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
          records.append(record)
    name = os.path.relpath(folder, logdir)
    runs.append({"path": folder, "name": os.path.basename(os.path.abspath(logdir))
                 if name == "." else name, "summary": summary, "config": config,
                 "records": records})
  return runs


def _final(run: dict) -> dict:
  final = run["summary"].get("final")
  if final:
    return final
  evaluated = [r for r in run["records"] if "test_accuracy" in r]
  return evaluated[-1] if evaluated else {}


RUN_COLUMNS = ("run", "dataset", "model", "optimizer", "status", "step", "test_accuracy",
               "eval_train_accuracy", "test_loss", "eval_train_loss", "generalization_gap",
               "accuracy_gap")


def _run_row(run: dict) -> dict:
  config, final = wd.flatten(run["config"] or {}), _final(run)
  return {"run": run["name"], "dataset": config.get("dataset", ""),
          "model": config.get("model.name", ""), "optimizer": config.get("optimizer.name", ""),
          "status": run["summary"].get("status", "unfinished"),
          "step": final.get("step", run["records"][-1]["step"] if run["records"] else ""),
          **{k: float(final[k]) if isinstance(final.get(k), (int, float)) else math.nan
             for k in RUN_COLUMNS[6:]}}


def _series(run: dict, key: str) -> tuple[list, list]:
  points = [(r["step"], r[key]) for r in run["records"]
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
  return [p[0] for p in points], [p[1] for p in points]


def plot_runs(logdir: str, out: str) -> list[str]:
  """The runs' figures and tables (the module docstring) in ``out``; returns the paths
  written. Raises ValueError, writing nothing, when ``logdir`` holds no run."""
  common = _common()
  plt = common.pyplot()
  import matplotlib.patches  # pylint: disable=g-import-not-at-top
  runs = find_runs(logdir)
  if not runs:
    raise ValueError(f"{logdir!r} holds no sweep ({table_lib.SWEEP_FILE}) and no run (a "
                     f"directory with {wd.METRICS_FILE} or {wd.SUMMARY_FILE}, searched "
                     "recursively); nothing to plot")
  os.makedirs(out, exist_ok=True)
  files = []
  colours = plt.get_cmap("tab10")
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for i, run in enumerate(runs):
    for ax, kind in zip(axes, ("loss", "accuracy")):
      for split, style in (("train", "-"), ("test", "--")):
        steps, values = _series(run, f"{split}_{kind}")
        if steps:
          ax.plot(steps, values, style, color=colours(i % 10), marker="." if len(steps) < 30
                  else None, label=f"{run['name']} ({split})")
  for ax, kind in zip(axes, ("loss", "accuracy")):
    ax.set_xlabel("step")
    ax.set_ylabel(kind)
    ax.set_title(f"{kind}: training (solid), test (dashed)", fontsize=9)
  if len(runs) <= 10:
    axes[1].legend(fontsize=7)
  fig.tight_layout()
  _save(fig, os.path.join(out, "curves.png"), files)

  measure_keys = sorted({k for run in runs for r in run["records"] for k in r
                         if k.startswith("measure/")})
  if measure_keys:
    cols = min(4, len(measure_keys))
    rows = -(-len(measure_keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, key in zip(axes.flat, measure_keys):
      for i, run in enumerate(runs):
        steps, values = _series(run, key)
        if steps:
          ax.plot(steps, values, marker="o", markersize=3, color=colours(i % 10),
                  label=run["name"])
      ax.set_title(key.removeprefix("measure/"), fontsize=8)
      ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(measure_keys):]:
      ax.axis("off")
    if len(runs) <= 10:
      axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    _save(fig, os.path.join(out, "measures.png"), files)

  table = sorted((_run_row(run) for run in runs),
                 key=lambda r: (str(r["dataset"]), str(r["optimizer"]), r["run"]))
  groups = collections.defaultdict(list)
  for row in table:
    groups[(row["dataset"], row["optimizer"])].append(row)
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(table) + 4), 4.2))
  optimizers = sorted({str(r["optimizer"]) for r in table})
  for ax, key in zip(axes, ("test_accuracy", "generalization_gap")):
    ax.bar(range(len(table)), [r[key] for r in table],
           color=[colours(optimizers.index(str(r["optimizer"])) % 10) for r in table])
    ax.set_xticks(range(len(table)), [f"{r['run']} ({r['dataset']})" for r in table],
                  rotation=60, ha="right", fontsize=7)
    ax.set_title(f"final {key.replace('_', ' ')}", fontsize=9)
  axes[1].legend(handles=[matplotlib.patches.Patch(color=colours(i % 10), label=o)
                          for i, o in enumerate(optimizers)], title="optimizer", fontsize=7,
                 title_fontsize=7)
  fig.tight_layout()
  _save(fig, os.path.join(out, "comparison.png"), files)

  lines = [f"# Runs in {logdir}", "", f"{len(runs)} run{'' if len(runs) == 1 else 's'}.", "",
           common.markdown_table(RUN_COLUMNS, [[_fmt(r[k]) for k in RUN_COLUMNS]
                                               for r in table]),
           "## By dataset and optimizer", "",
           common.markdown_table(
               ["dataset", "optimizer", "runs", "mean test accuracy", "mean gap"],
               [[d, o, len(m), _fmt(_mean([r["test_accuracy"] for r in m])),
                 _fmt(_mean([r["generalization_gap"] for r in m]))]
                for (d, o), m in groups.items()])]
  if not measure_keys:
    lines += ["No run logged a measure: no measures.png.", ""]
  lines += ["## Figures", ""] + [f"* [{os.path.basename(f)}]({os.path.basename(f)})"
                                 for f in files]
  return _write_tables(out, "\n".join(lines) + "\n",
                       _csv(RUN_COLUMNS, [[r[k] for k in RUN_COLUMNS] for r in table]), files)


def _mean(values) -> float:
  finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
  return float(np.mean(finite)) if finite else math.nan
