"""SAM and ASAM (nonuniform_jax.optim.sam) against hand-written two-pass references.

The references flatten the parameters with ravel_pytree, take both gradients with jax.grad and
write ε explicitly; they never call sam_perturbation, asam_scale or is_kernel.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from nonuniform_jax import optim
from nonuniform_jax.models import get_model

RHO = 0.5
ETA = 0.1


def mlp_problem(batch=12, seed=0):
  model = get_model("mlp", 3, widths=(8,))
  rng = np.random.default_rng(seed)  # numpy data: nothing to compile
  x = jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=batch))
  params = jax.jit(model.init)(jax.random.key(seed), x)["params"]  # one compilation

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  return params, loss, x, y


def reference_t(params, eta):
  """ASAM's T written from the parameter names: |θ|+η on 'kernel', 1 elsewhere."""
  flat = traverse_util.flatten_dict(params)
  t = {k: (np.abs(v) + eta if k[-1] == "kernel" else np.ones_like(v)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(t)


def reference_step(loss, params, x, y, rho, adaptive=False, eta=0.0):
  """g* = ∇L(θ + ε), ε = ρ T² g / ‖T g‖ (T = 1 for SAM), as a pytree."""
  flat, unravel = ravel_pytree(params)
  f = lambda v: loss(unravel(v), x, y)
  g = np.asarray(jax.grad(f)(flat), np.float64)
  t = np.asarray(ravel_pytree(reference_t(params, eta))[0], np.float64) if adaptive else 1.0
  eps = rho * t**2 * g / (np.linalg.norm(t * g) + 1e-12)
  return unravel(jax.grad(f)(flat + jnp.asarray(eps, jnp.float32)))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def trees_differ(a, b, tol=1e-3):
  return float(optim.global_norm(jax.tree.map(jnp.subtract, a, b))) > tol


@pytest.mark.parametrize("adaptive", [False, True])
def test_update_matches_two_pass_reference(adaptive):
  params, loss, x, y = mlp_problem()
  tx = optim.sam(RHO, adaptive=adaptive, eta=ETA)
  grads = jax.grad(loss)(params, x, y)
  update, _ = tx.update(grads, tx.init(params), params,
                        grad_fn=lambda p: jax.grad(loss)(p, x, y))
  expected = reference_step(loss, params, x, y, RHO, adaptive, ETA)
  assert_trees_close(update, expected)
  assert trees_differ(update, grads)  # the perturbation matters at this ρ


@pytest.mark.parametrize("adaptive", [False, True])
def test_grouped_update_matches_loop_over_groups(adaptive):
  groups = 3
  params, loss, x, y = mlp_problem()
  xg, yg = x.reshape(groups, -1, x.shape[-1]), y.reshape(groups, -1)
  group_grad = jax.vmap(jax.grad(loss))  # params with a leading group axis
  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xg, yg)
  tx = optim.sam(RHO, adaptive=adaptive, eta=ETA, grouped=True)
  update, _ = tx.update(grads, tx.init(params), params,
                        grad_fn=lambda p: group_grad(p, xg, yg))
  per_group = [reference_step(loss, params, xg[k], yg[k], RHO, adaptive, ETA)
               for k in range(groups)]
  expected = jax.tree.map(lambda *g: sum(g) / groups, *per_group)
  assert_trees_close(update, expected)
  # Each group's own ε differs from the whole batch's ε.
  assert trees_differ(update, reference_step(loss, params, x, y, RHO, adaptive, ETA))


def quadratic(seed=0, dim=5):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(dim, dim))
  q = a @ a.T + np.eye(dim)
  theta = rng.normal(size=dim)
  return q, theta


def test_quadratic_closed_form():
  """f(θ) = ½θᵀQθ: g* = Q(θ + ρ Qθ/‖Qθ‖)."""
  q, theta = quadratic()
  qj = jnp.asarray(q, jnp.float32)
  params = {"w": jnp.asarray(theta, jnp.float32)}
  tx = optim.sam(RHO)
  update, _ = tx.update({"w": qj @ params["w"]}, tx.init(params), params,
                        grad_fn=lambda p: {"w": qj @ p["w"]})
  g = q @ theta
  np.testing.assert_allclose(update["w"], q @ (theta + RHO * g / np.linalg.norm(g)), rtol=1e-5)


