"""CSAM ("consistent SAM", the paper's ``NonuniformSAM``) as an Optax transformation.

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025); docs/methods.md, CSAM.
Three gradient evaluations on the same minibatch B::

    g1 = ∇L_B(θ)                                   (supplied by the caller as ``grads``)
    ε1 = ρ1 · g1 / (‖g1‖ + eps)
    g2 = ∇L_B(θ + ε1),   δ = g2 − g1                ≈ ρ1 · H_B ĝ1
    m  ← α · m + (1 − α) · δ                        consistent momentum, m0 = 0, in the state
    d  = δ − m       (``momentum_sign=-1``; +1 gives δ + m, the authors' K-FAC class)
    ε2 = ρ2 · P(d)
    g3 = ∇L_B(θ + ε2)                               (the returned update)

d is the batch-to-batch fluctuation of the minibatch curvature along the gradient, so CSAM probes
nonuniformity where SAM probes sharpness. Metrics P:

* ``identity``: P(d) = d / (‖d‖ + eps);
* ``adaptive``: P(d) = T² ⊙ d / (‖T ⊙ d‖ + eps), T = |θ| + η on kernels, 1 elsewhere (ASAM);
* ``kfac``: v = (F + λI)⁻¹ d with F the Kronecker-factored second moment of per-example gradients
  (``nonuniform_jax.optim.kfac``), P(d) = v / sqrt(dᵀv + eps): the maximiser of dᵀε on the
  ellipsoid εᵀ(F + λI)ε ≤ ρ2². Parameters outside the captured layers get v = 0
  (``unfactored='zero'``, the authors' behaviour) or v = d (``'identity'``: metric I there).
"""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from nonuniform_jax import checks
from nonuniform_jax.optim import diagnostics, kfac
from nonuniform_jax.optim.sam import (GradFn, add_trees, asam_scale, global_norm,
                                      sam_perturbation, validate_rho)

METRICS = ("identity", "adaptive", "kfac")
DIAGNOSTICS = ("csam/grad_norm", "csam/eps1_norm", "csam/d_norm", "csam/d_dot_v",
               "csam/eps2_norm")


class CSAMState(NamedTuple):
  """momentum: the consistent momentum m (like params); kfac: ``KFACState`` or None;
  diagnostics: the last step's ``csam/*`` scalars (``nonuniform_jax.optim.diagnostics``)."""
  momentum: Any
  kfac: kfac.KFACState | None
  diagnostics: dict


