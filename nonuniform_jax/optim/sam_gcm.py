"""SAM-GCM: SAM whose ascent is shaped by the exact gradient covariance of the minibatch.

The optimizer of the paper's sparse-regression experiment ("Beyond Sharpness: The Role of
Nonuniformity in Generalization", AAAI 2025; docs/methods.md, SAM-GCM). With per-example
gradients g_i of the minibatch B (b examples), ḡ = (1/b) Σ_i g_i and the centred gradients
z_i = g_i − ḡ::

    C  = (1/b) Σ_i g_i g_iᵀ − ḡ ḡᵀ + ξ I  =  (1/b) ZᵀZ + ξ I          Z = [z_1; …; z_b] ∈ R^{b×d}
    ε  = ρ · C⁻¹g / sqrt(gᵀ C⁻¹ g + eps)
    g* = ∇L_B(θ + ε)                                                   (the returned update)

ε maximises gᵀε on the ellipsoid εᵀCε ≤ ρ²: the ascent is large where the minibatch noise is
small. When b < d, C⁻¹ is applied through the b × b Gram matrix of the centred gradients
(Woodbury, via the thin SVD of Z; see :func:`covariance_solve`), otherwise through a d × d
decomposition. Memory is about b·d + min(b, d)·d floats, hence the parameter limit
``max_params``.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from nonuniform_jax import checks
from nonuniform_jax.optim import diagnostics
from nonuniform_jax.optim.sam import add_trees, global_norm
from nonuniform_jax.pytree import parameter_count

GradFn = Callable[[Any], Any]


def check_size(params, max_params: int) -> None:
  """Refuses (ValueError) a model with more than ``max_params`` parameters."""
  count = parameter_count(params)
  if count > max_params:
    raise ValueError(f"sam_gcm needs the per-example gradient covariance: the model has {count} "
                     f"parameters, more than max_params={max_params}; use a smaller model or "
                     f"raise max_params")


def covariance_solve(g, per_example, xi: float):
  """C⁻¹g for flat ``g`` [d] and flat per-example gradients ``per_example`` [b, d].

  With the thin SVD Z = U S Vᵀ of the centred gradients (V ∈ R^{d×r}, r = min(b, d); the same
  as eigendecomposing the b × b Gram matrix ZZᵀ = U S² Uᵀ, without squaring the small singular
  values away in float32), C = V diag(s²/b) Vᵀ + ξI, so::

      b < d:  C⁻¹g = g/ξ − V [(s²/b) / (ξ (s²/b + ξ)) ⊙ Vᵀg]      (Woodbury: no d × d matrix)
      b ≥ d:  C⁻¹g = V [Vᵀg / (s²/b + ξ)]                           (V is d × d)
  """
  b, d = per_example.shape
  z = per_example - jnp.mean(per_example, axis=0)
  _, s, vt = jnp.linalg.svd(z, full_matrices=False)
  curvature = s**2 / b
  coef = vt @ g
  if b < d:
    return g / xi - vt.T @ (coef * curvature / (xi * (curvature + xi)))
  return vt.T @ (coef / (curvature + xi))


def gcm_perturbation(grads, per_example_grads, rho: float, xi: float, eps: float = 1e-12,
                     with_q: bool = False):
  """ε = ρ · C⁻¹g / sqrt(gᵀC⁻¹g + eps) (module docstring).

  Args:
    grads: g, a pytree (normally the mean of ``per_example_grads``).
    per_example_grads: the same pytree with a leading example axis b on every leaf; C is their
      centred covariance plus ξI.
    rho: radius of the ellipsoid εᵀCε ≤ ρ².
    xi: ξ > 0, the isotropic regulariser of C.
    eps: guards the normalisation.
    with_q: also return q = gᵀC⁻¹g.
  Returns:
    ε, a pytree like ``grads`` (and q with ``with_q``).
  """
  g, unravel = ravel_pytree(grads)
  per_example = jax.vmap(lambda t: ravel_pytree(t)[0])(per_example_grads)
  v = covariance_solve(g, per_example, xi)
  q = jnp.dot(g, v)
  perturbation = unravel(rho * v / jnp.sqrt(q + eps))
  return (perturbation, q) if with_q else perturbation


DIAGNOSTICS = ("sam/grad_norm", "sam/eps_norm", "sam_gcm/q")


class SAMGCMState(NamedTuple):
  """SAM-GCM keeps no state but its last step's diagnostics (``sam/grad_norm``,
  ``sam/eps_norm``, ``sam_gcm/q``: ``nonuniform_jax.optim.diagnostics``)."""
  diagnostics: dict


def sam_gcm(rho: float, xi: float, *, max_params: int = 1_000_000,
            eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  """SAM-GCM (docs/methods.md, SAM-GCM) as an Optax transformation.

  Call as ``tx.update(grads, state, params, grad_fn=grad_fn, per_example_grads=pe)`` where
  ``grads`` is the clean mean gradient of the minibatch at ``params``, ``grad_fn(p)`` the
  gradient of the same minibatch loss at ``p``, and ``pe`` the per-example gradients at
  ``params`` (the pytree of ``params`` with a leading example axis b, e.g.
  ``jax.vmap(jax.grad(loss_of_one_example), in_axes=(None, 0))(params, batch)``). Returns
  g* = ∇L_B(θ + ε) with ε from :func:`gcm_perturbation`; chain it with a base optimizer::

    tx = optax.chain(sam_gcm(5e-4, 1e-6), optax.sgd(0.05))

  Two gradient evaluations per step plus the per-example gradients; the paper's setting is
  ρ = 5e-4, ξ = 1e-6 (for b ≪ d the ascent has norm about ρ/√ξ along the directions without
  minibatch noise).

  Args:
    rho: radius ρ ≥ 0.
    xi: ξ > 0 added to the covariance.
    max_params: models with more parameters are refused (ValueError) at ``init`` and when
      ``update`` is traced, before anything is compiled.
    eps: guards the normalisation.
  """
  checks.non_negative("rho", rho)
  checks.positive("xi", xi)
  checks.positive("max_params", max_params)

  def init_fn(params):
    check_size(params, max_params)
    return SAMGCMState(diagnostics.zeros(DIAGNOSTICS))

  def update_fn(grads, state, params=None, *, grad_fn: GradFn, per_example_grads, **extra):
    del extra
    if params is None:
      raise ValueError("sam_gcm needs params: call tx.update(grads, state, params, grad_fn=..., "
                       "per_example_grads=...)")
    check_size(params, max_params)
    del state
    eps_tree, q = gcm_perturbation(grads, per_example_grads, rho, xi, eps, with_q=True)
    diag = diagnostics.scalars({"sam/grad_norm": global_norm(grads),
                                "sam/eps_norm": global_norm(eps_tree), "sam_gcm/q": q})
    return grad_fn(add_trees(params, eps_tree)), SAMGCMState(diag)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
