"""Wu, Ma & E's nonuniformity s = sqrt(λ_max(mean_i H_i² − H²)) (NeurIPS 2018).

With per-example losses ℓ_i over the union of ``batches``, H_i = ∇²ℓ_i(θ) and H = mean_i H_i, s
is the spread of the per-example curvatures; with the sharpness a = λ_max(H)
(``measures.lambda_max``) it enters their linear-stability condition
(1 − ηa)² + η²(n − b)/(b(n − 1))·s² ≤ 1. Losses follow ``trace_sigma``'s conventions.

The eigensolver iterates on device (``hessian.eigsh``, a ``lax.while_loop``: no value read back
between products), so each product's loops over batches and chunks are ``lax`` loops too, unlike
tr Σ's host loops over jitted steps.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from nonuniform_jax import checks
from nonuniform_jax.measures import batching, hessian
from nonuniform_jax.per_example import LossFn, example_loss, masked_sum, scan_chunks
from nonuniform_jax.pytree import parameter_count

METHODS = ("power", "lanczos")


def _nonuniformity_matvec(loss_fn, per_example_loss_fn, params, groups, chunk_size, v):
  """M v = mean_i H_i (H_i v − H v) = (mean_i H_i² − H²) v over the union of ``groups``.

  H v comes from batched HVPs (``hessian.grouped_hvp``); then two per-example HVPs
  (forward-over-reverse, vmapped over a chunk) give H_i (H_i v − H v).
  """
  loss_of = example_loss(loss_fn, per_example_loss_fn)
  n = batching.total_examples(groups)
  hv = hessian.grouped_hvp(loss_fn, params, groups, v)

  def ex_hvp(example, u):
    return jax.jvp(jax.grad(lambda p: loss_of(p, example)), (params,), (u,))[1]

  def centred_square(acc, part, mask):
    w = jax.tree.map(jnp.subtract, jax.vmap(ex_hvp, in_axes=(0, None))(part, v), hv)
    z = jax.vmap(ex_hvp)(part, w)
    return otu.tree_add_scale(acc, 1.0 / n, masked_sum(z, mask))

  return batching.fold_batches(
      lambda acc, batch: scan_chunks(centred_square, acc, batch, chunk_size),
      otu.tree_zeros_like(v), groups)


@functools.partial(jax.jit, static_argnames=("chunk_size", "method", "num_iters", "tol"))
def _wu(loss_fn, per_example_loss_fn, params, groups, key, chunk_size, method, num_iters, tol):
  flat, unravel = ravel_pytree(params)

  def matvec(x):
    return ravel_pytree(_nonuniformity_matvec(loss_fn, per_example_loss_fn, params, groups,
                                              chunk_size, unravel(x)))[0]

  out = hessian.eigsh(matvec, flat.size, key=key, k=1, method=method, num_iters=num_iters,
                      tol=tol, dtype=flat.dtype)
  return out["eigenvalues"][0], out["residuals"][0], out["iterations"], out["converged"]


def wu_nonuniformity(loss_fn: LossFn, params, batches: Sequence[Any], *, key=None,
                     per_example_loss_fn: LossFn | None = None, chunk_size: int = 32,
                     method: str = "power", num_iters: int = 100, tol: float = 1e-3) -> dict:
  """Wu, Ma & E's nonuniformity s = sqrt(λ_max(M)), M = mean_i H_i² − H², over the union.

  M = mean_i (H_i − H)² is positive semi-definite, so its largest eigenvalue is also the largest
  in magnitude and power iteration on v ↦ M v = mean_i H_i(H_i v − H v) finds it. Each product
  costs one HVP per batch (H v) and two per-example HVPs per example (forward-over-reverse),
  ``chunk_size`` examples at a time; the iterations run on device (``hessian.eigsh``, which
  also offers ``method='lanczos'``: fewer products for the same accuracy). Iteration stops after
  ``num_iters`` products or once ‖M v − λ v‖ ≤ tol·|λ|. Meant for 256–1024 examples.

  The sharpness a = λ_max(H) of the stability condition is ``measures.lambda_max``.

  Returns:
    dict: ``nonuniformity`` (s = sqrt(max(λ, 0))), ``lambda_max`` (λ_max(M) = s²), ``residual``
    ‖M v − λ v‖, ``iterations``, ``converged``, and the settings ``method``, ``num_iters``,
    ``tol``, ``chunk_size``, ``seed``, ``num_examples``, ``num_batches``.
  """
  checks.integer("chunk_size", chunk_size, 1)
  checks.choice("method", method, METHODS)
  checks.integer("num_iters", num_iters, 1)
  checks.non_negative("tol", tol)
  dim = parameter_count(params)
  if method == "lanczos" and num_iters > dim:
    raise ValueError(f"num_iters={num_iters} exceeds the number of parameters {dim} for Lanczos")
  groups = batching.group_batches(batches)
  key, seed = batching.make_key(key)
  lam, residual, iterations, converged = _wu(
      batching.as_loss_pytree(loss_fn), batching.as_loss_pytree(per_example_loss_fn), params,
      groups, key, chunk_size=chunk_size, method=method, num_iters=num_iters, tol=float(tol))
  lam = float(lam)
  return dict(nonuniformity=max(lam, 0.0) ** 0.5, lambda_max=lam, residual=float(residual),
              iterations=int(iterations), converged=bool(converged), method=method,
              num_iters=num_iters, tol=float(tol), chunk_size=chunk_size, seed=seed,
              num_examples=batching.total_examples(groups),
              num_batches=batching.num_batches(groups))
