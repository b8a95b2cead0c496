"""Per-step diagnostics of the SAM family: how far each ascent actually went.

Every SAM-family transformation keeps the scalars of its last update in its state's
``diagnostics`` field (``{name: float32 scalar}``, zeros before the first update, the same keys
at every step, so the state's structure never changes), and ``step_diagnostics`` collects them
from anywhere in an ``optax.chain`` state. All norms are Euclidean norms over the whole pytree.

=========================  ===================================================================
key                        value
=========================  ===================================================================
``sam/grad_norm``          ‖g1‖, the clean gradient (SAM, ASAM, GAM, SAM-GCM; with m-sharpness
                           groups: the mean over the groups of each group's ‖g1‖)
``sam/eps_norm``           ‖ε‖, the ascent taken (SAM: ρ; ASAM: ρ‖T²g‖/‖Tg‖; GAM, SAM-GCM: up
                           to ρ/√(smallest eigenvalue of their metric); groups: the mean)
``gam/q``                  q = g1ᵀ(F + λI)⁻¹g1, which decides GAM's normalisation branch
``sam_gcm/q``              gᵀC⁻¹g of SAM-GCM's covariance solve
``csam/grad_norm``         ‖g1‖
``csam/eps1_norm``         ‖ε1‖ = ρ1 (unless g1 = 0)
``csam/d_norm``            ‖d‖, d = δ ∓ m the fluctuation CSAM ascends along
``csam/d_dot_v``           dᵀv with v the metric's direction before normalisation: identity
                           v = d (‖d‖²), adaptive v = T²d (‖Td‖²), K-FAC v = (F + λI)⁻¹d;
                           ε2 = ρ2·v/√(dᵀv)
``csam/eps2_norm``         ‖ε2‖: ρ2 for identity; for K-FAC up to ρ2/√(λ + smallest eigenvalue
                           of F) along the directions where F is small
``cov/grad_norm``          ‖g_B‖
``cov/penalty_grad_norm``  ‖∇((aλ/2) tr Σ_B)‖, COV's added gradient
``kfac/<layer>/a_min``     smallest eigenvalue of the layer's running factor A at the last
                           inverse refresh (``a_max``, ``g_min``, ``g_max`` alike); CSAM-K-FAC
                           and GAM only
``kfac/f_min``             smallest eigenvalue of the block-diagonal F = ⊕ G ⊗ A at the last
                           refresh (min over layers of a_min·g_min; ``kfac/f_max`` alike)
=========================  ===================================================================

The ``kfac/*`` values are read from the eigenvalues the state holds, so they change only at an
inverse refresh; a trainer that averages step metrics over a logging window averages them too.
"""

import jax
import jax.numpy as jnp

from nonuniform_jax.optim import kfac


def zeros(keys) -> dict:
  """``{key: 0.0}`` (float32 scalars): the diagnostics of a state before its first update."""
  return {k: jnp.zeros((), jnp.float32) for k in keys}


def scalars(values: dict) -> dict:
  """``{key: float32 scalar}``: a state's ``diagnostics`` from ``{key: value}``."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def _has_diagnostics(node) -> bool:
  return isinstance(node, tuple) and "diagnostics" in getattr(node, "_fields", ())


def step_diagnostics(opt_state) -> dict:
  """``{key: float32 scalar}``: the diagnostics of the last update of every SAM-family
  transformation inside ``opt_state`` (any nesting of ``optax.chain`` and the like), plus the
  eigenvalue ranges of each K-FAC state (module docstring). Empty for other optimizers. Raises
  ValueError when two transformations report the same key."""
  out = {}
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_has_diagnostics)
           if _has_diagnostics(s)]
  for values in [s.diagnostics for s in found] + [
      kfac.spectrum_diagnostics(s) for s in kfac.states(opt_state)]:
    clash = sorted(set(values) & set(out))
    if clash:
      raise ValueError(f"diagnostics {clash} reported by two transformations of one chain")
    out.update({k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
  return out
