"""Perturbation sharpness against closed forms on quadratics and least squares.

f(θ) = ½(θ − θ₀)ᵀQ(θ − θ₀) has gradient g = Q(θ − θ₀) and Hessian Q, so for δ = c ⊙ d:
f(θ + δ) − f(θ) = (c ⊙ g)ᵀd + ½ dᵀ(CQC)d, C = diag(c). Hence, with ‖d‖_p ≤ ρ:
* ℓ2 at θ = θ₀: max = ½ρ² λ_max(CQC);
* ℓ∞, Q diagonal: max = Σ_j max_{|d_j| ≤ ρ} (c_j g_j d_j + ½Q_jj c_j² d_j²)
  = ρ Σ_j |c_j g_j| + ½ρ² Σ_j Q_jj c_j² (both terms are largest at d_j = ρ sign(g_j));
* ℓ2 with g ≠ 0: the trust-region problem, d = (μI − A)⁻¹ b with μ > λ_max(A), ‖d‖ = ρ;
* SAM: ε = ρ g/‖g‖ gives ρ‖g‖ + ½ρ² gᵀQg/‖g‖²;
* Gaussian δ = ρ c ⊙ z: mean ½ρ² Σ_j Q_jj c_j², variance ρ²‖c ⊙ g‖² + ½ρ⁴‖CQC‖_F²;
* PAC-Bayes with the loss as metric at θ₀: E f(θ₀ + u) − f(θ₀) = ½ Σ_j Q_jj Var(u_j).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from nonuniform_jax import measures
from nonuniform_jax.models import get_model

DIM = 8
PARAMS = {"bias": jnp.zeros(3), "kernel": jnp.zeros(5)}  # the pytree layout of every problem
_, UNRAVEL = ravel_pytree(PARAMS)
DUMMY_BATCHES = [{"x": jnp.zeros((2, 1))}]


def _tree(flat):
  return UNRAVEL(jnp.asarray(flat, jnp.float32))


def _quadratic(q, center, params, batch):
  del batch
  r = ravel_pytree(params)[0] - center
  return 0.5 * r @ q @ r


def _least_squares(params, batch):
  """½ mean_i (x_iᵀθ − y_i)²: gradient Xᵀ(Xθ − y)/n, Hessian XᵀX/n on batch (X, y)."""
  return 0.5 * jnp.mean((batch["x"] @ ravel_pytree(params)[0] - batch["y"]) ** 2)


def _spd(seed, eigenvalues):
  u, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, DIM)))
  return (u * eigenvalues) @ u.T


@pytest.fixture(scope="module")
def regression():
  rng = np.random.default_rng(0)
  sizes = (12, 20)
  x = rng.normal(size=(sum(sizes), DIM))
  y = rng.normal(size=sum(sizes))
  theta = rng.normal(size=DIM)
  batches = [{"x": jnp.asarray(x[:12], jnp.float32), "y": jnp.asarray(y[:12], jnp.float32)},
             {"x": jnp.asarray(x[12:], jnp.float32), "y": jnp.asarray(y[12:], jnp.float32)}]
  # Per batch: weight n_b/n, gradient and Hessian at theta (float64).
  parts = [(n / sum(sizes), xb.T @ (xb @ theta - yb) / n, xb.T @ xb / n)
           for n, xb, yb in ((12, x[:12], y[:12]), (20, x[12:], y[12:]))]
  return batches, theta, parts


def test_worst_case_l2_at_a_minimum_is_half_rho2_lambda_max():
  q = _spd(1, [4.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1])
  center = np.random.default_rng(2).uniform(0.5, 1.5, DIM) * np.sign(np.arange(DIM) - 3.5)
  loss_fn = Partial(_quadratic, jnp.asarray(q, jnp.float32), jnp.asarray(center, jnp.float32))
  rho = 0.1
  c = np.abs(center)
  for adaptive, a in ((False, q), (True, c[:, None] * q * c[None, :])):
    result = measures.worst_case_sharpness(loss_fn, _tree(center), DUMMY_BATCHES, rho,
                                           adaptive=adaptive, key=3)
    np.testing.assert_allclose(result["sharpness"], 0.5 * rho**2 * np.linalg.eigvalsh(a)[-1],
                               rtol=1e-3)
    assert result["p"] == "2" and result["num_steps"] == 20 and result["step_size"] == 2 * rho


def test_worst_case_linf_on_a_diagonal_quadratic():
  rng = np.random.default_rng(4)
  q = rng.uniform(0.5, 2.0, DIM)
  center = rng.uniform(0.5, 1.5, DIM)
  loss_fn = Partial(_quadratic, jnp.asarray(np.diag(q), jnp.float32),
                    jnp.asarray(center, jnp.float32))
  rho = 0.05
  # At the minimum every corner of the box is a maximiser.
  plain = measures.worst_case_sharpness(loss_fn, _tree(center), DUMMY_BATCHES, rho, p="inf")
  np.testing.assert_allclose(plain["sharpness"], 0.5 * rho**2 * q.sum(), rtol=1e-5)
  adaptive = measures.worst_case_sharpness(loss_fn, _tree(center), DUMMY_BATCHES, rho,
                                           p=float("inf"), adaptive=True)
  np.testing.assert_allclose(adaptive["sharpness"], 0.5 * rho**2 * np.sum(q * center**2),
                             rtol=1e-5)
  # Away from it, with |g_j| > Q_jj c_j ρ, the sign of the gradient never flips inside the box.
  theta = center + np.where(np.arange(DIM) % 2, 0.5, -0.5)
  g, c = q * (theta - center), np.abs(theta)
  assert np.all(np.abs(g) > q * c * rho)
  result = measures.worst_case_sharpness(loss_fn, _tree(theta), DUMMY_BATCHES, rho, p="inf",
                                         adaptive=True)
  expected = rho * np.sum(np.abs(g * c)) + 0.5 * rho**2 * np.sum(q * c**2)
  np.testing.assert_allclose(result["sharpness"], expected, rtol=1e-5)


def _trust_region(b, a, rho):
  """max_{‖d‖ ≤ ρ} bᵀd + ½dᵀAd for symmetric A and b not orthogonal to A's top eigenvector."""
  lam, u = np.linalg.eigh(a)
  bt = u.T @ b
  low, high = lam[-1], lam[-1] + np.linalg.norm(b) / rho + 1.0
  for _ in range(200):  # ‖(μI − A)⁻¹ b‖ decreases in μ > λ_max
    mu = (low + high) / 2
    low, high = (mu, high) if np.linalg.norm(bt / (mu - lam)) > rho else (low, mu)
  d = bt / (mu - lam)
  return bt @ d + 0.5 * d @ (lam * d)


