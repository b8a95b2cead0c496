"""SAM-GCM (nonuniform_jax.optim.sam_gcm) against a dense float64 covariance solve.

The oracle builds C = (1/b) Σ g_i g_iᵀ − ḡḡᵀ + ξI from brute-force per-example gradients
(vmap of grad) in numpy float64 and solves it densely; the library uses the centred Gram matrix
(Woodbury) when b < d and a d × d eigendecomposition otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from nonuniform_jax import optim
from nonuniform_jax.models import get_model

RHO = 0.05
XI = 1e-3
DIM = 4 * 8 + 8 + 8 * 3 + 3  # parameters of the MLP below: 67


def mlp_problem(batch, seed=0):
  model = get_model("mlp", 3, widths=(8,), activation="tanh")
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=batch))
  params = jax.jit(model.init)(jax.random.key(seed), x[:1])["params"]

  def example_loss(p, xi, yi):
    logits = model.apply({"params": p}, xi[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi)

  def loss(p):
    return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0, 0))(p, x, y))

  per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
  return params, loss, per_example


def dense_oracle(per_example, rho, xi):
  """ε = ρ C⁻¹ḡ / sqrt(ḡᵀC⁻¹ḡ) in float64, flat."""
  g_i = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(per_example), np.float64)
  b, d = g_i.shape
  g = g_i.mean(axis=0)
  c = g_i.T @ g_i / b - np.outer(g, g) + xi * np.eye(d)
  v = np.linalg.solve(c, g)
  return rho * v / np.sqrt(g @ v), c


@pytest.mark.parametrize("batch", [8, 150])  # b < d (Woodbury) and b > d (dense)
@pytest.mark.parametrize("xi", [XI, 1e-6])   # 1e-6: the paper's setting
def test_perturbation_matches_dense_solve(batch, xi):
  params, _, per_example = mlp_problem(batch)
  grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example)
  eps = ravel_pytree(optim.gcm_perturbation(grads, per_example, RHO, xi))[0]
  expected, c = dense_oracle(per_example, RHO, xi)
  assert expected.shape == (DIM,)
  np.testing.assert_allclose(eps, expected, atol=1e-4 * np.linalg.norm(expected))
  # On the ellipsoid εᵀCε = ρ², and not along the gradient (so the solve matters).
  e = np.asarray(eps, np.float64)
  np.testing.assert_allclose(e @ c @ e, RHO**2, rtol=1e-3)
  g = np.asarray(ravel_pytree(grads)[0], np.float64)
  assert abs(e @ g) / (np.linalg.norm(e) * np.linalg.norm(g)) < 0.99


def test_update_is_gradient_at_perturbed_point():
  params, loss, per_example = mlp_problem(8)
  grads = jax.grad(loss)(params)
  tx = optax.chain(optim.sam_gcm(RHO, XI), optax.sgd(0.1))
  updates, _ = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss),
                         per_example_grads=per_example)
  flat, unravel = ravel_pytree(params)
  eps, _ = dense_oracle(per_example, RHO, XI)
  expected = jax.grad(loss)(unravel(flat + jnp.asarray(eps, jnp.float32)))
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * g, rtol=1e-4, atol=1e-6),
               updates, expected)


def test_refuses_large_models_before_compiling():
  params, loss, per_example = mlp_problem(8)
  tx = optim.sam_gcm(RHO, XI, max_params=50)
  with pytest.raises(ValueError, match=f"{DIM} parameters.*max_params=50"):
    tx.init(params)

  @jax.jit
  def step(params, per_example):
    return tx.update(jax.grad(loss)(params), (), params, grad_fn=jax.grad(loss),
                     per_example_grads=per_example)

  with pytest.raises(ValueError, match=f"{DIM} parameters.*max_params=50"):
    step.lower(params, per_example)  # raised while tracing, before XLA compiles anything


@pytest.mark.parametrize("kwargs, shown", [({"rho": -1.0, "xi": XI}, "rho.*-1.0"),
                                           ({"rho": RHO, "xi": 0.0}, "xi.*0.0"),
                                           ({"rho": RHO, "xi": float("nan")}, "xi.*nan")])
def test_invalid_settings_raise(kwargs, shown):
  with pytest.raises(ValueError, match=shown):
    optim.sam_gcm(**kwargs)
