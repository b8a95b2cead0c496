"""The K-FAC structure of the per-example gradient noise: per layer, the Kronecker-factored
second moment G ⊗ A (the metric of CSAM-K-FAC and GAM, ``optim.kfac``) beside the exact trace,
and the effective rank of both, centred and not (docs/methods.md, Kronecker factors)."""

from typing import Any, Callable, Sequence

import jax.numpy as jnp

from nonuniform_jax import checks, pytree
from nonuniform_jax.measures import batching, captures
from nonuniform_jax.optim import kfac


def kfac_structure(capture_loss_fn: Callable, params, batches: Sequence[Any], *,
                   perturbations_fn: Callable, capture_bytes: int = captures.CAPTURE_BYTES,
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
    capture_loss_fn, perturbations_fn: as for the fast path (``measures.captures``).
    params, batches: as every measure. key: unused.
    capture_bytes: captures held at once (bounds memory, as in ``gradient_noise``).

  Returns:
    dict: ``layers`` ({layer: {the six values above}}), ``kfac_trace``, ``kfac_trace_centred``,
    ``trace_sigma`` and ``mean_sq_grad_norm`` (sums over layers), ``uncovered``, ``num_examples``,
    ``num_batches``.
  """
  del key
  groups = batching.group_batches(batches)
  checks.integer("capture_bytes", capture_bytes, 1)
  means = captures.capture_means(capture_loss_fn, perturbations_fn, params, groups,
                                 with_factors=True, capture_bytes=capture_bytes)
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
  layers = pytree.to_floats(layers)
  totals = {k: sum(v[k] for v in layers.values())
            for k in ("kfac_trace", "kfac_trace_centred", "trace_sigma", "mean_sq_grad_norm")}
  return {"layers": layers, **totals,
          "uncovered": captures.uncovered(params, capture_loss_fn, perturbations_fn, groups,
                                          with_norms=False),
          "num_examples": batching.total_examples(groups),
          "num_batches": batching.num_batches(groups)}