def test_worst_case_l2_with_a_gradient_solves_the_trust_region_problem(regression):
  batches, theta, parts = regression
  rho = 0.3
  result = measures.worst_case_sharpness(_least_squares, _tree(theta), batches, rho, key=5)
  expected = sum(w * _trust_region(g, h, rho) for w, g, h in parts)
  np.testing.assert_allclose(result["sharpness"], expected, rtol=1e-4)
  assert result["num_examples"] == 32 and result["num_batches"] == 2


def test_sam_sharpness_closed_form_over_unequal_batches(regression):
  batches, theta, parts = regression
  rho = 0.2
  result = measures.sam_sharpness(_least_squares, _tree(theta), batches, rho)
  expected = sum(w * (rho * np.linalg.norm(g) + 0.5 * rho**2 * g @ h @ g / (g @ g))
                 for w, g, h in parts)
  np.testing.assert_allclose(result["sharpness"], expected, rtol=1e-5)
  # ASAM: ε = ρ T² g/‖T g‖, T = |θ| on the kernel and 1 on the bias.
  t = np.abs(np.asarray(ravel_pytree(_tree(theta))[0], np.float64))
  t[:3] = 1.0
  expected = 0.0
  for w, g, h in parts:
    eps = rho * t**2 * g / np.linalg.norm(t * g)
    expected += w * (g @ eps + 0.5 * eps @ h @ eps)
  result = measures.sam_sharpness(_least_squares, _tree(theta), batches, rho, adaptive=True)
  np.testing.assert_allclose(result["sharpness"], expected, rtol=1e-5)


def test_average_sharpness_mean_and_error():
  q = _spd(6, np.linspace(0.2, 3.0, DIM))
  rng = np.random.default_rng(7)
  center, theta = rng.normal(size=DIM), rng.normal(size=DIM)
  loss_fn = Partial(_quadratic, jnp.asarray(q, jnp.float32), jnp.asarray(center, jnp.float32))
  rho, num_draws = 0.1, 4000
  g = q @ (theta - center)
  for adaptive, c in ((False, np.ones(DIM)), (True, np.abs(theta))):
    result = measures.average_sharpness(loss_fn, _tree(theta), DUMMY_BATCHES, rho,
                                        adaptive=adaptive, num_draws=num_draws, key=8)
    a = c[:, None] * q * c[None, :]
    stderr = np.sqrt((rho**2 * np.sum((c * g) ** 2) + 0.5 * rho**4 * np.sum(a**2)) / num_draws)
    assert abs(result["sharpness"] - 0.5 * rho**2 * np.trace(a)) <= 4 * stderr
    np.testing.assert_allclose(result["stderr"], stderr, rtol=0.15)


