"""COV (nonuniform_jax.optim.cov) against jax.grad of (λa/2)·tr Σ_B by brute force.

The oracle computes tr Σ_B = (1/b) Σ ‖g_i‖² − ‖ḡ‖² from per-example gradients (vmap of grad)
and differentiates it with reverse mode (grad of grad); the library uses vmapped
forward-over-reverse Hessian-vector products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nonuniform_jax import optim
from nonuniform_jax.models import get_model
from nonuniform_jax.optim.cov import noise_factor


def brute_force_penalty_grad(example_loss, params, batch, n, lam):
  b = jax.tree.leaves(batch)[0].shape[0]
  a = (n - b) / (b * (n - 1))

  def penalty(p):
    g_i = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(p, batch)
    sq = sum(jnp.sum(g**2) / b for g in jax.tree.leaves(g_i))
    mean_sq = sum(jnp.sum(jnp.mean(g, axis=0)**2) for g in jax.tree.leaves(g_i))
    return 0.5 * lam * a * (sq - mean_sq)

  return jax.grad(penalty)(params)


def mlp_problem(batch=10):
  model = get_model("mlp", 3, widths=(8,), activation="tanh")
  rng = np.random.default_rng(0)
  data = {"x": jnp.asarray(rng.normal(size=(batch, 4)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 3, size=batch))}
  params = jax.jit(model.init)(jax.random.key(0), data["x"])["params"]

  def per_example_loss(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  def example_loss(p, ex):
    return per_example_loss(p, jax.tree.map(lambda v: v[None], ex))[0]

  return params, per_example_loss, example_loss, data


def two_parameter_problem(batch=100):
  """docs/experiments.md §2: y = θ1θ2x + e, x ~ 2N(0,1), θ1θ2 = −0.01, ℓ = ½(θ1θ2x − y)²."""
  rng = np.random.default_rng(0)
  x = 2 * rng.normal(size=batch)
  data = {"x": jnp.asarray(x, jnp.float32),
          "y": jnp.asarray(-0.01 * x + rng.normal(size=batch), jnp.float32)}
  params = jnp.asarray([0.1, 0.19], jnp.float32)

  def per_example_loss(p, batch):
    return 0.5 * (p[0] * p[1] * batch["x"] - batch["y"])**2

  def example_loss(p, ex):
    return 0.5 * (p[0] * p[1] * ex["x"] - ex["y"])**2

  return params, per_example_loss, example_loss, data


@pytest.mark.parametrize("problem, n, lam", [(mlp_problem, 50, 0.7),
                                             (two_parameter_problem, 5000, 0.3)])
def test_penalty_grad_matches_brute_force(problem, n, lam):
  params, per_example_loss, example_loss, data = problem()
  got = optim.cov_penalty_grad(per_example_loss, params, data, n, lam)
  expected = brute_force_penalty_grad(example_loss, params, data, n, lam)
  assert float(optim.global_norm(expected)) > 1e-4  # the penalty is not trivially zero
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7), got,
               expected)


def test_two_parameter_closed_form():
  """ℓ_i = ½r_i², r_i = θ1θ2x_i − y_i, g_i = r_i x_i (θ2, θ1):
  tr Σ = (θ1² + θ2²) · Var_i(r_i x_i), whose gradient is written out by hand."""
  params, per_example_loss, _, data = two_parameter_problem()
  n, lam = 5000, 0.3
  t1, t2 = np.float64(params[0]), np.float64(params[1])
  x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"], np.float64)
  b = len(x)
  u = (t1 * t2 * x - y) * x             # r_i x_i
  du = x**2                              # ∂u_i/∂(θ1θ2)
  var = np.mean(u**2) - np.mean(u)**2
  dvar = 2 * (np.mean(u * du) - np.mean(u) * np.mean(du))  # ∂Var/∂(θ1θ2)
  s = t1**2 + t2**2
  grad_tr = np.array([2 * t1 * var + s * dvar * t2, 2 * t2 * var + s * dvar * t1])
  expected = 0.5 * lam * (n - b) / (b * (n - 1)) * grad_tr
  got = optim.cov_penalty_grad(per_example_loss, params, data, n, lam)
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_transformation_chained_with_sgd():
  params, per_example_loss, example_loss, data = mlp_problem()
  n, lam, lr = 50, 0.7, 0.1
  grads = jax.grad(lambda p: jnp.mean(per_example_loss(p, data)))(params)
  tx = optax.chain(optim.cov(lam, n), optax.sgd(lr))
  updates, _ = tx.update(grads, tx.init(params), params, per_example_loss_fn=per_example_loss,
                         batch=data)
  penalty = brute_force_penalty_grad(example_loss, params, data, n, lam)
  expected = jax.tree.map(lambda g, h: -lr * (g + h), grads, penalty)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7), updates,
               expected)


def test_noise_factor():
  assert noise_factor(5000, 100) == pytest.approx(4900 / (100 * 4999))
  assert noise_factor(50, 50) == 0.0  # full batch: no gradient noise


@pytest.mark.parametrize("call, shown", [(lambda: optim.cov(-0.1, 100), "lam.*-0.1"),
                                         (lambda: optim.cov(0.1, 1), "n.*1"),
                                         (lambda: noise_factor(10, 20), "b=20, n=10")])
def test_invalid_settings_raise(call, shown):
  with pytest.raises(ValueError, match=shown):
    call()


def test_penalty_grad_centred_at_a_supplied_batch_gradient():
  """Passing g_B (what the transformation does, saving an all-reduce on devices) gives the same
  penalty as averaging the per-example gradients; a different centre gives another one."""
  params, per_example_loss, _, data = mlp_problem()
  n, lam = 50, 0.7
  g_b = jax.grad(lambda p: jnp.mean(per_example_loss(p, data)))(params)
  own = optim.cov_penalty_grad(per_example_loss, params, data, n, lam)
  given = optim.cov_penalty_grad(per_example_loss, params, data, n, lam, batch_grad=g_b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-8), given, own)
  off = optim.cov_penalty_grad(per_example_loss, params, data, n, lam,
                               batch_grad=jax.tree.map(jnp.zeros_like, g_b))
  assert float(optim.global_norm(jax.tree.map(jnp.subtract, off, own))) > 1e-3 * float(
      optim.global_norm(own))
