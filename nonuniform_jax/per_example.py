"""Per-example losses and gradients of a batch, and the chunks that bound their memory.

A batch is a pytree whose leaves share a leading example axis. The loss of example i is a loss
function evaluated on the batch of that one example: ``per_example_loss_fn(params, batch) -> [b]``
when the caller has one, else ``loss_fn(params, batch) -> mean loss`` (the mean over one example
is its loss). So a model whose output for one example depends on the others (BatchNorm with batch
statistics) has no per-example loss here.

Per-example work over a large batch runs ``chunk_size`` examples at a time (``jax.vmap`` over a
chunk): memory grows with the chunk, not with the batch. ``chunk`` slices chunk j in place with
a mask, so a last partial chunk is masked, never dropped; ``scan_chunks`` visits every chunk in
a ``lax.scan``.

Shared by the measures (tr Σ, Wu's s) and the optimizers that take per-example gradients
(SAM-GCM's caller, COV).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LossFn = Callable[[Any, Any], jax.Array]
"""``(params, batch) -> loss``: a batch's mean loss (scalar) or its per-example losses [b]."""


def num_examples(batch) -> int:
  """The size of the leading (example) axis shared by every leaf of ``batch``."""
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes or 0 in sizes:
    raise ValueError(f"batch leaves must share one non-empty leading example axis, got sizes "
                     f"{sizes}")
  return sizes.pop()


def as_batch(example):
  """One example (leaves without the example axis) as a batch of one."""
  return jax.tree.map(lambda x: x[None], example)


def example_loss(loss_fn: LossFn | None, per_example_loss_fn: LossFn | None = None):
  """ℓ(params, example) -> scalar, the loss of one example (leaves without the example axis):
  ``per_example_loss_fn`` on its batch of one when given (``loss_fn`` may then be None), else
  the mean loss ``loss_fn`` on it."""
  if per_example_loss_fn is None:
    return lambda params, example: loss_fn(params, as_batch(example))
  return lambda params, example: per_example_loss_fn(params, as_batch(example))[0]


def per_example_loss(loss_fn: LossFn) -> LossFn:
  """``per_example_loss_fn(params, batch) -> [b]`` from a mean-loss function, by evaluating
  ``loss_fn`` on each single-example batch (vmapped, so it costs one batched forward pass)."""
  def fn(params, batch):
    return jax.vmap(lambda example: loss_fn(params, as_batch(example)))(batch)
  return fn


def per_example_grads(loss_fn: LossFn | None, params, batch,
                      per_example_loss_fn: LossFn | None = None):
  """g_i = ∇ℓ_i(θ) for every example of ``batch`` (ℓ_i as in ``example_loss``): a pytree like
  ``params`` with a leading example axis [b, ...]. Materialises b gradients; the measures run it
  a chunk at a time (``chunk``)."""
  grad = jax.grad(example_loss(loss_fn, per_example_loss_fn))
  return jax.vmap(grad, in_axes=(None, 0))(params, batch)


# ---------------------------------------------------------------- chunks of a batch


def chunk(batch, chunk_size: int, j):
  """Chunk j < ⌈b/c⌉ of a batch of b examples, c = min(chunk_size, b), and its mask [c].

  The chunk holds examples [s, s + c) with s = min(j·c, b − c), sliced from ``batch`` in place
  (no padded copy). The last chunk may overlap the one before; the mask is False on the
  examples already visited, so every example counts exactly once and the loss never sees a
  made-up input.
  """
  b = num_examples(batch)
  c = min(chunk_size, b)
  start = jnp.minimum(j * c, b - c)
  part = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(jnp.asarray(x), start, c), batch)
  return part, start + jnp.arange(c) >= j * c


def num_chunks(b: int, chunk_size: int) -> int:
  return -(-b // min(chunk_size, b))


def scan_chunks(fn, carry, batch, chunk_size: int):
  """carry ← fn(carry, chunk, mask) over the chunks of ``batch`` (``chunk``) in a ``lax.scan``."""
  def body(carry, j):
    return fn(carry, *chunk(batch, chunk_size, j)), None

  steps = jnp.arange(num_chunks(num_examples(batch), chunk_size))
  return lax.scan(body, carry, steps)[0]


def masked_sum(tree, mask):
  """Σ_i mask_i x_i over the leading axis of every leaf (a contraction with the 0/1 weights:
  XLA:CPU runs it ~25x faster than a masked reduction)."""
  weights = mask.astype(jnp.float32)
  return jax.tree.map(lambda x: jnp.tensordot(weights, x, 1), tree)
