"""Curvature measures: the cost of a Hessian-vector product, and Lanczos' HVPs to λ_max.

* HVP time over gradient time (goal <= 2.5): ``measures.hvp`` (forward-over-reverse) against
  ``jax.grad`` of the same mean loss, both jitted with parameters and batch as arguments, on the
  default MLP (MNIST-1D-shaped inputs [256, 40]) and on ResNet-20 (CIFAR-shaped inputs, BatchNorm
  in eval mode, its statistics closed over with ``Partial``).
* HVPs to λ_max at 1e-3 relative accuracy on the default MLP (goal <= 30): the first Lanczos step
  whose top Ritz value is within 1e-3 of a converged reference; and what ``lambda_max`` with its
  default settings spends (loop + residual HVPs) and reaches.

Inputs are random (seeded) data of the datasets' shapes at the models' initialisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from benchmarks.common import time_fn
from nonuniform_jax import measures, models

HVP_GOAL = 2.5
HVPS_GOAL = 30
ACCURACY = 1e-3


def _problem(name, input_shape, batch_size):
  """(loss_fn, params, batch) for model ``name`` with 10 classes on random data."""
  model = models.get_model(name, 10)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch_size,) + input_shape)
  y = jax.random.randint(ky, (batch_size,), 0, 10)
  variables = jax.jit(model.init)(kp, x[:1])

  def loss(batch_stats, params, batch):
    v = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = model.apply(v, batch["x"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  return Partial(loss, variables.get("batch_stats", {})), variables["params"], {"x": x, "y": y}


def _hvp_row(case, name, input_shape, batch_size, repeats):
  if name not in models.MODELS:
    return {"benchmark": "hvp / gradient", "case": case, "value": float("nan"),
            "unit": "x gradient", "goal": f"<= {HVP_GOAL:g}", "ok": None,
            "note": f"skipped: model {name} not registered"}
  loss_fn, params, batch = _problem(name, input_shape, batch_size)
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
  grad = jax.jit(jax.grad(loss_fn))
  hvp = jax.jit(lambda p, b, u: measures.hvp(loss_fn, p, [b], u))
  grad_s = time_fn(grad, params, batch, repeats=repeats)
  hvp_s = time_fn(hvp, params, batch, v, repeats=repeats)
  ratio = hvp_s / grad_s
  size = sum(x.size for x in jax.tree.leaves(params))
  return {"benchmark": "hvp / gradient", "case": case, "value": ratio, "unit": "x gradient",
          "goal": f"<= {HVP_GOAL:g}", "ok": ratio <= HVP_GOAL,
          "note": f"batch {batch_size}, {size:,} parameters; hvp {hvp_s * 1e3:.2f} ms, "
                  f"gradient {grad_s * 1e3:.2f} ms"}


def _lanczos_rows(batch_size):
  loss_fn, params, batch = _problem("mlp", (40,), batch_size)
  reference = measures.lambda_max(loss_fn, params, [batch], num_iters=200, tol=1e-5)
  ref = reference["lambda_max"]

  flat, unravel = ravel_pytree(params)
  matvec = lambda x: ravel_pytree(measures.hvp(loss_fn, params, [batch], unravel(x)))[0]
  steps = 3 * HVPS_GOAL
  run = jax.jit(lambda v0: measures.lanczos(matvec, v0, steps))(
      jax.random.normal(jax.random.key(2), flat.shape, flat.dtype))
  alphas, betas = np.asarray(run.alphas, np.float64), np.asarray(run.betas, np.float64)
  errors = [abs(np.linalg.eigvalsh(np.diag(alphas[:j]) + np.diag(betas[:j - 1], 1)
                                   + np.diag(betas[:j - 1], -1))[-1] - ref) / abs(ref)
            for j in range(1, steps + 1)]
  needed = next((j + 1 for j, e in enumerate(errors) if e <= ACCURACY), float("nan"))
  note = (f"default MLP, batch {batch_size}; reference {ref:.5g} (residual "
          f"{reference['residual']:.1e}, {reference['iterations']} steps)")
  rows = [{"benchmark": "lambda_max", "case": "Lanczos HVPs to 1e-3 relative accuracy",
           "value": float(needed), "unit": "HVPs", "goal": f"<= {HVPS_GOAL}",
           "ok": bool(needed <= HVPS_GOAL), "note": note}]

  default = measures.lambda_max(loss_fn, params, [batch])
  error = abs(default["lambda_max"] - ref) / abs(ref)
  rows.append({"benchmark": "lambda_max", "case": "lambda_max() defaults: HVPs spent",
               "value": float(default["num_hvps"]), "unit": "HVPs", "goal": f"<= {HVPS_GOAL}",
               "ok": bool(default["num_hvps"] <= HVPS_GOAL and error <= ACCURACY),
               "note": f"relative error {error:.1e} (needs <= {ACCURACY:g}); stops at residual "
                       f"<= {default['tol']:g}·λ; {default['iterations']} Lanczos steps + 1"})
  return rows


def run(quick: bool) -> list[dict]:
  rows = [_hvp_row("default MLP (40-256-256-10)", "mlp", (40,), 256, 5 if quick else 50)]
  resnet_batch = 16 if quick else 128
  rows.append(_hvp_row("ResNet-20 (CIFAR shapes)", "resnet20", (32, 32, 3), resnet_batch,
                       2 if quick else 10))
  rows += _lanczos_rows(256)
  return rows
