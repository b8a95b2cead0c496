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
from tests.kfac_reference import Problem, dense_inverse

RHO, DAMPING = 0.05, 1e-2
SCALES = (0.1, 1.0, 10.0)  # q from well above 1 to well below; larger c is ill-conditioned in f32


def reference_gam(problem, factors, unfactored):
  flat, unravel = ravel_pytree(problem.params)
  grad = lambda v: np.asarray(ravel_pytree(problem.grad(unravel(
      jnp.asarray(v, jnp.float32))))[0], np.float64)
  g1 = grad(np.asarray(flat, np.float64))
  v = dense_inverse(problem.params, factors, DAMPING, unfactored) @ g1
  q = g1 @ v
  r = 1 - q if 1 - q > 0 else 1 - np.exp(-q)
  eps = RHO * v / (np.sqrt(q) * np.sqrt(r) + 1e-12)
  return q, eps, grad(np.asarray(flat, np.float64) + eps)


@pytest.fixture(scope="module")
def problem():
  return Problem()


@pytest.mark.parametrize("unfactored", ["zero", "identity"])
def test_gam_matches_the_reference_on_both_branches(problem, unfactored):
  batch = jax.tree.map(np.asarray, problem.batch_factors(problem.params))
  tx = optim.gam(RHO, kfac_layers=problem.layers, damping=DAMPING, unfactored=unfactored)

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
    q, eps, update = reference_gam(problem, factors, unfactored)
    got_update, got_eps, _ = step(tx.init(problem.params), factors)
    np.testing.assert_allclose(got_eps, eps, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(got_update, update, rtol=1e-3, atol=1e-5)
    branches.add(bool(1 - q > 0))
  assert branches == {True, False}
  assert step._cache_size() == 1


def test_gam_bad_arguments():
  with pytest.raises(ValueError, match="rho"):
    optim.gam(-1.0, kfac_layers=["Dense_0"])
  with pytest.raises(ValueError, match="kfac_layers"):
    optim.gam(0.1, kfac_layers=[])
  with pytest.raises(ValueError, match="zero.*identity"):
    optim.gam(0.1, kfac_layers=["Dense_0"], unfactored="none")
