"""CSAM's train step time over SGD's, same base optimizer (SGD, momentum 0.9), side by side.

Jitted train steps at batch 128 on the default MLP (inputs [128, 40]) and ResNet-20 (inputs
[128, 32, 32, 3], BatchNorm running statistics from the clean pass only). CSAM makes three
gradient evaluations per step, which bounds the ratio at about 3.0:

* ``identity``: goal 3.15 (5% for the two normalised perturbations and the momentum);
* ``kfac`` with statistics and inverse refreshed every 50 steps: goal 3.4. The clean pass
  captures the factors only on refresh steps (the trainer passes ``kfac_due`` as a static bool:
  one program for refresh steps, one for the others), so the time is averaged over runs of 50
  consecutive steps (state threaded), which contain exactly one refresh.

All three are ``steps.make_train_step`` steps (K-FAC: ``extra_args=('kfac_factors',)``),
jitted with their state donated, as the trainer jits them.

A third row per model times ``kfac.precondition`` alone (the exact damped inverse applied to a
gradient-sized pytree, docs/methods.md: four matrix products per layer, 4·K̄·F·(K̄ + F) flops),
the per-step work the ``kfac`` metric adds to ``identity``, as a ratio to the SGD step, with its
flops as a ratio to the gradient's (6·B·T·K̄·F per layer, less the first layer's input
gradient). The ``kfac`` ratio cannot be below the ``identity`` ratio plus this one.
"""

import math

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import time_fn
from nonuniform_jax import models, optim, steps
from nonuniform_jax.models.layers import zero_perturbations
from nonuniform_jax.optim import kfac

BATCH = 128
PERIOD = 50
CASES = {  # name -> (model name, input shape without the batch axis)
    "default MLP": ("mlp", (40,)),
    "ResNet-20": ("resnet20", (32, 32, 3)),
}
GOALS = {"identity": 3.15, "kfac": 3.4}


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def time_per_step(step, state, batch, n_steps: int, repeats: int) -> float:
  """Median seconds per step over runs of ``n_steps`` consecutive steps (state threaded). The
  steps donate their state, as the trainer's do (what a step does not change, e.g. the K-FAC
  factors between refreshes, is then not copied), so each run starts from a copy (one dispatch
  per run)."""
  def run_steps(state):
    state = _copy(state)
    for i in range(n_steps):
      state, _ = step(state, batch, i)
    return state

  for i in range(min(n_steps, 2)):   # compilation (the refresh step and the others)
    jax.block_until_ready(step(_copy(state), batch, i))
  return time_fn(run_steps, state, repeats=repeats, warmup=1) / n_steps