def test_quadratic_closed_form_asam():
  """A parameter named 'kernel': g* = Q(θ + ρ T²Qθ/‖T Qθ‖), T = |θ| + η."""
  q, theta = quadratic(seed=1)
  qj = jnp.asarray(q, jnp.float32)
  params = {"layer": {"kernel": jnp.asarray(theta, jnp.float32)}}
  tx = optim.sam(RHO, adaptive=True, eta=ETA)
  grad_fn = lambda p: {"layer": {"kernel": qj @ p["layer"]["kernel"]}}
  update, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  g, t = q @ theta, np.abs(theta) + ETA
  expected = q @ (theta + RHO * t**2 * g / np.linalg.norm(t * g))
  np.testing.assert_allclose(update["layer"]["kernel"], expected, rtol=1e-5)


class Stage(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(4, (3, 3))(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))


class NestedNet(nn.Module):
  """Conv and BatchNorm inside a named submodule, then a Dense classifier."""

  @nn.compact
  def __call__(self, x, train=False):
    x = Stage(name="stage1")(x, train)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def nested_problem():
  model = NestedNet()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, 5, 5, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=6))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  stats = variables["batch_stats"]
  # Random values everywhere, so that T = 1 (BatchNorm scale starts at 1) is distinguishable.
  params = jax.tree.map(
      lambda l: jnp.asarray(np.asarray(l) + 0.5 * rng.normal(size=l.shape), jnp.float32),
      variables["params"])

  def loss(p, x, y):
    logits, _ = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss, x, y


def test_asam_scale_on_nested_names():
  params, _, _, _ = nested_problem()
  t = traverse_util.flatten_dict(optim.asam_scale(params, ETA), sep="/")
  p = traverse_util.flatten_dict(params, sep="/")
  assert sorted(t) == ["Dense_0/bias", "Dense_0/kernel", "stage1/BatchNorm_0/bias",
                       "stage1/BatchNorm_0/scale", "stage1/Conv_0/bias", "stage1/Conv_0/kernel"]
  for name in ("Dense_0/kernel", "stage1/Conv_0/kernel"):
    np.testing.assert_allclose(t[name], np.abs(p[name]) + ETA, rtol=1e-6)
  for name in ("Dense_0/bias", "stage1/BatchNorm_0/bias", "stage1/BatchNorm_0/scale",
               "stage1/Conv_0/bias"):
    np.testing.assert_array_equal(t[name], np.ones_like(p[name]))


def test_asam_update_on_nested_batchnorm_network():
  params, loss, x, y = nested_problem()
  tx = optim.sam(RHO, adaptive=True, eta=ETA)
  update, _ = tx.update(jax.grad(loss)(params, x, y), tx.init(params), params,
                        grad_fn=lambda p: jax.grad(loss)(p, x, y))
  assert_trees_close(update, reference_step(loss, params, x, y, RHO, True, ETA), rtol=1e-4,
                     atol=1e-5)


def test_chain_with_sgd_momentum_equals_manual_steps():
  lr, mu, steps = 0.1, 0.9, 3
  params, loss, x, y = mlp_problem()
  tx = optax.chain(optim.sam(RHO), optax.sgd(lr, momentum=mu))
  state = tx.init(params)
  manual, buf = params, jax.tree.map(jnp.zeros_like, params)
  for _ in range(steps):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x, y))
    params = optax.apply_updates(params, updates)
    g_star = reference_step(loss, manual, x, y, RHO)
    buf = jax.tree.map(lambda b, g: mu * b + g, buf, g_star)
    manual = jax.tree.map(lambda p, b: p - lr * b, manual, buf)
  assert_trees_close(params, manual, atol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_no_recompilation_across_steps(adaptive):
  params, loss, _, _ = mlp_problem()
  tx = optax.chain(optim.sam(RHO, adaptive=adaptive, eta=ETA), optax.sgd(0.1, momentum=0.9))
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(None)
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x, y))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for seed in range(3):
    _, _, x, y = mlp_problem(seed=seed)
    params, state = step(params, state, x, y)
  assert len(traces) == 1
  assert step._cache_size() == 1


@pytest.mark.parametrize("rho, shown", [(-0.1, "-0.1"), (float("nan"), "nan")])
def test_invalid_rho_raises_naming_the_value(rho, shown):
  with pytest.raises(ValueError, match=f"rho.*{shown}"):
    optim.sam(rho)


def test_negative_eta_raises():
  with pytest.raises(ValueError, match="eta.*-1"):
    optim.sam(0.1, adaptive=True, eta=-1.0)