def test_pacbayes_sigma_on_a_quadratic():
  rng = np.random.default_rng(9)
  q = rng.uniform(0.5, 1.5, DIM)
  center = rng.uniform(0.5, 1.5, DIM)
  loss_fn = Partial(_quadratic, jnp.asarray(np.diag(q), jnp.float32),
                    jnp.asarray(center, jnp.float32))
  target, eps = 0.01, 1e-3
  settings = dict(target=target, tolerance=1e-6, search_depth=40, num_samples=2000, key=10)
  plain = measures.pacbayes_flatness(loss_fn, _tree(center), DUMMY_BATCHES, **settings)
  # MC error of the mean of ½zᵀQz over 2000 draws: about 1.2% here.
  np.testing.assert_allclose(plain["sigma"] ** 2, 2 * target / q.sum(), rtol=0.05)
  np.testing.assert_allclose(plain["flatness"], 1 / plain["sigma"] ** 2)
  assert plain["reached"] and abs(plain["deviation"] - target) < 1e-6
  mag = measures.pacbayes_flatness(loss_fn, _tree(center), DUMMY_BATCHES, magnitude_aware=True,
                                   magnitude_eps=eps, **settings)
  np.testing.assert_allclose(mag["sigma"] ** 2,
                             (2 * target - eps**2 * q.sum()) / np.sum(q * center**2), rtol=0.05)
  assert mag["magnitude_aware"] and mag["metric"] == "loss_fn"


def test_pacbayes_over_batches_equals_concatenated(regression):
  batches, theta, _ = regression
  concatenated = [jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches)]

  def mean_abs_error(params, batch):
    return jnp.mean(jnp.abs(batch["x"] @ ravel_pytree(params)[0] - batch["y"]))

  results = [measures.pacbayes_flatness(_least_squares, _tree(theta), b, metric_fn=mean_abs_error,
                                        target=0.05, key=11) for b in (batches, concatenated)]
  np.testing.assert_allclose(results[0]["sigma"], results[1]["sigma"], rtol=1e-5)
  np.testing.assert_allclose(results[0]["clean_metric"], results[1]["clean_metric"], rtol=1e-6)
  assert results[0]["metric"] == "metric_fn" and results[0]["reached"]


def test_worst_case_on_an_mlp_is_at_least_the_sam_point():
  """From δ = 0 the first ascent step lands on SAM's point, so it is a lower bound."""
  model = get_model("mlp", 3, widths=(8,))
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (48, 6))
  y = jax.random.randint(ky, (48,), 0, 3)
  params = jax.jit(model.init)(kp, x[:1])["params"]

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  batches = [{"x": x[:32], "y": y[:32]}, {"x": x[32:], "y": y[32:]}]
  rho = 0.5
  sam = measures.sam_sharpness(loss_fn, params, batches, rho)
  worst = measures.worst_case_sharpness(loss_fn, params, batches, rho, random_init=False)
  assert sam["sharpness"] > 0
  assert worst["sharpness"] >= sam["sharpness"] - 1e-6
  assert worst["loss"] == pytest.approx(sam["loss"], rel=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: measures.worst_case_sharpness(_least_squares, PARAMS, DUMMY_BATCHES, 0.1, p=1),
     "unknown p 1; choose one of \\[2, inf\\]"),
    (lambda: measures.worst_case_sharpness(_least_squares, PARAMS, DUMMY_BATCHES, -0.1),
     "rho must be a finite number >= 0"),
    (lambda: measures.worst_case_sharpness(_least_squares, PARAMS, DUMMY_BATCHES, 0.1,
                                           num_steps=0), "num_steps must be"),
    (lambda: measures.sam_sharpness(_least_squares, PARAMS, [], 0.1), "batches is empty"),
    (lambda: measures.average_sharpness(_least_squares, PARAMS, DUMMY_BATCHES, 0.1,
                                        num_draws=0), "num_draws must be"),
    (lambda: measures.pacbayes_flatness(_least_squares, PARAMS, DUMMY_BATCHES, target=-1.0),
     "target must be"),
    (lambda: measures.pacbayes_flatness(_least_squares, PARAMS, DUMMY_BATCHES, search_depth=0),
     "search_depth must be"),
])
def test_bad_arguments_raise_before_compiling(call, match):
  with pytest.raises(ValueError, match=match):
    call()
