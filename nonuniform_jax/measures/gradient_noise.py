"""Nonuniformity: the magnitude and structure of the gradient noise over a set of examples.

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025) argues that the
spread of the per-example gradients and curvatures, not only the sharpness, decides which
minima SGD can stay in. With per-example losses ℓ_i (i = 1..n, the union of ``batches``),
g_i = ∇ℓ_i(θ), ḡ = mean_i g_i, H_i = ∇²ℓ_i(θ) and H = mean_i H_i:

* ``gradient_noise``: tr Σ = mean_i ‖g_i − ḡ‖² = mean_i ‖g_i‖² − ‖ḡ‖² (and n/(n−1)·tr Σ), per
  layer too, the adaptive tr Σ, the noise scale B_simple = tr Σ/‖ḡ‖² (McCandlish et al. 2018),
  gradient diversity Σ_i‖g_i‖²/‖Σ_i g_i‖² (Yin et al., AISTATS 2018) and the gradient
  signal-to-noise ratio ḡ_j²/Var_i(g_ij) per parameter (Liu et al., ICLR 2020).
* ``batch_gradient_noise``: tr Cov(g_B) of size-b batch gradients from disjoint batches, beside
  its prediction from tr Σ.
* ``wu_nonuniformity``: s = sqrt(λ_max(mean_i H_i² − H²)) (Wu, Ma & E, NeurIPS 2018), which
  with the sharpness a = λ_max(H) (``measures.lambda_max``) enters their linear-stability
  condition (1 − ηa)² + η²(n − b)/(b(n − 1))·s² ≤ 1.
* ``kfac_structure``: per layer the Kronecker-factored tr A·tr G, its centred version and
  effective rank, beside the exact per-layer tr Σ (``optim.kfac``; docs/methods.md, Kronecker
  factors).

Conventions (as every measure): ``loss_fn(params, batch) -> mean loss`` and ``batches`` a
sequence of batches (pytrees whose leaves have a leading example axis); the measure is over their
union. ``per_example_loss_fn(params, batch) -> [b]`` may be given; otherwise the loss of
example i is ``loss_fn`` on the single-example batch i. Loss functions may be
``jax.tree_util.Partial(f, state)`` to close over arrays (BatchNorm statistics) without
recompiling. Per-example quantities are computed ``chunk_size`` examples at a time (``jax.vmap``),
so memory grows with the chunk, not with n; a last partial chunk is masked, never dropped.

Loops over batches and chunks are Python loops over jitted steps (asynchronous dispatch, no value
read back until the end) except inside ``wu_nonuniformity``'s eigensolver, which is a
``lax.while_loop``: XLA:CPU runs convolutions inside a while loop about 7x slower than outside
one (ResNet-20 per-example gradients, measured), and on accelerators the dispatch costs nothing.

Fast exact path: for models built from ``models.layers.Dense``/``Conv`` (and
``models.layers.BatchNorm`` applied with its running statistics), one forward+backward pass per
batch captures every layer's inputs x̄_{i,t} and output gradients s_{i,t}, and
‖∇D_i‖² = Σ_{t,t'} (x̄_{i,t}·x̄_{i,t'})(s_{i,t}·s_{i,t'}) exactly (``kfac.per_example_sq_norms``;
for BatchNorm ‖Σ_t x̂_{i,t} ⊙ s_{i,t}‖² + ‖Σ_t s_{i,t}‖², ``kfac.norm_per_example_sq_norms``).
It needs ``capture_loss_fn(params, perturbations, batch) -> (losses [b], 'kfac' collection)``
(the function ``kfac.loss_grad_and_captures`` takes) and ``perturbations_fn(batch) -> zero
perturbations`` (e.g. ``lambda b: layers.zero_perturbations(model, variables, b['x'])``).
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax import lax
from jax.flatten_util import ravel_pytree

from nonuniform_jax.measures import _tree
from nonuniform_jax.measures import hessian
from nonuniform_jax.optim import kfac

LossFn = Callable[[Any, Any], jax.Array]
METHODS = ("auto", "fast", "chunked")
# 'auto' reruns chunked when the fast path's tr Σ is below this fraction of mean‖g_i‖²: the
# fast path subtracts two float32 sums of that size.
CANCELLATION = 1e-3
# The fast path's captures held at once (layer inputs, convolution patches, output gradients).
CAPTURE_BYTES = 256 * 2**20
EIGEN_METHODS = ("power", "lanczos")


def per_example_loss(loss_fn: LossFn) -> LossFn:
  """``per_example_loss_fn(params, batch) -> [b]`` from a mean-loss function, by evaluating
  ``loss_fn`` on each single-example batch (vmapped, so it costs one batched forward pass)."""
  def fn(params, batch):
    return jax.vmap(lambda example: loss_fn(params, _unsqueeze(example)))(batch)
  return fn


def _unsqueeze(example):
  return jax.tree.map(lambda x: x[None], example)


def _example_loss(loss_fn, per_example_loss_fn):
  """The loss of one example (leaves without the example axis) as a scalar function."""
  if per_example_loss_fn is None:
    return lambda params, example: loss_fn(params, _unsqueeze(example))
  return lambda params, example: per_example_loss_fn(params, _unsqueeze(example))[0]


def _as_pytree(fn):
  return None if fn is None else _tree.as_loss_pytree(fn)


# ---------------------------------------------------------------- batches and chunks


def _chunk(batch, chunk_size: int, j):
  """Chunk j < ⌈b/c⌉ of a batch of b examples, c = min(chunk_size, b), and its mask [c].

  The chunk holds examples [s, s + c) with s = min(j·c, b − c), sliced from ``batch`` in place
  (no padded copy). The last chunk may overlap the one before; the mask is False on the
  examples already visited, so every example counts exactly once and the loss never sees a
  made-up input.
  """
  b = _tree.num_examples(batch)
  c = min(chunk_size, b)
  start = jnp.minimum(j * c, b - c)
  part = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(jnp.asarray(x), start, c), batch)
  return part, start + jnp.arange(c) >= j * c


def _num_chunks(b: int, chunk_size: int) -> int:
  return -(-b // min(chunk_size, b))


def _scan_chunks(fn, carry, batch, chunk_size: int):
  """carry ← fn(carry, chunk, mask) over the chunks of ``batch`` (``_chunk``) in a ``lax.scan``."""
  def body(carry, j):
    return fn(carry, *_chunk(batch, chunk_size, j)), None

  steps = jnp.arange(_num_chunks(_tree.num_examples(batch), chunk_size))
  return lax.scan(body, carry, steps)[0]


def _union(groups):
  """The union of the batches in ``groups`` (``_tree.group_batches``) as one batch: groups in
  order, the batches of a stacked group in their original order."""
  parts = [batch if np.ndim(index) == 0
           else jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
           for batch, index in groups]
  return jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *parts)


def _masked_sum(tree, mask):
  """Σ_i mask_i x_i over the leading axis of every leaf (a contraction with the 0/1 weights:
  XLA:CPU runs it ~25x faster than a masked reduction)."""
  weights = mask.astype(jnp.float32)
  return jax.tree.map(lambda x: jnp.tensordot(weights, x, 1), tree)


def _for_each_batch(fn, carry, groups):
  """carry ← fn(carry, batch) over every batch in ``groups`` (stacked groups in a scan)."""
  for batch, index in groups:
    if np.ndim(index) == 0:
      carry = fn(carry, batch)
    else:
      carry = lax.scan(lambda c, b: (fn(c, b), None), carry, batch)[0]
  return carry


def _layer_name(path) -> str:
  """A parameter's layer: its parent module path joined by '/' (as ``kfac`` names layers), or
  the parameter's own name when it sits at the top of the tree."""
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return "/".join(keys[:-1] or keys)


