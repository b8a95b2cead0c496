"""Sharpness and nonuniformity measures on any loss over any pytree (no TensorFlow, no configs).

Every measure is ``fn(loss_fn, params, batches, ..., key=None)`` with
``loss_fn(params, batch) -> scalar mean loss`` and ``batches`` a sequence of batches; the measure
is over their union, weighted by batch size. Results are dicts with the settings used.

One module per idea: ``hessian`` (H v, λ_max, tr H, spectral density), ``sharpness`` (SAM,
worst-case, average, PAC-Bayes), ``trace_sigma`` (tr Σ and the gradient-noise statistics),
``batch_noise`` (tr Cov(g_B)), ``wu`` (Wu, Ma & E's s), ``kfac_noise`` (the K-FAC structure of
the noise), ``diagnostics``; beside them what they share: ``batching`` (batches grouped by shape),
``moments`` (per-parameter moments merged part by part), ``captures`` (the one-pass fast path).
"""

from nonuniform_jax.measures.hessian import (eigsh, esd_density, hessian_esd, hessian_trace, hvp,
                                             lambda_max, lanczos, slq, top_eigenvalues)
from nonuniform_jax.measures.sharpness import (average_sharpness, pacbayes_flatness, sam_sharpness,
                                               worst_case_sharpness)
from nonuniform_jax.measures.trace_sigma import gradient_moments, gradient_noise
from nonuniform_jax.measures.batch_noise import batch_gradient_noise
from nonuniform_jax.measures.wu import wu_nonuniformity
from nonuniform_jax.measures.kfac_noise import kfac_structure
from nonuniform_jax.measures.diagnostics import (activation_disparity,
                                                 channel_gradient_norm_variance,
                                                 class_loss_imbalance, nonuniformity_diagnostics,
                                                 update_moments)
from nonuniform_jax.per_example import per_example_grads, per_example_loss
