"""GAM: one SAM-like ascent along the Kronecker-factored natural gradient.

From the public code of "Beyond Sharpness: The Role of Nonuniformity in Generalization"
(AAAI 2025; no reported runs); docs/methods.md, GAM. With g1 = ∇L_B(θ),
F the Kronecker-factored second moment of per-example gradients (``nonuniform_jax.optim.kfac``)
and damping λ::

    v = (F + λI)⁻¹ g1,   q = g1ᵀ v
    r = 1 − q            if 1 − q > 0
      = 1 − exp(−q)      otherwise (the code's fallback; it also covers q = 1 exactly, where
                         the first form would divide by zero)
    ε = ρ · v / (sqrt(q) · sqrt(r) + eps)
    g* = ∇L_B(θ + ε)                                (the returned update)

Parameters outside the captured layers get v = 0 (``unfactored='zero'``) or v = g1
(``'identity'``: metric I there), as in CSAM.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from nonuniform_jax.optim import diagnostics, kfac
from nonuniform_jax.optim.sam import GradFn, add_trees, global_norm, validate_rho

DIAGNOSTICS = ("sam/grad_norm", "sam/eps_norm", "gam/q")


class GAMState(NamedTuple):
  """kfac: the running factors; diagnostics: the last step's ``sam/grad_norm``,
  ``sam/eps_norm`` and ``gam/q`` (``nonuniform_jax.optim.diagnostics``)."""
  kfac: kfac.KFACState
  diagnostics: dict


def gam(rho: float, *, kfac_layers: Sequence[str], damping: float = 1e-3,
        unfactored: str = "zero", schedule: kfac.Schedule = kfac.Schedule(),
        factor_init: str = "identity", inverse: str = "exact",
        eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  """GAM (module docstring) as an Optax transformation; chain it before the base optimizer.

  Call as ``tx.update(grads, state, params, grad_fn=grad_fn, kfac_factors=factors)`` exactly
  like ``csam(..., metric='kfac')`` (``kfac_due=`` too): two gradient evaluations per step (g1
  from the caller).

  Args:
    rho: radius ρ ≥ 0.
    kfac_layers: the captured layers (``kfac.layer_names(perturbations)``).
    damping: λ > 0.
    unfactored: 'zero' or 'identity', parameters without factors.
    schedule: when the statistics and the inverse refresh, and the running factors' decay
      (``kfac.Schedule``; the trainer's loop reads the same object to know which steps capture).
    factor_init: 'identity' or 'batch', where the running factors start (``kfac.init_state``).
    inverse: 'exact' or 'factored', the form of the damped inverse (``kfac.refresh_inverse``).
    eps: guards the normalisation.
  """
  validate_rho("rho", rho)
  kfac.validate_settings(damping=damping, unfactored=unfactored, layers=kfac_layers,
                         init=factor_init, inverse=inverse, schedule=schedule)

  def init_fn(params):
    return GAMState(kfac.init_state(params, kfac_layers, init=factor_init, inverse=inverse),
                    diagnostics.zeros(DIAGNOSTICS))

  def update_fn(grads, state, params=None, *, grad_fn: GradFn, kfac_factors=None,
                kfac_due: bool | None = None, **extra):
    del extra
    if params is None or kfac_factors is None:
      raise ValueError("gam needs params and kfac_factors: call tx.update(grads, state, params, "
                       "grad_fn=..., kfac_factors=...)")
    kstate = kfac.update_state(state.kfac, kfac_factors, schedule, due=kfac_due,
                               init=factor_init, inverse=inverse, damping=damping)
    v = kfac.precondition(grads, kstate.inverse, damping, unfactored)
    q = optax.tree_utils.tree_vdot(grads, v)
    r = jnp.where(1.0 - q > 0, 1.0 - q, 1.0 - jnp.exp(-q))
    scale = rho / (jnp.sqrt(q) * jnp.sqrt(r) + eps)
    perturbation = jax.tree.map(lambda x: scale * x, v)
    diag = diagnostics.scalars({"sam/grad_norm": global_norm(grads),
                                "sam/eps_norm": global_norm(perturbation), "gam/q": q})
    return grad_fn(add_trees(params, perturbation)), GAMState(kstate, diag)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