def _per_layer_sum(tree) -> dict:
  """``{layer: Σ of the layer's entries}`` over the leaves of a parameter-shaped tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = _layer_name(path)
    out[name] = out.get(name, 0.0) + jnp.sum(leaf)
  return out


# ---------------------------------------------------------------- per-parameter moments


class Moments(NamedTuple):
  """First and centred second moments of per-example gradients, per parameter.

  count: examples seen (float32 scalar); mean: mean_i g_i; m2: Σ_i (g_i − mean)² elementwise.
  Accumulated in centred form (Chan, Golub & LeVeque 1979) rather than as Σg and Σg², so tr Σ
  does not lose its digits to the cancellation mean‖g_i‖² − ‖ḡ‖² when the noise is small.
  """
  count: jax.Array
  mean: Any
  m2: Any


def _zero_moments(params) -> Moments:
  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  return Moments(jnp.zeros((), jnp.float32), zeros, zeros)


def _merge(a: Moments, b: Moments) -> Moments:
  """Moments of the union of two disjoint sets of examples."""
  count = a.count + b.count
  w = b.count / jnp.maximum(count, 1.0)
  delta = otu.tree_sub(b.mean, a.mean)
  mean = jax.tree.map(lambda m, d: m + w * d, a.mean, delta)
  m2 = jax.tree.map(lambda x, y, d: x + y + a.count * w * d * d, a.m2, b.m2, delta)
  return Moments(count, mean, m2)


def _moments_of(samples, mask) -> Moments:
  """Moments of the masked rows of ``samples`` (leaves [c, ...])."""
  samples = jax.tree.map(lambda x: x.astype(jnp.float32), samples)
  count = jnp.sum(mask, dtype=jnp.float32)
  mean = jax.tree.map(lambda s: s / jnp.maximum(count, 1.0), _masked_sum(samples, mask))
  centred = jax.tree.map(lambda x, m: (x - m) ** 2, samples, mean)
  return Moments(count, mean, _masked_sum(centred, mask))


def per_example_grads(loss_fn: LossFn, params, batch, per_example_loss_fn=None):
  """g_i = ∇ℓ_i(θ) for every example of ``batch``: a pytree like ``params`` with a leading
  example axis [b, ...]. Materialises b gradients; ``gradient_noise`` chunks this."""
  example_loss = _example_loss(loss_fn, per_example_loss_fn)
  return jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _chunk_moments(moments, loss_fn, per_example_loss_fn, params, batch, j, chunk_size):
  """``moments`` merged with those of chunk j of ``batch``."""
  part, mask = _chunk(batch, chunk_size, j)
  grads = per_example_grads(loss_fn, params, part, per_example_loss_fn)
  return _merge(moments, _moments_of(grads, mask))


def _batches(groups):
  """The batches of ``groups`` one by one (a stacked group is sliced)."""
  for batch, index in groups:
    if np.ndim(index) == 0:
      yield batch
    else:
      for i in range(np.shape(index)[0]):
        yield jax.tree.map(lambda x, i=i: x[i], batch)


def gradient_moments(loss_fn: LossFn, params, batches: Sequence[Any], *,
                     per_example_loss_fn: LossFn | None = None, chunk_size: int = 64) -> Moments:
  """Per-parameter mean and centred second moment of the per-example gradients over the union
  of ``batches``, ``chunk_size`` per-example gradients at a time: temporary memory about
  chunk_size·|θ| floats plus the model's activations for one chunk, whatever the number of
  examples, besides the 3·|θ| floats of moments carried between chunks. One compiled step per
  batch shape, called once per chunk from Python (module docstring).
  """
  _tree.check_positive_int("chunk_size", chunk_size)
  return _gradient_moments(loss_fn, per_example_loss_fn, params, _tree.group_batches(batches),
                           chunk_size)


def _gradient_moments(loss_fn, per_example_loss_fn, params, groups, chunk_size) -> Moments:
  loss_fn, per_example_loss_fn = _as_pytree(loss_fn), _as_pytree(per_example_loss_fn)
  moments = _zero_moments(params)
  for batch in _batches(groups):
    for j in range(_num_chunks(_tree.num_examples(batch), chunk_size)):
      moments = _chunk_moments(moments, loss_fn, per_example_loss_fn, params, batch, np.int32(j),
                               chunk_size=chunk_size)
  return moments


# ---------------------------------------------------------------- gradient_noise


def _trace_family(n, mean_sq, grad_sq, trace):
  return dict(trace_sigma=trace, trace_sigma_unbiased=trace * n / (n - 1), grad_norm_sq=grad_sq,
              mean_sq_grad_norm=mean_sq, noise_scale=trace / grad_sq,
              gradient_diversity=mean_sq / (n * grad_sq))


@jax.jit
def _moment_statistics(moments: Moments, params) -> dict:
  n = moments.count
  trace = otu.tree_sum(moments.m2) / n                    # mean_i ‖g_i − ḡ‖²
  grad_sq = otu.tree_vdot(moments.mean, moments.mean)     # ‖ḡ‖²
  square = lambda p: jnp.square(p).astype(jnp.float32)
  adaptive = otu.tree_vdot(jax.tree.map(square, params), moments.m2) / n
  var = ravel_pytree(moments.m2)[0] / n
  signal = ravel_pytree(moments.mean)[0] ** 2
  gsnr = jnp.where(var > 0, signal / jnp.where(var > 0, var, 1.0), jnp.nan)
  return dict(
      **_trace_family(n, trace + grad_sq, grad_sq, trace),
      trace_sigma_layers={k: v / n for k, v in _per_layer_sum(moments.m2).items()},
      trace_sigma_adaptive=adaptive,
      gsnr_mean=jnp.nanmean(gsnr),
      gsnr_median=jnp.nanmedian(gsnr),
      gsnr_num_params=jnp.sum(var > 0))


def _fast_batch(capture_loss_fn, perturbations_fn, params, batch, with_factors: bool) -> dict:
  """One capture pass: per-layer mean_i ‖∇D_i‖², the mean gradient and optionally the factors."""
  out = kfac.loss_grad_and_captures(capture_loss_fn, params, perturbations_fn(batch), batch)
  norms = {**kfac.per_example_sq_norms(out.captures),
           **kfac.norm_per_example_sq_norms(out.norm_captures)}
  result = {"sq_norms": {k: jnp.mean(v) for k, v in norms.items()}, "grads": out.grads}
  if with_factors:
    result["factors"] = kfac.batch_factors(out.captures)
  return result


@functools.partial(jax.jit, static_argnames=("with_factors",))
def _fast_weighted(capture_loss_fn, perturbations_fn, params, batch, weight, with_factors):
  return otu.tree_scale(weight, _fast_batch(capture_loss_fn, perturbations_fn, params, batch,
                                            with_factors))


_tree_add = jax.jit(otu.tree_add)


def _capture_pass(capture_loss_fn, perturbations_fn, params, batch):
  return kfac.loss_grad_and_captures(capture_loss_fn, params, perturbations_fn(batch), batch)


def capture_bytes_per_example(capture_loss_fn, perturbations_fn, params, batch) -> int:
  """Bytes of the captures (layer inputs or patches, output gradients) of one example, from
  shapes only (``jax.eval_shape``, nothing computed; traced once per model and shapes)."""
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), batch)
  shapes = jax.eval_shape(_capture_pass, _as_pytree(capture_loss_fn),
                          _as_pytree(perturbations_fn), params, one)
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree.leaves((shapes.captures, shapes.norm_captures)))


def _fast_means(capture_loss_fn, perturbations_fn, params, groups, with_factors: bool,
                capture_bytes: int) -> dict:
  """Union means (part means weighted by size) of what ``_fast_batch`` returns, one jitted
  call per part of each batch holding as many consecutive examples as have captures within
  ``capture_bytes`` (at least one; a host loop, as in ``gradient_moments``): memory is bounded
  by the budget, not the batch, and a small model's batch goes in one call. Exact, because the
  captured model's examples do not interact (BatchNorm is captured with its running statistics
  only)."""
  capture_loss_fn, perturbations_fn = _as_pytree(capture_loss_fn), _as_pytree(perturbations_fn)
  n = _tree.total_examples(groups)
  total = None
  chunk_size = None
  for batch in _batches(groups):
    if chunk_size is None:
      chunk_size = max(1, capture_bytes // capture_bytes_per_example(
          capture_loss_fn, perturbations_fn, params, batch))
    b = _tree.num_examples(batch)
    for start in range(0, b, chunk_size):
      stop = min(start + chunk_size, b)
      part = _fast_weighted(capture_loss_fn, perturbations_fn, params,
                            jax.tree.map(lambda x, a=start, z=stop: x[a:z], batch),
                            np.float32((stop - start) / n), with_factors=with_factors)
      total = part if total is None else _tree_add(total, part)
  return total


@jax.jit
def _fast_statistics(means, n) -> dict:
  sq = means["sq_norms"]
  grad_sq_layers = _per_layer_sum(jax.tree.map(jnp.square, means["grads"]))
  grad_sq = otu.tree_vdot(means["grads"], means["grads"])
  # A model that is itself the captured layer is named '' (all of its parameters).
  layers = {k: sq[k] - (grad_sq_layers[k] if k else grad_sq) for k in sq}
  mean_sq = sum(sq.values())
  return {**_trace_family(n, mean_sq, grad_sq, mean_sq - grad_sq), "trace_sigma_layers": layers}


def _uncovered(params, capture_loss_fn, perturbations_fn, groups,
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
        lambda path, ok: ok or _layer_name(path) in norm_layers, covered)
  flat = jax.tree_util.tree_flatten_with_path(covered)[0]
  return [jax.tree_util.keystr(path) for path, ok in flat if not ok]


def _choose_method(method, params, capture_loss_fn, perturbations_fn, groups) -> tuple[str, str]:
  """(the method that runs, why) for ``method`` in METHODS."""
  if method == "chunked":
    return "chunked", "requested"
  if capture_loss_fn is None or perturbations_fn is None:
    if method == "fast":
      raise ValueError("method 'fast' needs capture_loss_fn and perturbations_fn; pass them or "
                       "choose 'chunked'")
    return "chunked", "no capture_loss_fn/perturbations_fn given"
  missing = _uncovered(params, capture_loss_fn, perturbations_fn, groups)
  if missing:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return "chunked", f"parameters not covered by captured layers: {shown}"
  return "fast", "every parameter is in a captured Dense/Conv/BatchNorm layer"


def _floats(tree):
  return jax.tree.map(float, jax.device_get(tree))


def gradient_noise(loss_fn: LossFn, params, batches: Sequence[Any], *,
                   per_example_loss_fn: LossFn | None = None, chunk_size: int = 64,
                   method: str = "auto", capture_loss_fn: Callable | None = None,
                   perturbations_fn: Callable | None = None, capture_bytes: int = CAPTURE_BYTES,
                   key=None) -> dict:
  """The gradient-noise statistics over the n examples of ``batches``.

  With g_i the per-example gradients, ḡ = mean_i g_i and θ the parameters::

      trace_sigma           tr Σ = mean_i ‖g_i − ḡ‖² = mean_i ‖g_i‖² − ‖ḡ‖²
      trace_sigma_unbiased  n/(n − 1) · tr Σ
      trace_sigma_layers    {layer: tr Σ restricted to the layer's parameters}
      grad_norm_sq          ‖ḡ‖²;   mean_sq_grad_norm: mean_i ‖g_i‖²
      noise_scale           B_simple = tr Σ / ‖ḡ‖²  (McCandlish et al. 2018, with the biased tr Σ)
      gradient_diversity    Σ_i ‖g_i‖² / ‖Σ_i g_i‖² = mean_i ‖g_i‖² / (n ‖ḡ‖²)  (Yin et al. 2018)
    and, from per-parameter moments (chunked path only):
      trace_sigma_adaptive  mean_i ‖(g_i − ḡ) ⊙ |θ|‖²  (c = |θ| on every parameter, as in
                            adaptive sharpness)
      gsnr_mean, gsnr_median  over parameters j of ḡ_j² / Var_i(g_ij), Var the biased variance
                            (Liu et al. 2020); parameters whose gradient never varies (Var = 0,
                            e.g. dead units) are left out; ``gsnr_num_params`` counts the rest.

  Methods: ``'chunked'`` accumulates per-parameter moments of per-example gradients
  (``chunk_size`` at a time, centred, so exact to float rounding). ``'fast'`` takes the exact
  per-layer norms from one capture pass per batch (module docstring) — about the cost of one
  batch gradient, but it gives only the trace family above, and computes tr Σ as
  mean‖g_i‖² − ‖ḡ‖² (float32 cancellation when tr Σ ≪ ‖ḡ‖²: ``'auto'`` reruns chunked when
  tr Σ < 1e-3·mean‖g_i‖², ``'fast'`` does not). It runs only when every parameter
  belongs to a captured layer (LayerNorms, embeddings, and BatchNorm in batch-statistics mode
  are not); otherwise
  ``'fast'`` and ``'auto'`` fall back to ``'chunked'``. ``'auto'`` picks ``'fast'`` whenever it
  can. ``method`` and ``method_reason`` in the result say what ran and why.

  Args:
    loss_fn: ``loss_fn(params, batch) -> mean loss``.
    params: the point θ (any pytree).
    batches: sequence of batches; the statistics are over their union.
    per_example_loss_fn: ``(params, batch) -> [b]`` losses; by default ``loss_fn`` on
      single-example batches.
    chunk_size: per-example gradients held at once on the chunked path (bounds memory; the
      result does not depend on it beyond float rounding).
    capture_bytes: the fast path's captures held at once (about 256 MiB by default; a small
      model's whole batch fits, a ResNet's convolution patches take tens of examples).
    method: one of ``METHODS``.
    capture_loss_fn, perturbations_fn: enable the fast path (module docstring).
    key: unused (the statistics are exact); accepted for the common measure signature.

  Returns:
    dict of Python floats (``trace_sigma_layers`` a dict of them), plus ``num_examples``,
    ``num_batches``, ``chunk_size``, ``method`` and ``method_reason``.
  """
  del key
  _tree.check_choice("method", method, METHODS)
  _tree.check_positive_int("chunk_size", chunk_size)
  _tree.check_positive_int("capture_bytes", capture_bytes)
  groups = _tree.group_batches(batches)
  n = _tree.total_examples(groups)
  if n < 2:
    raise ValueError(f"gradient noise needs at least 2 examples, got {n}")
  ran, reason = _choose_method(method, params, capture_loss_fn, perturbations_fn, groups)
  if ran == "fast":
    means = _fast_means(capture_loss_fn, perturbations_fn, params, groups, with_factors=False,
                        capture_bytes=capture_bytes)
    out = _floats(_fast_statistics(means, n))
    if method == "auto" and out["trace_sigma"] < CANCELLATION * out["mean_sq_grad_norm"]:
      ran, reason = "chunked", (f"the fast path's tr Σ = {out['trace_sigma']:.3g} is below "
                                f"{CANCELLATION:g} of mean‖g_i‖² = {out['mean_sq_grad_norm']:.3g}"
                                f" (float32 cancellation); ran chunked")
  if ran != "fast":
    moments = _gradient_moments(loss_fn, per_example_loss_fn, params, groups, chunk_size)
    out = _floats(_moment_statistics(moments, params))
    out["gsnr_num_params"] = int(out["gsnr_num_params"])
  return {**out, "num_examples": n, "num_batches": _num_batches(groups), "chunk_size": chunk_size,
          "capture_bytes": capture_bytes, "method": ran, "method_reason": reason}


def _num_batches(groups) -> int:
  return sum(1 if np.ndim(i) == 0 else np.shape(i)[0] for _, i in groups)


# ---------------------------------------------------------------- kfac_structure


def kfac_structure(capture_loss_fn: Callable, params, batches: Sequence[Any], *,
                   perturbations_fn: Callable, capture_bytes: int = CAPTURE_BYTES,
                   key=None) -> dict:
  """Kronecker-factored trace and structure of the per-example gradient second moment.

  Over the union of ``batches``, per captured layer l with factors A_l, G_l
  (``kfac.batch_factors``, averaged over batches by size) and mean gradient D̄_l::

      kfac_trace           tr A_l · tr G_l = tr(G_l ⊗ A_l) ≈ mean_i ‖∇D_{l,i}‖²  (uncentred)
      kfac_trace_centred   tr A_l · tr G_l − ‖D̄_l‖²
      effective_rank       tr(G_l ⊗ A_l)² / ‖G_l ⊗ A_l‖_F²  (``kfac.effective_rank``, uncentred)
      effective_rank_centred  the same of Σ̂_l = G_l ⊗ A_l − vec(D̄_l)vec(D̄_l)ᵀ, the centred
                           approximation of Σ_l (``kfac.effective_rank_centred``)
      mean_sq_grad_norm    exact mean_i ‖∇D_{l,i}‖²
      trace_sigma          exact tr Σ_l = mean_i ‖∇D_{l,i}‖² − ‖D̄_l‖²

  The totals (sums over layers) are returned beside the per-layer dicts; they cover only the
  captured layers (``uncovered`` lists the other parameters). One capture pass per batch.

  Args:
    capture_loss_fn, perturbations_fn: as for the fast path of ``gradient_noise``.
    params, batches: as every measure. key: unused.
    capture_bytes: captures held at once (bounds memory, as in ``gradient_noise``).

  Returns:
    dict: ``layers`` ({layer: {the six values above}}), ``kfac_trace``, ``kfac_trace_centred``,
    ``trace_sigma`` and ``mean_sq_grad_norm`` (sums over layers), ``uncovered``, ``num_examples``,
    ``num_batches``.
  """
  del key
  groups = _tree.group_batches(batches)
  _tree.check_positive_int("capture_bytes", capture_bytes)
  means = _fast_means(capture_loss_fn, perturbations_fn, params, groups, with_factors=True,
                      capture_bytes=capture_bytes)
  rank = kfac.effective_rank(means["factors"])
  mean_grads = kfac.to_layer_matrices(means["grads"], means["factors"])
  rank_centred = kfac.effective_rank_centred(means["factors"], mean_grads)
  layers = {}
  for name, f in means["factors"].items():
    grad_sq = jnp.sum(mean_grads[name] ** 2)
    kfac_trace = jnp.trace(f.a) * jnp.trace(f.g)
    sq = means["sq_norms"][name]
    layers[name] = dict(kfac_trace=kfac_trace, kfac_trace_centred=kfac_trace - grad_sq,
                        effective_rank=rank[name], effective_rank_centred=rank_centred[name],
                        mean_sq_grad_norm=sq,
                        trace_sigma=sq - grad_sq)
  layers = _floats(layers)
  totals = {k: sum(v[k] for v in layers.values())
            for k in ("kfac_trace", "kfac_trace_centred", "trace_sigma", "mean_sq_grad_norm")}
  return {"layers": layers, **totals,
          "uncovered": _uncovered(params, capture_loss_fn, perturbations_fn, groups,
                                  with_norms=False),
          "num_examples": _tree.total_examples(groups), "num_batches": _num_batches(groups)}


# ---------------------------------------------------------------- batch_gradient_noise


@jax.jit
def _batch_grad_moments(moments, loss_fn, params, union, order, k):
  """``moments`` merged with the gradient of batch k, the examples order[k] of ``union``."""
  batch = jax.tree.map(lambda x: x[order[k]], union)
  g = jax.grad(loss_fn)(params, batch)
  return _merge(moments, _moments_of(_unsqueeze(g), jnp.ones((1,), bool)))


def batch_gradient_noise(loss_fn: LossFn, params, batches: Sequence[Any], batch_size: int, *,
                         key=None, per_example_loss_fn: LossFn | None = None,
                         chunk_size: int = 64, trace_sigma: float | None = None) -> dict:
  """tr Cov(g_B) of size-b batch gradients, from K = ⌊n/b⌋ disjoint batches of the union.

  The union of ``batches`` (n examples, in the order of ``_union``: equal-shaped batches keep
  theirs) is shuffled by ``jax.random.permutation(key, n)`` and its first K·b examples cut into
  batches B_1..B_K (K ≥ 2) with gradients g_k = ∇L_{B_k}. With S = Σ_k ‖g_k − mean_k g_k‖² and
  tr Σ the (biased) per-example trace::

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
  _tree.check_positive_int("batch_size", batch_size)
  groups = _tree.group_batches(batches)
  n = _tree.total_examples(groups)
  k = n // batch_size
  if k < 2:
    raise ValueError(f"batch_size {batch_size} leaves fewer than 2 disjoint batches of the "
                     f"{n} examples; choose batch_size <= {n // 2}")
  key, seed = _tree.make_key(key)
  if trace_sigma is None:
    trace_sigma = gradient_noise(loss_fn, params, batches, per_example_loss_fn=per_example_loss_fn,
                                 chunk_size=chunk_size, method="chunked")["trace_sigma"]
  union = _union(groups)
  order = jax.random.permutation(key, n)[:k * batch_size].reshape(k, batch_size)
  moments = _zero_moments(params)
  for j in range(k):  # a host loop over jitted steps, as in ``gradient_moments``
    moments = _batch_grad_moments(moments, _as_pytree(loss_fn), params, union, order,
                                  np.int32(j))
  spread = float(otu.tree_sum(moments.m2))
  noise, b = spread / (k - 1), batch_size
  return dict(batch_noise=noise, batch_noise_predicted=n / (n - 1) * trace_sigma / b,
              batch_noise_finite=(n - b) / n * noise,
              batch_noise_finite_predicted=(n - b) / (b * (n - 1)) * trace_sigma,
              trace_sigma=float(trace_sigma), num_examples=n, batch_size=b, num_batches=k,
              seed=seed)


