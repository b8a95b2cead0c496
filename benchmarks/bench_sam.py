"""SAM's train step time over SGD's, same base optimizer (SGD, momentum 0.9), side by side.

Full jitted train steps from ``nonuniform_jax.steps.make_train_step`` (forward, backward, the
optimizer and, for ResNet-20, BatchNorm with running statistics from the clean pass only) at
batch 128 on the default MLP (inputs [128, 40]) and ResNet-20 (inputs [128, 32, 32, 3]).
SAM makes two gradient evaluations per step, which bounds the ratio at about 2.0; the goal
allows 5% for the perturbation itself (a global norm and two tree additions).
"""

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import time_fn
from nonuniform_jax import models, optim, steps

BATCH = 128
CASES = {  # name -> (model name, input shape without the batch axis)
    "default MLP": ("mlp", (40,)),
    "ResNet-20": ("resnet20", (32, 32, 3)),
}
GOAL = 2.1


def step_time(model, tx, passes: int, batch, repeats: int, warmup: int) -> float:
  """Median seconds of one jitted train step (state not threaded: every call is one step)."""
  variables = jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1])
  params = variables["params"]
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=variables.get("batch_stats", {}),
                           opt_state=tx.init(params))
  step = jax.jit(steps.make_train_step(model, tx, seed=0, passes=passes))
  return time_fn(step, state, batch, repeats=repeats, warmup=warmup)


def run(quick: bool) -> list[dict]:
  base = lambda: optax.sgd(0.1, momentum=0.9)
  repeats, warmup = (3, 1) if quick else (20, 2)
  rows = []
  for case, (name, shape) in CASES.items():
    row = {"benchmark": "SAM step time, batch 128", "case": case, "unit": "x SGD step",
           "goal": f"<= {GOAL}"}
    if name not in models.MODELS:
      rows.append({**row, "value": float("nan"), "ok": None,
                   "note": f"skipped: model {name!r} is not registered"})
      continue
    model = models.get_model(name, 10)
    # Quick mode only checks that it runs: a small batch for the convolutional network.
    size = 16 if quick and len(shape) > 1 else BATCH
    inputs = jax.random.normal(jax.random.key(1), (size,) + shape)
    batch = {"inputs": inputs, "labels": jnp.arange(size, dtype=jnp.int32) % 10}
    sgd = step_time(model, base(), 1, batch, repeats, warmup)
    sam = step_time(model, optax.chain(optim.sam(0.05), base()), 2, batch, repeats, warmup)
    ratio = sam / sgd
    rows.append({**row, "value": ratio, "ok": ratio <= GOAL,
                 "note": f"SGD {1e3 * sgd:.2f} ms, SAM {1e3 * sam:.2f} ms"
                         + (f"; quick: batch {size}" if size != BATCH else "")})
  return rows
