"""Per-parameter moments of samples that arrive in parts (chunks of per-example gradients for
tr Σ, one batch gradient at a time for the batch noise), merged exactly."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from nonuniform_jax.per_example import masked_sum


class Moments(NamedTuple):
  """First and centred second moments of samples (e.g. per-example gradients), per parameter.

  count: samples seen (float32 scalar); mean: mean_i g_i; m2: Σ_i (g_i − mean)² elementwise.
  Accumulated in centred form (Chan, Golub & LeVeque 1979) rather than as Σg and Σg², so tr Σ
  does not lose its digits to the cancellation mean‖g_i‖² − ‖ḡ‖² when the noise is small.
  """
  count: jax.Array
  mean: Any
  m2: Any


def zero_moments(params) -> Moments:
  """No samples yet, for samples shaped like ``params``."""
  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  return Moments(jnp.zeros((), jnp.float32), zeros, zeros)


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Moments of the union of two disjoint sets of samples."""
  count = a.count + b.count
  w = b.count / jnp.maximum(count, 1.0)
  delta = otu.tree_sub(b.mean, a.mean)
  mean = jax.tree.map(lambda m, d: m + w * d, a.mean, delta)
  m2 = jax.tree.map(lambda x, y, d: x + y + a.count * w * d * d, a.m2, b.m2, delta)
  return Moments(count, mean, m2)


def moments_of(samples, mask) -> Moments:
  """Moments of the masked rows of ``samples`` (leaves [c, ...])."""
  samples = jax.tree.map(lambda x: x.astype(jnp.float32), samples)
  count = jnp.sum(mask, dtype=jnp.float32)
  mean = jax.tree.map(lambda s: s / jnp.maximum(count, 1.0), masked_sum(samples, mask))
  centred = jax.tree.map(lambda x, m: (x - m) ** 2, samples, mean)
  return Moments(count, mean, masked_sum(centred, mask))