# ---------------------------------------------------------------- wu_nonuniformity


def _nonuniformity_matvec(loss_fn, per_example_loss_fn, params, groups, chunk_size, v):
  """M v = mean_i H_i (H_i v − H v) = (mean_i H_i² − H²) v over the union of ``groups``.

  H v comes from batched HVPs (``hessian``); then two per-example HVPs (forward-over-reverse,
  vmapped over a chunk) give H_i (H_i v − H v).
  """
  example_loss = _example_loss(loss_fn, per_example_loss_fn)
  n = _tree.total_examples(groups)
  hv = hessian._hvp(loss_fn, params, groups, v)

  def ex_hvp(example, u):
    return jax.jvp(jax.grad(lambda p: example_loss(p, example)), (params,), (u,))[1]

  def centred_square(acc, part, mask):
    w = jax.tree.map(jnp.subtract, jax.vmap(ex_hvp, in_axes=(0, None))(part, v), hv)
    z = jax.vmap(ex_hvp)(part, w)
    return otu.tree_add_scale(acc, 1.0 / n, _masked_sum(z, mask))

  return _for_each_batch(lambda acc, batch: _scan_chunks(centred_square, acc, batch, chunk_size),
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
  _tree.check_positive_int("chunk_size", chunk_size)
  _tree.check_choice("method", method, EIGEN_METHODS)
  _tree.check_positive_int("num_iters", num_iters)
  _tree.check_nonnegative("tol", tol)
  dim = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  if method == "lanczos" and num_iters > dim:
    raise ValueError(f"num_iters={num_iters} exceeds the number of parameters {dim} for Lanczos")
  groups = _tree.group_batches(batches)
  key, seed = _tree.make_key(key)
  lam, residual, iterations, converged = _wu(
      _as_pytree(loss_fn), _as_pytree(per_example_loss_fn), params, groups, key,
      chunk_size=chunk_size, method=method, num_iters=num_iters, tol=float(tol))
  lam = float(lam)
  return dict(nonuniformity=max(lam, 0.0) ** 0.5, lambda_max=lam, residual=float(residual),
              iterations=int(iterations), converged=bool(converged), method=method,
              num_iters=num_iters, tol=float(tol), chunk_size=chunk_size, seed=seed,
              num_examples=_tree.total_examples(groups), num_batches=_num_batches(groups))
