"""tr Cov(g_B), the noise of size-b batch gradients (those SGD with batch b steps with), measured
from disjoint batches beside its prediction from tr Σ (``trace_sigma``)."""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from nonuniform_jax import checks
from nonuniform_jax.measures import batching
from nonuniform_jax.measures.moments import merge_moments, moments_of, zero_moments
from nonuniform_jax.measures.trace_sigma import gradient_noise
from nonuniform_jax.per_example import LossFn, as_batch


@jax.jit
def _batch_grad_moments(moments, loss_fn, params, union, order, k):
  """``moments`` merged with the gradient of batch k, the examples order[k] of ``union``."""
  batch = jax.tree.map(lambda x: x[order[k]], union)
  g = jax.grad(loss_fn)(params, batch)
  return merge_moments(moments, moments_of(as_batch(g), jnp.ones((1,), bool)))


def batch_gradient_noise(loss_fn: LossFn, params, batches: Sequence[Any], batch_size: int, *,
                         key=None, per_example_loss_fn: LossFn | None = None,
                         chunk_size: int = 64, trace_sigma: float | None = None) -> dict:
  """tr Cov(g_B) of size-b batch gradients, from K = ⌊n/b⌋ disjoint batches of the union.

  The union of ``batches`` (n examples, in the order of ``batching.union``: equal-shaped
  batches keep theirs) is shuffled by ``jax.random.permutation(key, n)`` and its first K·b
  examples cut into batches B_1..B_K (K ≥ 2) with gradients g_k = ∇L_{B_k}. With
  S = Σ_k ‖g_k − mean_k g_k‖² and tr Σ the (biased) per-example trace::

      batch_noise                   S / (K − 1)
      batch_noise_predicted         n/(n − 1) · tr Σ / b
      batch_noise_finite            (n − b)/n · S / (K − 1)
      batch_noise_finite_predicted  (n − b)/(b(n − 1)) · tr Σ

  Over shuffles, E[batch_noise] = batch_noise_predicted exactly: the noise of size-b batches
  drawn from the population the n examples sample (the usual case of a measurement subset of a
  large training set). E[batch_noise_finite] = batch_noise_finite_predicted exactly: tr Cov(g_B)
  for batches drawn without replacement from these n examples themselves (Wu et al.'s factor).
  S/(K − 1) alone is not an estimate of the latter: when K·b = n it is K/(K − 1) times larger,
  because K disjoint batches exhaust the set (n − b)/n of the way.

  Args:
    loss_fn, params, batches, per_example_loss_fn, chunk_size: as in ``gradient_noise``.
    batch_size: b, e.g. the training batch size; at most n/2.
    key: PRNG key or int seed for the shuffle; None means seed 0.
    trace_sigma: tr Σ of these examples if already known (else ``gradient_noise`` computes it).

  Returns:
    dict of Python floats plus ``trace_sigma`` (used for the predictions), ``num_examples`` (n),
    ``batch_size``, ``num_batches`` (K) and ``seed``.
  """
  checks.integer("batch_size", batch_size, 1)
  groups = batching.group_batches(batches)
  n = batching.total_examples(groups)
  k = n // batch_size
  if k < 2:
    raise ValueError(f"batch_size {batch_size} leaves fewer than 2 disjoint batches of the "
                     f"{n} examples; choose batch_size <= {n // 2}")
  key, seed = batching.make_key(key)
  if trace_sigma is None:
    trace_sigma = gradient_noise(loss_fn, params, batches, per_example_loss_fn=per_example_loss_fn,
                                 chunk_size=chunk_size, method="chunked")["trace_sigma"]
  union = batching.union(groups)
  order = jax.random.permutation(key, n)[:k * batch_size].reshape(k, batch_size)
  moments = zero_moments(params)
  for j in range(k):  # a host loop over jitted steps, as in ``trace_sigma.gradient_moments``
    moments = _batch_grad_moments(moments, batching.as_loss_pytree(loss_fn), params, union,
                                  order, np.int32(j))
  spread = float(otu.tree_sum(moments.m2))
  noise, b = spread / (k - 1), batch_size
  return dict(batch_noise=noise, batch_noise_predicted=n / (n - 1) * trace_sigma / b,
              batch_noise_finite=(n - b) / n * noise,
              batch_noise_finite_predicted=(n - b) / (b * (n - 1)) * trace_sigma,
              trace_sigma=float(trace_sigma), num_examples=n, batch_size=b, num_batches=k,
              seed=seed)
