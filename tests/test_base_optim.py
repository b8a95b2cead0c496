"""Base optimizers and schedules against hand-written update rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nonuniform_jax.optim import base


def _step(tx, params, grads, n=3):
  state = tx.init(params)
  for _ in range(n):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_momentum_coupled_weight_decay_matches_manual():
  p0, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  lr, mu, wd = 0.1, 0.9, 0.01
  got = _step(base.base_optimizer("sgd", lr, momentum=mu, weight_decay=wd), p0, g)
  p, buf = np.array(p0), np.zeros(2)
  for _ in range(3):  # PyTorch SGD: d = g + wd p; buf = mu buf + d; p -= lr buf
    buf = mu * buf + (np.array(g) + wd * p)
    p = p - lr * buf
  np.testing.assert_allclose(got, p, rtol=1e-6)


def test_sgd_decoupled_weight_decay_and_nesterov_match_manual():
  p0, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  lr, mu, wd = 0.1, 0.9, 0.01
  got = _step(base.base_optimizer("sgd", lr, momentum=mu, nesterov=True, weight_decay=wd,
                                  weight_decay_mode="decoupled"), p0, g)
  p, buf = np.array(p0), np.zeros(2)
  for _ in range(3):
    buf = mu * buf + np.array(g)
    p = p - lr * (np.array(g) + mu * buf) - lr * wd * p
  np.testing.assert_allclose(got, p, rtol=1e-6)


def test_adamw_is_adam_with_decoupled_decay():
  p0, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  got = _step(base.base_optimizer("adamw", 1e-2, weight_decay=0.1), p0, g)
  want = _step(optax.adamw(1e-2, weight_decay=0.1), p0, g)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradient_clipping_bounds_the_step():
  got = _step(base.base_optimizer("sgd", 1.0, grad_clip_norm=1.0), jnp.zeros(2),
              jnp.array([30.0, 40.0]), n=1)
  np.testing.assert_allclose(got, [-0.6, -0.8], rtol=1e-6)


def test_schedules():
  s = base.learning_rate_schedule("cosine", 0.1, 100, warmup_steps=10)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 0.1) < 1e-7 and float(s(100)) < 1e-6
  s = base.learning_rate_schedule("step", 0.1, 100, step_boundaries=(0.5,), step_factor=0.1)
  np.testing.assert_allclose([s(49), s(50), s(99)], [0.1, 0.01, 0.01], rtol=1e-6)
  s = base.learning_rate_schedule("linear", 1.0, 10, end_factor=0.5)
  np.testing.assert_allclose([s(0), s(5), s(10)], [1.0, 0.75, 0.5], rtol=1e-6)
  np.testing.assert_allclose(base.learning_rate_schedule("constant", 0.3, 5)(4), 0.3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="lion", learning_rate=0.1), "unknown base optimizer 'lion'.*sgd"),
    (dict(name="sgd", learning_rate=0.1, weight_decay_mode="l1"), "weight_decay_mode 'l1'"),
])
def test_bad_optimizer_names(kwargs, match):
  with pytest.raises(ValueError, match=match):
    base.base_optimizer(**kwargs)


def test_bad_schedule():
  with pytest.raises(ValueError, match="unknown schedule 'poly'.*cosine"):
    base.learning_rate_schedule("poly", 0.1, 10)
  with pytest.raises(ValueError, match="learning_rate must be a finite number > 0, got -1"):
    base.learning_rate_schedule("cosine", -1, 10)
