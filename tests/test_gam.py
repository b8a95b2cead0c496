"""GAM (nonuniform_jax.optim.gam) against a hand-written reference step, both branches of its
second normalisation factor: sqrt(1 − q) when q = g1ᵀ(F + λI)⁻¹g1 < 1, sqrt(1 − exp(−q))
otherwise. The factors are the batch factors scaled by c, which moves q across 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from nonuniform_jax import optim
from nonuniform_jax.optim import kfac
from tests.kfac_reference import Problem, dense_inverse

RHO, DAMPING = 0.05, 1e-2
SCALES = (0.1, 1.0, 10.0)  # q from well above 1 to well below; larger c is ill-conditioned in f32


def reference_gam(problem, factors, unfactored, form="exact"):
  flat, unravel = ravel_pytree(problem.params)
  grad = lambda v: np.asarray(ravel_pytree(problem.grad(unravel(
      jnp.asarray(v, jnp.float32))))[0], np.float64)
  g1 = grad(np.asarray(flat, np.float64))
  v = dense_inverse(problem.params, factors, DAMPING, unfactored, form) @ g1
  q = g1 @ v
  r = 1 - q if 1 - q > 0 else 1 - np.exp(-q)
  eps = RHO * v / (np.sqrt(q) * np.sqrt(r) + 1e-12)
  return q, eps, grad(np.asarray(flat, np.float64) + eps)


@pytest.fixture(scope="module")
def problem():
  return Problem()


@pytest.mark.parametrize("unfactored,init,form", [
    ("zero", "batch", "exact"), ("identity", "batch", "exact"), ("zero", "batch", "factored")])
def test_gam_matches_the_reference_on_both_branches(problem, unfactored, init, form):
  """With init='batch' the first step's factors are the given ones, so c moves q."""
  batch = jax.tree.map(np.asarray, problem.batch_factors(problem.params))
  tx = optim.gam(RHO, kfac_layers=problem.layers, damping=DAMPING, unfactored=unfactored,
                 factor_init=init, inverse=form)

  @jax.jit
  def step(state, factors):
    points = []

    def grad_fn(p):
      points.append(p)
      return jax.grad(problem.loss)(p)

    grads = jax.grad(problem.loss)(problem.params)
    update, state = tx.update(grads, state, problem.params, grad_fn=grad_fn,
                              kfac_factors=factors)
    return ravel_pytree(update)[0], ravel_pytree(
        optax.tree_utils.tree_sub(points[0], problem.params))[0], state

  branches = set()
  for c in SCALES:
    factors = jax.tree.map(lambda f, c=c: c * f, batch)
    q, eps, update = reference_gam(problem, factors, unfactored, form)
    got_update, got_eps, state = step(tx.init(problem.params), factors)
    np.testing.assert_allclose(got_eps, eps, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(got_update, update, rtol=1e-3, atol=1e-5)
    diag = optim.step_diagnostics(state)
    np.testing.assert_allclose(diag["gam/q"], q, rtol=2e-3)
    np.testing.assert_allclose(diag["sam/eps_norm"], np.linalg.norm(eps), rtol=2e-3)
    branches.add(bool(1 - q > 0))
  assert branches == {True, False}
  assert step._cache_size() == 1


def test_gam_identity_init_blends_the_first_factors(problem):
  """The default init: the first step's metric is built from decay·I + (1 − decay)·X."""
  batch = jax.tree.map(np.asarray, problem.batch_factors(problem.params))
  tx = optim.gam(RHO, kfac_layers=problem.layers, damping=DAMPING,
                 schedule=kfac.Schedule(ema_decay=0.95))

  @jax.jit
  def first_point(state, factors):
    points = []
    tx.update(jax.grad(problem.loss)(problem.params), state, problem.params,
              grad_fn=lambda p: points.append(p) or jax.grad(problem.loss)(p),
              kfac_factors=factors)
    return ravel_pytree(optax.tree_utils.tree_sub(points[0], problem.params))[0]

  got = first_point(tx.init(problem.params), batch)
  blended = jax.tree.map(lambda x: 0.95 * np.eye(x.shape[0]) + 0.05 * x, batch)
  _, eps, _ = reference_gam(problem, blended, "zero")
  np.testing.assert_allclose(got, eps, rtol=2e-3, atol=1e-6)
  _, eps_batch, _ = reference_gam(problem, batch, "zero")
  assert np.linalg.norm(eps_batch - eps) > 0.1 * np.linalg.norm(eps)


def test_gam_bad_arguments():
  with pytest.raises(ValueError, match="rho"):
    optim.gam(-1.0, kfac_layers=["Dense_0"])
  with pytest.raises(ValueError, match="kfac_layers"):
    optim.gam(0.1, kfac_layers=[])
  with pytest.raises(ValueError, match="zero.*identity"):
    optim.gam(0.1, kfac_layers=["Dense_0"], unfactored="none")
  with pytest.raises(ValueError, match="init must be one of"):
    optim.gam(0.1, kfac_layers=["Dense_0"], factor_init="eye")
  with pytest.raises(ValueError, match="inverse must be one of"):
    optim.gam(0.1, kfac_layers=["Dense_0"], inverse="approx")