def run(quick: bool) -> list[dict]:
  base = lambda: optax.sgd(0.1, momentum=0.9)
  n_steps = 2 if quick else PERIOD
  rows = []
  for case, (name, shape) in CASES.items():
    row = {"benchmark": "CSAM step time, batch 128", "unit": "x SGD step"}
    if name not in models.MODELS:
      rows += [{**row, "case": f"{case}, {metric}", "goal": f"<= {goal}", "value": float("nan"),
                "ok": None, "note": f"skipped: model {name!r} is not registered"}
               for metric, goal in GOALS.items()]
      continue
    model = models.get_model(name, 10)
    # Runs of 50 steps: median of 5 on the MLP, of 2 on ResNet-20 (seconds per step on a CPU).
    repeats = 1 if quick else (5 if len(shape) == 1 else 2)
    # Quick mode only checks that it runs: a small batch for the convolutional network.
    size = 16 if quick and len(shape) > 1 else BATCH
    batch = {"inputs": jax.random.normal(jax.random.key(1), (size,) + shape),
             "labels": jnp.arange(size, dtype=jnp.int32) % 10}
    variables = jax.jit(model.init)(jax.random.key(0), batch["inputs"])
    params = variables["params"]
    perts = zero_perturbations(model, variables, batch["inputs"], train=True)

    def state_for(tx):   # its own buffers: the steps donate their state
      return steps.TrainState(step=jnp.zeros((), jnp.int32), params=_copy(params),
                              batch_stats=_copy(variables.get("batch_stats", {})),
                              opt_state=tx.init(params))

    sgd_tx = base()
    plain = jax.jit(steps.make_train_step(model, sgd_tx, seed=0), donate_argnums=0)
    sgd = time_per_step(lambda s, b, i: plain(s, b), state_for(sgd_tx), batch, n_steps, repeats)
    ratios = {}
    for metric, goal in GOALS.items():
      if metric == "identity":
        tx = optax.chain(optim.csam(0.1, 0.2, 0.9), base())
        jitted = jax.jit(steps.make_train_step(model, tx, seed=0, passes=3), donate_argnums=0)
        step = lambda s, b, i, f=jitted: f(s, b)
      else:
        tx = optax.chain(optim.csam(0.1, 0.2, 0.9, metric="kfac",
                                    kfac_layers=kfac.layer_names(perts), stats_every=PERIOD,
                                    inverse_every=PERIOD), base())
        jitted = jax.jit(steps.make_train_step(model, tx, seed=0, passes=3,
                                               extra_args=("kfac_factors",)),
                         static_argnames=("kfac_due",), donate_argnums=0)
        # As the trainer calls it: whether the step refreshes, as a static bool.
        step = lambda s, b, i, f=jitted: f(s, b, kfac_due=i % PERIOD == 0)
      csam = time_per_step(step, state_for(tx), batch, n_steps, repeats)
      ratio = csam / sgd
      ratios[metric] = ratio
      floor = ""
      if metric == "kfac":
        rows.append(_precondition_row(row, case, state_for(tx), batch, jitted, perts, sgd,
                                      repeats))
        floor = (f"; floor: identity {ratios['identity']:.3g} + preconditioning alone "
                 f"{rows[-1]['value']:.3g} = {ratios['identity'] + rows[-1]['value']:.3g}")
      rows.insert(len(rows) - (metric == "kfac"),
                  {**row, "case": f"{case}, {metric}", "goal": f"<= {goal}", "value": ratio,
                   "ok": ratio <= goal,
                   "note": f"SGD {1e3 * sgd:.2f} ms, CSAM {1e3 * csam:.2f} ms per step over "
                           f"{n_steps} steps" + floor + (f"; quick: batch {size}"
                                                         if size != BATCH else "")})
  return rows


def _flops(layer_dims, batch_size, locations) -> tuple[float, float]:
  """(preconditioning flops, gradient flops) over the factored layers: 4·K̄·F·(K̄ + F) against
  6·B·T·K̄·F per layer (forward, input gradient and weight gradient; the first layer's input
  gradient, which no one needs, is counted too, so the gradient's count errs high)."""
  pre = sum(4.0 * k * f * (k + f) for k, f in layer_dims.values())
  grad = sum(6.0 * batch_size * locations[n] * k * f for n, (k, f) in layer_dims.items())
  return pre, grad


def _locations(perts, name: str) -> int:
  """T: output locations per example of the layer ``name`` (its perturbation [B, ..., F])."""
  leaf = perts
  for part in name.split("/"):
    leaf = leaf[part]
  return math.prod(leaf["outputs"].shape[1:-1])


def _precondition_row(row, case, state, batch, jitted, perts, sgd_seconds, repeats) -> dict:
  """``kfac.precondition`` of a gradient-sized pytree with refreshed eigenbases, over SGD."""
  state, _ = jitted(state, batch, kfac_due=True)   # factors and eigenbases of this batch
  kstate = state.opt_state[0].kfac
  precondition = jax.jit(lambda d, e: kfac.precondition(d, e, 1e-3))
  seconds = time_fn(precondition, state.params, kstate.eigen, repeats=20 * repeats)
  dims = {n: (e.qa.shape[0], e.qg.shape[0]) for n, e in kstate.eigen.items()}
  pre, grad = _flops(dims, batch["labels"].shape[0], {n: _locations(perts, n) for n in dims})
  return {**row, "case": f"{case}, kfac preconditioning alone", "goal": "",
          "value": seconds / sgd_seconds, "ok": None,
          "note": f"{1e3 * seconds:.2f} ms: the exact damped inverse on every factored layer, "
                  f"{pre / 1e6:.1f} Mflop, {pre / grad:.2f}x the ~{grad / 1e6:.0f} Mflop of "
                  f"their gradient"}
