"""The prepared accelerator check: step times, throughput, measure costs and peak memory on one
GPU (or TPU chip), written to BENCHMARKS-GPU.md with the card's name.

    bash benchmarks/gpu_check.sh                 # on the accelerator machine, ~8 minutes at most
    python -m benchmarks.gpu_check --smoke       # the same rows, tiny, on a CPU (a rehearsal)

Rows (batch 128, CIFAR shapes):

* train step time and images per second of ResNet-20 and WRN-28-10 with SGD, SAM, CSAM
  (identity metric) and CSAM-K-FAC — K-FAC amortized over a 50-step period holding one refresh,
  and the refresh step alone — in float32 and bfloat16;
* a Hessian-vector product and tr Σ by the fast path, by chunked per-example gradients and by a
  Python loop over examples, as multiples of one batch gradient (float32), with the accelerator
  goal of chunked ≥ 10× the loop;
* the peak memory of each compiled program (XLA's plan: arguments + outputs + temporaries −
  aliased), whatever the platform.

It needs only JAX, Flax and Optax besides this repository (no TensorFlow, CLU or
ml_collections: the accelerator machine has no network), builds every program through the
trainer's own pieces (``Objective``, ``steps.make_train_step``, ``optim.family``), and stops
starting new rows once its time budget is spent, saying which were not measured.
"""

import argparse
import datetime
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import time_fn  # pylint: disable=wrong-import-position
from nonuniform_jax import measures, models, steps  # pylint: disable=wrong-import-position
from nonuniform_jax.models.layers import zero_perturbations  # pylint: disable=wrong-import-position
from nonuniform_jax.objective import Objective  # pylint: disable=wrong-import-position
from nonuniform_jax.optim import family, kfac  # pylint: disable=wrong-import-position

PERIOD = 50
# The paper's settings for the SAM family (configs/default.py and configs/sam_family.py hold
# them for training runs; this file may not import ml_collections).
SETTINGS = {
    "optimizer": {"base": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": False,
                  "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 5e-4,
                  "weight_decay_mode": "coupled", "grad_clip_norm": 0.0},
    "schedule": {"name": "constant"},
    "sam": {"rho": 0.05, "eta": 0.0},
    "csam": {"rho1": 0.1, "rho2": 0.2, "alpha": 0.9, "metric": "identity", "momentum_sign": -1},
    "kfac": {"damping": 1e-3, "stats_every": PERIOD, "inverse_every": PERIOD, "ema_decay": 0.95,
             "unfactored": "zero"},
}
METHODS = {  # row name -> (family entry, CSAM metric)
    "SGD": ("sgd", None), "SAM": ("sam", None), "CSAM identity": ("csam", "identity"),
    "CSAM-K-FAC": ("csam", "kfac")}
MODELS = {"ResNet-20": ("resnet20", {}), "WRN-28-10": ("wrn28_10", {})}
SMOKE_MODELS = {"ResNet-20": ("resnet20", {"depth": 8, "width": 4}),
                "WRN-28-10": ("wrn28_10", {"depth": 10, "widen_factor": 1})}


def peak_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def _mib(n) -> str:
  return "–" if n is None else f"{n / 2**20:.0f} MiB"


class Check:
  """Rows gathered under a deadline."""

  def __init__(self, budget_s: float):
    self.deadline = time.time() + budget_s
    self.rows = []

  def time_left(self) -> bool:
    return time.time() < self.deadline

  def add(self, **row):
    self.rows.append(row)
    print(" | ".join(str(v) for v in row.values()), flush=True)


def _state(model, tx, batch):
  params = model.init(jax.random.key(0), batch["inputs"][:1])
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params["params"],
                          batch_stats=params.get("batch_stats", {}),
                          opt_state=tx.init(params["params"]))


def step_rows(check: Check, case: str, model, batch, precision: str, repeats: int):
  objective = Objective(model, label_smoothing=0.1, precision=precision)
  sgd_seconds = None
  for method, (name, metric) in METHODS.items():
    if not check.time_left():
      check.add(benchmark="train step", case=f"{case}, {method}, {precision}", value="–",
                note="not measured: the time budget was spent")
      continue
    settings = {**SETTINGS, "csam": {**SETTINGS["csam"], "metric": metric or "identity"}}
    entry = family.get(name)
    needs = entry.needs(settings)
    layers = ("probe",)
    if needs:
      x = batch["inputs"][:1]
      key = jax.random.key(0)
      layers = kfac.layer_names(jax.eval_shape(lambda: zero_perturbations(
          model, model.init(key, x), x, train=True, rngs={"dropout": key})))
    tx = family.make(name, settings, optax.constant_schedule(0.1),
                     family.Context(50_000, layers, False), False)
    step = jax.jit(steps.make_train_step(objective, tx, seed=0, passes=entry.passes,
                                         extra_args=needs), static_argnums=2,
                   donate_argnums=0)
    state = _state(model, tx, batch)
    dues = [True, False] if needs else [None]
    compiled = {d: step.lower(state, batch, d).compile() for d in dues}
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))

    def run_period(s, n):
      s = copy(s)
      for i in range(n):
        s, _ = compiled[dues[0] if i == 0 else dues[-1]](s, batch)
      return s

    n = PERIOD if needs else 10
    seconds = time_fn(run_period, state, n, repeats=min(repeats, 2) if needs else repeats,
                      warmup=1) / n
    sgd_seconds = sgd_seconds or seconds
    peak = max(p for p in (peak_bytes(c) for c in compiled.values()) if p is not None) \
        if any(peak_bytes(c) for c in compiled.values()) else None
    note = (f"{seconds * 1e3:.1f} ms per step; {batch['labels'].shape[0] / seconds:,.0f} "
            f"images/s; peak {_mib(peak)}")
    if needs:
      refresh = time_fn(lambda s: compiled[True](copy(s), batch), state, repeats=repeats) - \
          time_fn(copy, state, repeats=repeats)
      note += f"; amortized over {PERIOD} steps, the refresh step alone {refresh * 1e3:.1f} ms"
    check.add(benchmark="train step", case=f"{case}, {method}, {precision}",
              value=f"{seconds / sgd_seconds:.2f}", unit="x SGD step", note=note)


