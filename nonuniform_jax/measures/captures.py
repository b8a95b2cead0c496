"""The fast path: one capture pass per batch instead of per-example gradients.

For models built from ``models.layers.Dense``/``Conv`` (and ``models.layers.BatchNorm`` applied
with its running statistics), one forward+backward pass per batch captures every layer's inputs
x̄_{i,t} and output gradients s_{i,t}, and ‖∇D_i‖² = Σ_{t,t'} (x̄_{i,t}·x̄_{i,t'})(s_{i,t}·s_{i,t'})
exactly (``kfac.per_example_sq_norms``; for BatchNorm ‖Σ_t x̂_{i,t} ⊙ s_{i,t}‖² + ‖Σ_t s_{i,t}‖²,
``kfac.norm_per_example_sq_norms``). ``capture_means`` averages these per-layer norms, the mean
gradient and optionally the Kronecker factors over the union of the batches; tr Σ
(``trace_sigma``) and the K-FAC structure (``kfac_noise``) are read from them.

It needs ``capture_loss_fn(params, perturbations, batch) -> (losses [b], 'kfac' collection)``
(the function ``kfac.loss_grad_and_captures`` takes) and ``perturbations_fn(batch) -> zero
perturbations`` (e.g. ``lambda b: layers.zero_perturbations(model, variables, b['x'])``).
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from nonuniform_jax import pytree
from nonuniform_jax.measures import batching
from nonuniform_jax.optim import kfac
from nonuniform_jax.per_example import num_examples

# The captures held at once (layer inputs, convolution patches, output gradients).
CAPTURE_BYTES = 256 * 2**20


def _capture_pass(capture_loss_fn, perturbations_fn, params, batch):
  return kfac.loss_grad_and_captures(capture_loss_fn, params, perturbations_fn(batch), batch)


def _means(capture_loss_fn, perturbations_fn, params, batch, with_factors: bool) -> dict:
  """One capture pass: per-layer mean_i ‖∇D_i‖², the mean gradient and optionally the factors."""
  out = _capture_pass(capture_loss_fn, perturbations_fn, params, batch)
  norms = {**kfac.per_example_sq_norms(out.captures),
           **kfac.norm_per_example_sq_norms(out.norm_captures)}
  result = {"sq_norms": {k: jnp.mean(v) for k, v in norms.items()}, "grads": out.grads}
  if with_factors:
    result["factors"] = kfac.batch_factors(out.captures)
  return result


@functools.partial(jax.jit, static_argnames=("with_factors",))
def _weighted(capture_loss_fn, perturbations_fn, params, batch, weight, with_factors):
  return otu.tree_scale(weight, _means(capture_loss_fn, perturbations_fn, params, batch,
                                       with_factors))


def capture_bytes_per_example(capture_loss_fn, perturbations_fn, params, batch) -> int:
  """Bytes of the captures (layer inputs or patches, output gradients) of one example, from
  shapes only (``jax.eval_shape``, nothing computed; traced once per model and shapes)."""
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), batch)
  shapes = jax.eval_shape(_capture_pass, batching.as_loss_pytree(capture_loss_fn),
                          batching.as_loss_pytree(perturbations_fn), params, one)
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree.leaves((shapes.captures, shapes.norm_captures)))


def capture_means(capture_loss_fn: Callable, perturbations_fn: Callable, params, groups,
                  with_factors: bool, capture_bytes: int) -> dict:
  """Over the union of ``groups`` (``batching.group_batches``): ``sq_norms`` {layer:
  mean_i ‖∇D_i‖²}, ``grads`` the mean gradient and, ``with_factors``, ``factors`` {layer:
  ``kfac.Factors``}, each the size-weighted mean of its parts.

  One jitted call per part of each batch holding as many consecutive examples as have captures
  within ``capture_bytes`` (at least one; a host loop, as in ``trace_sigma.gradient_moments``):
  memory is bounded by the budget, not the batch, and a small model's batch goes in one call.
  Exact, because the captured model's examples do not interact (BatchNorm is captured with its
  running statistics only).
  """
  capture_loss_fn = batching.as_loss_pytree(capture_loss_fn)
  perturbations_fn = batching.as_loss_pytree(perturbations_fn)
  n = batching.total_examples(groups)
  total = None
  chunk_size = None
  for batch in batching.ungroup(groups):
    if chunk_size is None:
      chunk_size = max(1, capture_bytes // capture_bytes_per_example(
          capture_loss_fn, perturbations_fn, params, batch))
    b = num_examples(batch)
    for start in range(0, b, chunk_size):
      stop = min(start + chunk_size, b)
      part = _weighted(capture_loss_fn, perturbations_fn, params,
                       jax.tree.map(lambda x, a=start, z=stop: x[a:z], batch),
                       np.float32((stop - start) / n), with_factors=with_factors)
      total = part if total is None else pytree.tree_add(total, part)
  return total


def uncovered(params, capture_loss_fn, perturbations_fn, groups,
              with_norms: bool = True) -> list[str]:
  """Parameters (paths) that no captured layer describes; from shapes only. ``with_norms``:
  captured BatchNorm layers (exact norms, no Kronecker factors) count as covered."""
  batch, index = groups[0]
  if np.ndim(index):
    batch = jax.tree.map(lambda x: x[0], batch)
  perturbations = jax.eval_shape(perturbations_fn, batch)
  covered = kfac.covered(params, kfac.layer_names(perturbations))
  if with_norms:
    norm_layers = set(kfac.norm_layer_names(perturbations))
    covered = jax.tree_util.tree_map_with_path(
        lambda path, ok: ok or pytree.layer_name(path) in norm_layers, covered)
  flat = jax.tree_util.tree_flatten_with_path(covered)[0]
  return [jax.tree_util.keystr(path) for path, ok in flat if not ok]
