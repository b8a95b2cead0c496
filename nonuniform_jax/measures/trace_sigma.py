"""tr Σ, the trace of the per-example gradient covariance, and the statistics that come with it.

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025) argues that the
spread of the per-example gradients, not only the sharpness, decides which minima SGD can stay
in. With per-example losses ℓ_i (i = 1..n, the union of ``batches``), g_i = ∇ℓ_i(θ) and
ḡ = mean_i g_i, ``gradient_noise`` gives tr Σ = mean_i ‖g_i − ḡ‖² = mean_i ‖g_i‖² − ‖ḡ‖² (and
n/(n−1)·tr Σ), per layer too, the adaptive tr Σ, the noise scale B_simple = tr Σ/‖ḡ‖²
(McCandlish et al. 2018), gradient diversity Σ_i‖g_i‖²/‖Σ_i g_i‖² (Yin et al., AISTATS 2018) and
the gradient signal-to-noise ratio ḡ_j²/Var_i(g_ij) per parameter (Liu et al., ICLR 2020).

Conventions (as every measure): ``loss_fn(params, batch) -> mean loss`` and ``batches`` a
sequence of batches (pytrees whose leaves have a leading example axis); the measure is over their
union. ``per_example_loss_fn(params, batch) -> [b]`` may be given; otherwise the loss of
example i is ``loss_fn`` on the single-example batch i (``nonuniform_jax.per_example``). Loss
functions may be ``jax.tree_util.Partial(f, state)`` to close over arrays (BatchNorm statistics)
without recompiling. Per-example gradients are computed ``chunk_size`` examples at a time
(``jax.vmap``), so memory grows with the chunk, not with n; a last partial chunk is masked, never
dropped.

Loops over batches and chunks are Python loops over jitted steps (asynchronous dispatch, no value
read back until the end), not ``lax`` loops: XLA:CPU runs convolutions inside a while loop about
7x slower than outside one (ResNet-20 per-example gradients, measured), and on accelerators the
dispatch costs nothing.

The fast path (``measures.captures``) gives the trace family from one capture pass per batch.
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from nonuniform_jax import checks, pytree
from nonuniform_jax.measures import batching, captures
from nonuniform_jax.measures.moments import Moments, merge_moments, moments_of, zero_moments
from nonuniform_jax.per_example import LossFn, chunk, num_chunks, num_examples, per_example_grads

METHODS = ("auto", "fast", "chunked")
# 'auto' reruns chunked when the fast path's tr Σ is below this fraction of mean‖g_i‖²: the
# fast path subtracts two float32 sums of that size.
CANCELLATION = 1e-3


# ---------------------------------------------------------------- per-parameter moments


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def chunk_moments(moments, loss_fn, per_example_loss_fn, params, batch, j, chunk_size):
  """``moments`` merged with those of the per-example gradients of chunk j of ``batch``
  (``per_example.chunk``): the compiled step that ``gradient_moments`` runs once per chunk."""
  part, mask = chunk(batch, chunk_size, j)
  grads = per_example_grads(loss_fn, params, part, per_example_loss_fn)
  return merge_moments(moments, moments_of(grads, mask))


def gradient_moments(loss_fn: LossFn, params, batches: Sequence[Any], *,
                     per_example_loss_fn: LossFn | None = None, chunk_size: int = 64) -> Moments:
  """Per-parameter mean and centred second moment of the per-example gradients over the union
  of ``batches``, ``chunk_size`` per-example gradients at a time: temporary memory about
  chunk_size·|θ| floats plus the model's activations for one chunk, whatever the number of
  examples, besides the 3·|θ| floats of moments carried between chunks. One compiled step per
  batch shape, called once per chunk from Python (module docstring).
  """
  checks.integer("chunk_size", chunk_size, 1)
  return _gradient_moments(loss_fn, per_example_loss_fn, params,
                           batching.group_batches(batches), chunk_size)


def _gradient_moments(loss_fn, per_example_loss_fn, params, groups, chunk_size) -> Moments:
  loss_fn = batching.as_loss_pytree(loss_fn)
  per_example_loss_fn = batching.as_loss_pytree(per_example_loss_fn)
  moments = zero_moments(params)
  for batch in batching.ungroup(groups):
    for j in range(num_chunks(num_examples(batch), chunk_size)):
      moments = chunk_moments(moments, loss_fn, per_example_loss_fn, params, batch, np.int32(j),
                              chunk_size=chunk_size)
  return moments


# ---------------------------------------------------------------- gradient_noise


def _trace_family(n, mean_sq, grad_sq, trace):
  return dict(trace_sigma=trace, trace_sigma_unbiased=trace * n / (n - 1), grad_norm_sq=grad_sq,
              mean_sq_grad_norm=mean_sq, noise_scale=trace / grad_sq,
              gradient_diversity=mean_sq / (n * grad_sq))


@jax.jit
def moment_statistics(moments: Moments, params) -> dict:
  """The chunked path's statistics (``gradient_noise``) from the moments of the per-example
  gradients at ``params``."""
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
      trace_sigma_layers={k: v / n for k, v in pytree.per_layer_sum(moments.m2).items()},
      trace_sigma_adaptive=adaptive,
      gsnr_mean=jnp.nanmean(gsnr),
      gsnr_median=jnp.nanmedian(gsnr),
      gsnr_num_params=jnp.sum(var > 0))


@jax.jit
def fast_statistics(means, n) -> dict:
  """The fast path's trace family (``gradient_noise``) from ``captures.capture_means`` over n
  examples."""
  sq = means["sq_norms"]
  grad_sq_layers = pytree.per_layer_sum(jax.tree.map(jnp.square, means["grads"]))
  grad_sq = otu.tree_vdot(means["grads"], means["grads"])
  # A model that is itself the captured layer is named '' (all of its parameters).
  layers = {k: sq[k] - (grad_sq_layers[k] if k else grad_sq) for k in sq}
  mean_sq = sum(sq.values())
  return {**_trace_family(n, mean_sq, grad_sq, mean_sq - grad_sq), "trace_sigma_layers": layers}


def _choose_method(method, params, capture_loss_fn, perturbations_fn, groups) -> tuple[str, str]:
  """(the method that runs, why) for ``method`` in METHODS."""
  if method == "chunked":
    return "chunked", "requested"
  if capture_loss_fn is None or perturbations_fn is None:
    if method == "fast":
      raise ValueError("method 'fast' needs capture_loss_fn and perturbations_fn; pass them or "
                       "choose 'chunked'")
    return "chunked", "no capture_loss_fn/perturbations_fn given"
  missing = captures.uncovered(params, capture_loss_fn, perturbations_fn, groups)
  if missing:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return "chunked", f"parameters not covered by captured layers: {shown}"
  return "fast", "every parameter is in a captured Dense/Conv/BatchNorm layer"


def gradient_noise(loss_fn: LossFn, params, batches: Sequence[Any], *,
                   per_example_loss_fn: LossFn | None = None, chunk_size: int = 64,
                   method: str = "auto", capture_loss_fn: Callable | None = None,
                   perturbations_fn: Callable | None = None,
                   capture_bytes: int = captures.CAPTURE_BYTES, key=None) -> dict:
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
  per-layer norms from one capture pass per batch (``measures.captures``) — about the cost
  of one batch gradient, but it gives only the trace family above, and computes tr Σ as
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
    capture_loss_fn, perturbations_fn: enable the fast path (``measures.captures``).
    key: unused (the statistics are exact); accepted for the common measure signature.

  Returns:
    dict of Python floats (``trace_sigma_layers`` a dict of them), plus ``num_examples``,
    ``num_batches``, ``chunk_size``, ``method`` and ``method_reason``.
  """
  del key
  checks.choice("method", method, METHODS)
  checks.integer("chunk_size", chunk_size, 1)
  checks.integer("capture_bytes", capture_bytes, 1)
  groups = batching.group_batches(batches)
  n = batching.total_examples(groups)
  if n < 2:
    raise ValueError(f"gradient noise needs at least 2 examples, got {n}")
  ran, reason = _choose_method(method, params, capture_loss_fn, perturbations_fn, groups)
  if ran == "fast":
    means = captures.capture_means(capture_loss_fn, perturbations_fn, params, groups,
                                   with_factors=False, capture_bytes=capture_bytes)
    out = pytree.to_floats(fast_statistics(means, n))
    if method == "auto" and out["trace_sigma"] < CANCELLATION * out["mean_sq_grad_norm"]:
      ran, reason = "chunked", (f"the fast path's tr Σ = {out['trace_sigma']:.3g} is below "
                                f"{CANCELLATION:g} of mean‖g_i‖² = {out['mean_sq_grad_norm']:.3g}"
                                f" (float32 cancellation); ran chunked")
  if ran != "fast":
    moments = _gradient_moments(loss_fn, per_example_loss_fn, params, groups, chunk_size)
    out = pytree.to_floats(moment_statistics(moments, params))
    out["gsnr_num_params"] = int(out["gsnr_num_params"])
  return {**out, "num_examples": n, "num_batches": batching.num_batches(groups),
          "chunk_size": chunk_size, "capture_bytes": capture_bytes, "method": ran,
          "method_reason": reason}
