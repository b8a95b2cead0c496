"""Batches, keys and loss functions prepared for the measures' jitted, on-device loops.

A measure over ``batches`` B_1..B_K (sizes n_b, n = Σ_b n_b) is over their union, so a mean over
batches is weighted by size: ``batch_mean(fn, groups) = Σ_b (n_b / n) · fn(B_b, b)``.
Batch sizes may differ, so batches are grouped by shape: every group of equal-shaped batches is
stacked along a new leading axis and visited by one ``lax.scan`` (memory of one batch, one
compiled body per group); a batch alone in its group is passed as it is. Random measures draw
batch b's randomness from ``fold_in(key, b)``, so results do not depend on the grouping.

Pytree arithmetic comes from ``optax.tree_utils`` and ``nonuniform_jax.pytree``; per-example
losses, gradients and chunks from ``nonuniform_jax.per_example``.
"""

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import Partial

import optax.tree_utils as otu

from nonuniform_jax.per_example import num_examples


def group_batches(batches) -> tuple:
  """Validates ``batches`` (a non-empty sequence of batches) and groups equal-shaped ones.

  Returns a tuple of ``(batch, index)`` pairs, a pytree to pass to a jitted function: either one
  batch with a scalar index, or a group of equal-shaped batches stacked along a new leading axis
  with their indices [count] (positions in ``batches``).
  """
  if isinstance(batches, (Mapping, np.ndarray, jax.Array)) or not hasattr(batches, "__iter__"):
    raise ValueError(f"batches must be a sequence of batches (e.g. a list of dicts), got "
                     f"{type(batches).__name__}")
  batches = list(batches)
  if not batches:
    raise ValueError("batches is empty; pass a sequence of at least one batch")
  groups: dict[Any, list[int]] = {}
  for i, batch in enumerate(batches):
    num_examples(batch)
    leaves, treedef = jax.tree.flatten(batch)
    signature = (treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
    groups.setdefault(signature, []).append(i)
  out = []
  for indices in groups.values():
    if len(indices) == 1:
      out.append((batches[indices[0]], np.int32(indices[0])))
    else:
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[batches[i] for i in indices])
      out.append((stacked, np.asarray(indices, np.int32)))
  return tuple(out)


def _group_sizes(batch, index) -> tuple[int, int]:
  """(examples per batch, batches) of one group, from static shapes."""
  leaf = jax.tree.leaves(batch)[0]
  if np.ndim(index) == 0:
    return np.shape(leaf)[0], 1
  return np.shape(leaf)[1], np.shape(index)[0]


def total_examples(groups) -> int:
  """n = Σ_b n_b over every batch in ``groups`` (a Python int, also under jit)."""
  return sum(size * count for size, count in (_group_sizes(b, i) for b, i in groups))


def num_batches(groups) -> int:
  """K, the number of batches in ``groups``."""
  return sum(_group_sizes(b, i)[1] for b, i in groups)


def ungroup(groups):
  """The batches of ``groups`` one by one, in group order (a stacked group is sliced)."""
  for batch, index in groups:
    if np.ndim(index) == 0:
      yield batch
    else:
      for i in range(np.shape(index)[0]):
        yield jax.tree.map(lambda x, i=i: x[i], batch)


def union(groups):
  """The union of the batches in ``groups`` as one batch: groups in order, the batches of a
  stacked group in their original order."""
  parts = [batch if np.ndim(index) == 0
           else jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
           for batch, index in groups]
  return jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *parts)


def fold_batches(fn, carry, groups):
  """carry ← fn(carry, batch) over every batch in ``groups`` (stacked groups in a scan)."""
  for batch, index in groups:
    if np.ndim(index) == 0:
      carry = fn(carry, batch)
    else:
      carry = lax.scan(lambda c, b: (fn(c, b), None), carry, batch)[0]
  return carry


def batch_mean(fn: Callable[[Any, jax.Array], Any], groups):
  """Σ_b (n_b / n) · fn(B_b, b): the size-weighted mean of a pytree-valued ``fn(batch, index)``
  over the batches in ``groups`` (from ``group_batches``). Traceable; stacked groups run in a
  ``lax.scan``."""
  n = total_examples(groups)
  total = None
  for batch, index in groups:
    size, _ = _group_sizes(batch, index)
    weight = size / n
    if np.ndim(index) == 0:
      part = otu.tree_scale(weight, fn(batch, index))
    else:
      first = jax.tree.map(lambda x: x[0], (batch, index))
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *first))

      def body(acc, xs, weight=weight):
        return otu.tree_add_scale(acc, weight, fn(*xs)), None

      part, _ = lax.scan(body, zero, (batch, index))
    total = part if total is None else otu.tree_add(total, part)
  return total


def as_loss_pytree(fn) -> Partial | None:
  """``fn`` as a pytree-valued callable, so it can be an ordinary argument of a jitted function.

  A plain function becomes ``Partial(fn)`` (compilations are then cached on ``fn``'s identity);
  None (an optional function not given) stays None. Pass ``jax.tree_util.Partial(f, state)``
  (called as ``f(state, params, batch)``) to close over arrays such as BatchNorm statistics
  without recompiling when they change: they are traced.
  """
  return fn if fn is None or isinstance(fn, Partial) else Partial(fn)


def make_key(key) -> tuple[jax.Array, Any]:
  """(a PRNG key, how to record it): ``None`` means seed 0; an int is a seed; else a key."""
  if key is None:
    key = 0
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key)), int(key)
  return key, np.asarray(jax.random.key_data(key)).tolist()