def csam(rho1: float, rho2: float, alpha: float, *, metric: str = "identity", eta: float = 0.0,
         damping: float = 1e-3, momentum_sign: int = -1, unfactored: str = "zero",
         kfac_layers: Sequence[str] | None = None,
         schedule: kfac.Schedule = kfac.Schedule(), factor_init: str = "identity",
         inverse: str = "exact", eps: float = 1e-12,
         grouped: bool = False) -> optax.GradientTransformationExtraArgs:
  """CSAM (module docstring) as an Optax transformation; chain it before the base optimizer.

  Call as ``tx.update(grads, state, params, grad_fn=grad_fn)`` with ``grads`` = g1 and
  ``grad_fn(p)`` the gradient of the same minibatch loss at ``p`` (called twice, at top level).
  With ``metric='kfac'`` also pass ``kfac_factors=``: the batch ``{layer: kfac.Factors}`` of the
  clean pass, from ``kfac.loss_grad_and_factors(..., due=kfac.stats_due(opt_state))`` (which
  skips the statistics on steps that do not refresh them) or ``kfac.batch_factors(captures)``.
  A caller that knows the schedule (the trainer does) may also pass ``kfac_due=`` the same
  Python bool as ``due``: the factor update is then chosen while tracing (``kfac.update_state``).

  Example (``metric='kfac'``; ``per_example_loss`` as in ``kfac.loss_grad_and_captures``)::

    perts = zero_perturbations(model, {'params': params}, x)
    tx = optax.chain(csam(0.1, 0.2, 0.9, metric='kfac', kfac_layers=kfac.layer_names(perts)),
                     optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    out = kfac.loss_grad_and_factors(per_example_loss, params, perts, x, y,
                                     due=kfac.stats_due(state))
    mean_loss = lambda p: jnp.mean(per_example_loss(p, perts, x, y)[0])
    updates, state = tx.update(out.grads, state, params, grad_fn=jax.grad(mean_loss),
                               kfac_factors=out.factors)

  Args:
    rho1: radius of the SAM probe ε1 (authors: 0.1).
    rho2: radius of the nonuniformity step ε2 (authors: 0.2 CIFAR-10/MNIST, 0.4 CIFAR-100).
    alpha: momentum coefficient α ∈ [0, 1) of m.
    metric: 'identity', 'adaptive' or 'kfac'.
    eta: ASAM's η for ``metric='adaptive'``.
    damping: λ > 0 for ``metric='kfac'``.
    momentum_sign: −1 for d = δ − m (default), +1 for d = δ + m.
    unfactored: 'zero' or 'identity', parameters without factors under ``metric='kfac'``.
    kfac_layers: the captured layers (``kfac.layer_names(perturbations)``), for 'kfac'.
    schedule: when the statistics and the inverse refresh, and the running factors' decay
      (``kfac.Schedule``; the trainer's loop reads the same object to know which steps capture).
    factor_init: 'identity' (the running factors start at I) or 'batch' (the first statistics
      step takes the batch factors as they are): ``kfac.init_state``.
    inverse: 'exact' (the damped eigenbasis inverse) or 'factored' (factored Tikhonov damping):
      ``kfac.refresh_inverse``.
    eps: guards every normalisation.
    grouped: m-sharpness groups are not supported by CSAM (True raises).
  """
  validate_rho("rho1", rho1)
  validate_rho("rho2", rho2)
  if not checks.traced(alpha) and not 0.0 <= alpha < 1.0:
    raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
  if metric not in METRICS:
    raise ValueError(f"unknown CSAM metric {metric!r}; choose one of {METRICS}")
  if momentum_sign not in (-1, 1):
    raise ValueError(f"momentum_sign must be -1 (d = δ − m) or +1 (d = δ + m), got "
                     f"{momentum_sign!r}")
  if grouped:
    raise ValueError("csam does not support grouped (m-sharpness) mode; use grouped=False")
  if not isinstance(schedule, kfac.Schedule):
    raise ValueError(f"schedule must be a kfac.Schedule(stats_every, inverse_every, "
                     f"ema_decay), got {schedule!r}")
  if metric == "kfac":
    kfac.validate_settings(damping=damping, unfactored=unfactored, layers=kfac_layers,
                           init=factor_init, inverse=inverse, schedule=schedule)

  def init_fn(params):
    momentum = jax.tree.map(jnp.zeros_like, params)
    kstate = (kfac.init_state(params, kfac_layers, init=factor_init, inverse=inverse)
              if metric == "kfac" else None)
    return CSAMState(momentum, kstate, diagnostics.zeros(DIAGNOSTICS))

  def update_fn(grads, state, params=None, *, grad_fn: GradFn, kfac_factors=None,
                kfac_due: bool | None = None, **extra):
    del extra
    if params is None:
      raise ValueError("csam needs params: call tx.update(grads, state, params, grad_fn=...)")
    if metric == "kfac" and kfac_factors is None:
      raise ValueError("csam with metric='kfac' needs kfac_factors=... "
                       "(see kfac.loss_grad_and_factors)")
    eps1 = sam_perturbation(grads, params, rho1, eps=eps)
    g2 = grad_fn(add_trees(params, eps1))
    delta = optax.tree_utils.tree_sub(g2, grads)
    momentum = jax.tree.map(lambda m, dl: alpha * m + (1.0 - alpha) * dl, state.momentum, delta)
    d = jax.tree.map(lambda dl, m: dl + momentum_sign * m, delta, momentum)
    kstate = state.kfac
    if metric == "kfac":
      kstate = kfac.update_state(kstate, kfac_factors, schedule, due=kfac_due,
                                 init=factor_init, inverse=inverse, damping=damping)
      v = kfac.precondition(d, kstate.inverse, damping, unfactored)
      d_dot_v = optax.tree_utils.tree_vdot(d, v)
      scale = rho2 / jnp.sqrt(d_dot_v + eps)
      eps2 = jax.tree.map(lambda x: scale * x, v)
    else:
      eps2 = sam_perturbation(d, params, rho2, adaptive=metric == "adaptive", eta=eta, eps=eps)
      td = (jax.tree.map(jnp.multiply, asam_scale(params, eta), d) if metric == "adaptive"
            else d)
      d_dot_v = optax.tree_utils.tree_vdot(td, td)   # v = T²d: dᵀv = ‖Td‖²
    diag = diagnostics.scalars({
        "csam/grad_norm": global_norm(grads), "csam/eps1_norm": global_norm(eps1),
        "csam/d_norm": global_norm(d), "csam/d_dot_v": d_dot_v,
        "csam/eps2_norm": global_norm(eps2)})
    return grad_fn(add_trees(params, eps2)), CSAMState(momentum, kstate, diag)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


nonuniform_sam = csam
