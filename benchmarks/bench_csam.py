"""CSAM's train step time over SGD's, same base optimizer (SGD, momentum 0.9), side by side.

Jitted train steps at batch 128 on the default MLP (inputs [128, 40]) and ResNet-20 (inputs
[128, 32, 32, 3], BatchNorm running statistics from the clean pass only). CSAM makes three
gradient evaluations per step, which bounds the ratio at about 3.0:

* ``identity``: goal 3.15 (5% for the two normalised perturbations and the momentum);
* ``kfac`` with statistics and inverse refreshed every 50 steps: goal 3.4. The clean pass
  captures the factors only on refresh steps (the trainer passes ``kfac_due`` as a static bool:
  one program for refresh steps, one for the others), so the time is averaged over runs of 50
  consecutive steps (state threaded), which contain exactly one refresh.

All three are ``steps.make_train_step`` steps (K-FAC: ``extra_args=('kfac_factors',)``).
"""

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


def time_per_step(step, state, batch, n_steps: int, repeats: int) -> float:
  """Median seconds per step over runs of ``n_steps`` consecutive steps (state threaded)."""
  def run_steps(state):
    for i in range(n_steps):
      state, _ = step(state, batch, i)
    return state

  for i in range(min(n_steps, 2)):   # compilation (the refresh step and the others)
    jax.block_until_ready(step(state, batch, i))
  return time_fn(run_steps, state, repeats=repeats, warmup=0) / n_steps


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

    def state_for(tx):
      return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              batch_stats=variables.get("batch_stats", {}),
                              opt_state=tx.init(params))

    sgd_tx = base()
    plain = jax.jit(steps.make_train_step(model, sgd_tx, seed=0))
    sgd = time_per_step(lambda s, b, i: plain(s, b), state_for(sgd_tx), batch, n_steps, repeats)
    for metric, goal in GOALS.items():
      if metric == "identity":
        tx = optax.chain(optim.csam(0.1, 0.2, 0.9), base())
        jitted = jax.jit(steps.make_train_step(model, tx, seed=0, passes=3))
        step = lambda s, b, i, f=jitted: f(s, b)
      else:
        tx = optax.chain(optim.csam(0.1, 0.2, 0.9, metric="kfac",
                                    kfac_layers=kfac.layer_names(perts), stats_every=PERIOD,
                                    inverse_every=PERIOD), base())
        jitted = jax.jit(steps.make_train_step(model, tx, seed=0, passes=3,
                                               extra_args=("kfac_factors",)),
                         static_argnames=("kfac_due",))
        # As the trainer calls it: whether the step refreshes, as a static bool.
        step = lambda s, b, i, f=jitted: f(s, b, kfac_due=i % PERIOD == 0)
      csam = time_per_step(step, state_for(tx), batch, n_steps, repeats)
      ratio = csam / sgd
      rows.append({**row, "case": f"{case}, {metric}", "goal": f"<= {goal}", "value": ratio,
                   "ok": ratio <= goal,
                   "note": f"SGD {1e3 * sgd:.2f} ms, CSAM {1e3 * csam:.2f} ms per step over "
                           f"{n_steps} steps" + (f"; quick: batch {size}" if size != BATCH
                                                 else "")})
  return rows