def measure_rows(check: Check, case: str, model, batch, loop_count: int, repeats: int):
  if not check.time_left():
    check.add(benchmark="measures", case=case, value="–",
              note="not measured: the time budget was spent")
    return
  variables = model.init(jax.random.key(0), batch["inputs"][:1])
  params, stats = variables["params"], variables.get("batch_stats", {})
  fns = Objective(model).measure_functions(stats, "running")
  loss_fn = fns["loss_fn"]
  grad = jax.jit(jax.grad(loss_fn))
  gradient = time_fn(grad, params, batch, repeats=repeats)
  v = jax.tree.map(jnp.ones_like, params)
  hvp = jax.jit(lambda p, b, t: measures.hvp(loss_fn, p, [b], t))   # noqa: E731
  rows = {"HVP": time_fn(hvp, params, batch, v, repeats=repeats)}
  for method in ("fast", "chunked"):
    def trace(p, b, method=method):
      return measures.gradient_noise(loss_fn, p, [b], per_example_loss_fn=fns[
          "per_example_loss_fn"], capture_loss_fn=fns["capture_loss_fn"],
                                     perturbations_fn=jax.tree_util.Partial(
                                         fns["perturbations_fn"], p), method=method,
                                     chunk_size=32)["trace_sigma"]
    rows[f"tr Σ {method}"] = time_fn(trace, params, batch, repeats=max(2, repeats // 4))
  example_grad = jax.jit(jax.grad(lambda p, x, y: loss_fn(p, {"inputs": x[None],
                                                               "labels": y[None]})))

  def loop(p, b):
    out = None
    for i in range(loop_count):
      g = example_grad(p, b["inputs"][i], b["labels"][i])
      out = g if out is None else jax.tree.map(jnp.add, out, g)
    return out

  b = batch["labels"].shape[0]
  rows["tr Σ Python loop"] = time_fn(loop, params, batch, repeats=2) * b / loop_count
  for name, seconds in rows.items():
    check.add(benchmark="measures, batch " + str(b), case=f"{case}: {name}",
              value=f"{seconds / gradient:.2f}", unit="x gradient",
              note=f"{seconds * 1e3:.1f} ms; gradient {gradient * 1e3:.1f} ms")
  ratio = rows["tr Σ Python loop"] / rows["tr Σ chunked"]
  check.add(benchmark="measures, batch " + str(b), case=f"{case}: loop / chunked",
            value=f"{ratio:.1f}", unit="x faster", goal=">= 10",
            ok="yes" if ratio >= 10 else "**no**",
            note="chunked per-example gradients against the Python loop (an accelerator goal)")


def write(check: Check, path: pathlib.Path, smoke: bool, wall: float):
  device = jax.devices()[0]
  header = (f"# Accelerator check\n\nWritten by `{'python -m benchmarks.gpu_check --smoke' if smoke else 'bash benchmarks/gpu_check.sh'}` on "
            f"{datetime.date.today().isoformat()}: {device.device_kind} ({device.platform}), "
            f"JAX {jax.__version__}, in {wall:.0f} s. Batch 128 (CIFAR shapes) unless smoke; "
            "step times are medians over runs of consecutive steps with the state donated, as "
            "the trainer runs them; peak memory is XLA's plan for each compiled program.\n\n")
  if smoke:
    header += ("**Smoke run: tiny models on a small batch, to rehearse the script; these are not "
               "accelerator numbers.**\n\n")
  cols = ("benchmark", "case", "value", "unit", "goal", "ok", "note")
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in check.rows]
  path.write_text(header + "\n".join(lines) + "\n")
  print(f"wrote {path}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny models, a CPU rehearsal")
  parser.add_argument("--budget", type=float, default=420.0, help="seconds before no new row")
  parser.add_argument("--out", default=str(ROOT / "BENCHMARKS-GPU.md"))
  args = parser.parse_args(argv)
  start = time.time()
  batch_size = 8 if args.smoke else 128
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32),
           "labels": jnp.asarray(rng.integers(0, 10, batch_size))}
  check = Check(args.budget)
  chosen = SMOKE_MODELS if args.smoke else MODELS
  repeats = 2 if args.smoke else 5
  for case, (name, kwargs) in chosen.items():   # ResNet-20's rows first: the cheaper ones
    model = models.get_model(name, 10, **kwargs)
    for precision in ("float32", "bfloat16"):
      step_rows(check, case, model, batch, precision, repeats)
    measure_rows(check, case, model, batch, loop_count=4 if args.smoke else 16,
                 repeats=repeats)
  write(check, pathlib.Path(args.out), args.smoke, time.time() - start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
