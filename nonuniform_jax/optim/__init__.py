"""The SAM family as Optax gradient transformations (no TensorFlow, no configs)."""

from nonuniform_jax.optim import kfac
from nonuniform_jax.optim.cov import cov, cov_penalty_grad
from nonuniform_jax.optim.diagnostics import step_diagnostics
from nonuniform_jax.optim.csam import csam, nonuniform_sam
from nonuniform_jax.optim.gam import gam
from nonuniform_jax.optim.sam import asam_scale, global_norm, sam, sam_perturbation
from nonuniform_jax.optim.sam_gcm import gcm_perturbation, sam_gcm

__all__ = ["asam_scale", "global_norm", "sam", "sam_perturbation"]
__all__ += ["cov", "cov_penalty_grad", "gcm_perturbation", "sam_gcm"]
__all__ += ["csam", "gam", "kfac", "nonuniform_sam", "step_diagnostics"]
