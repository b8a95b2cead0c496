"""Sharpness and nonuniformity measures on any loss over any pytree (no TensorFlow, no configs).

Every measure is ``fn(loss_fn, params, batches, ..., key=None)`` with
``loss_fn(params, batch) -> scalar mean loss`` and ``batches`` a sequence of batches; the measure
is over their union, weighted by batch size. Results are dicts with the settings used.
"""

from nonuniform_jax.measures.hessian import (eigsh, esd_density, hessian_esd, hessian_trace, hvp,
                                             lambda_max, lanczos, slq, top_eigenvalues)
from nonuniform_jax.measures.sharpness import (average_sharpness, pacbayes_flatness, sam_sharpness,
                                               worst_case_sharpness)
from nonuniform_jax.measures.gradient_noise import (batch_gradient_noise, gradient_moments,
                                                    gradient_noise, kfac_structure,
                                                    per_example_grads, per_example_loss,
                                                    wu_nonuniformity)
from nonuniform_jax.measures.diagnostics import (activation_disparity,
                                                 channel_gradient_norm_variance,
                                                 class_loss_imbalance, nonuniformity_diagnostics,
                                                 update_moments)
