"""Curvature measures against exact oracles: the dense Hessian of a small MLP (jax.hessian of the
ravelled loss, numpy.linalg.eigh) and quadratics whose Hessian is known."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from nonuniform_jax import measures
from nonuniform_jax.measures import hessian
from nonuniform_jax.models import get_model

SIZES = (20, 20, 24)  # unequal sizes, and two equal ones that share one scanned group


def _cross_entropy(model):
  """The mean loss ``loss(scale, params, batch)`` of ``model`` times ``scale``."""
  def loss(scale, params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return scale * optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss


@pytest.fixture(scope="module")
def mlp():
  """A 20-8-5 MLP (213 parameters) on 64 random examples, the batches and the dense Hessian of
  the loss over their union. ``loss(scale, params, batch)`` counts its traces in ``traces``."""
  model = get_model("mlp", 5, widths=(8,))
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (sum(SIZES), 20))
  y = jax.random.randint(ky, (sum(SIZES),), 0, 5)
  params = jax.jit(model.init)(kp, x[:1])["params"]
  traces = []

  def loss(scale, params, batch):
    traces.append(None)
    logits = model.apply({"params": params}, batch["x"])
    return scale * optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  loss_fn = Partial(loss, jnp.float32(1.0))
  edges = np.cumsum((0,) + SIZES)
  batches = [{"x": x[a:b], "y": y[a:b]} for a, b in zip(edges[:-1], edges[1:])]
  flat, unravel = ravel_pytree(params)
  dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), {"x": x, "y": y})))(flat)
  dense = np.asarray(dense, np.float64)
  dense = (dense + dense.T) / 2
  values, vectors = np.linalg.eigh(dense)
  return types.SimpleNamespace(loss=loss, traces=traces, params=params, loss_fn=loss_fn,
                               batches=batches, dense=dense, values=values, vectors=vectors)


def _quadratic(diag, params, batch):
  """½ Σ_j diag_j θ_j² over the ravelled parameters: Hessian diag(diag), whatever the batch."""
  del batch
  return 0.5 * jnp.sum(diag * ravel_pytree(params)[0] ** 2)


QUAD_PARAMS = {"a": jnp.ones(5), "b": {"c": jnp.ones((2, 3))}}  # 11 parameters in a pytree
QUAD_BATCHES = [{"x": jnp.zeros((2, 1))}]


@pytest.fixture
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


def test_hvp_matches_dense_hessian(mlp):
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), mlp.params)
  hv = measures.hvp(mlp.loss_fn, mlp.params, mlp.batches, v)
  assert jax.tree.structure(hv) == jax.tree.structure(mlp.params)
  expected = mlp.dense @ np.asarray(ravel_pytree(v)[0], np.float64)
  np.testing.assert_allclose(ravel_pytree(hv)[0], expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())


def _check_top3(result, mlp, tol, scale=1.0):
  top_values = scale * mlp.values[::-1][:3]
  top_vectors = mlp.vectors[:, ::-1][:, :3]
  np.testing.assert_allclose(result["eigenvalues"], top_values, rtol=1e-4)
  assert np.all(result["residuals"] <= tol * np.abs(top_values) + 1e-6)
  found = np.stack([ravel_pytree(jax.tree.map(lambda x, i=i: x[i], result["eigenvectors"]))[0]
                    for i in range(3)])
  np.testing.assert_allclose(np.abs(np.sum(found * top_vectors.T, axis=1)), 1, atol=1e-3)
  assert result["num_hvps"] == result["iterations"] + 3


def test_top_eigenvalues_lanczos_matches_eigh_without_retracing(mlp):
  result = measures.top_eigenvalues(mlp.loss_fn, mlp.params, mlp.batches, 3, tol=1e-4, key=3)
  _check_top3(result, mlp, 1e-4)
  assert result["converged"]
  assert result["iterations"] < 60  # stopped by the residual rule, not by num_iters=100
  assert result["method"] == "lanczos" and result["num_examples"] == sum(SIZES)
  assert result["num_batches"] == len(SIZES)
  # A changed array closed over with Partial (as BatchNorm statistics would be) is traced, not
  # baked in: the second call reuses the compilation.
  count = len(mlp.traces)
  doubled = measures.top_eigenvalues(Partial(mlp.loss, jnp.float32(2.0)), mlp.params,
                                     mlp.batches, 3, tol=1e-4, key=3)
  assert len(mlp.traces) == count
  _check_top3(doubled, mlp, 1e-4, scale=2.0)


def test_top_eigenvalues_power_matches_eigh(mlp):
  # Power iteration finds the largest magnitudes; here they are the top three.
  assert mlp.values[-3] > abs(mlp.values[0])
  result = measures.top_eigenvalues(mlp.loss_fn, mlp.params, mlp.batches, 3, method="power",
                                    num_iters=2000, tol=1e-4, key=4)
  # The loop stops on the deflated operator's residual; the reported one is on H itself.
  _check_top3(result, mlp, 2e-4)
  assert result["iterations"] < 3 * 2000


def test_lambda_max_and_repeated_eigenvalues():
  diag = jnp.array([5.0, 5.0] + [1.0] * 8 + [0.5])
  loss_fn = Partial(_quadratic, diag)
  result = measures.lambda_max(loss_fn, QUAD_PARAMS, QUAD_BATCHES, num_iters=11, key=8)
  np.testing.assert_allclose(result["lambda_max"], 5.0, rtol=1e-5)
  assert result["residual"] <= 1e-4 and result["converged"]
  assert jax.tree.structure(result["eigenvector"]) == jax.tree.structure(QUAD_PARAMS)
  # Lanczos from one vector sees each distinct eigenvalue once; the restart after the Krylov
  # space becomes invariant finds the multiplicity.
  top = measures.top_eigenvalues(loss_fn, QUAD_PARAMS, QUAD_BATCHES, 3, num_iters=11, key=8)
  np.testing.assert_allclose(top["eigenvalues"], [5.0, 5.0, 1.0], rtol=1e-5)
  assert top["converged"]


def test_hessian_trace_is_unbiased_with_the_right_error(mlp):
  num_probes = 200
  result = measures.hessian_trace(mlp.loss_fn, mlp.params, mlp.batches, num_probes=num_probes,
                                  key=5)
  # Var(zᵀHz) = 2(‖H‖_F² − Σ_j H_jj²) for Rademacher z.
  expected_stderr = np.sqrt(2 * (np.sum(mlp.dense**2) - np.sum(np.diag(mlp.dense) ** 2))
                            / num_probes)
  assert abs(result["trace"] - np.trace(mlp.dense)) <= 4 * expected_stderr
  assert 0.7 * expected_stderr <= result["stderr"] <= 1.3 * expected_stderr
  assert result["samples"].shape == (num_probes,) and result["num_probes"] == num_probes


def test_hessian_trace_exact_for_diagonal_hessian():
  diag = jnp.linspace(-1.0, 3.0, 11)
  result = measures.hessian_trace(Partial(_quadratic, diag), QUAD_PARAMS, QUAD_BATCHES,
                                  num_probes=4)
  np.testing.assert_allclose(result["trace"], float(jnp.sum(diag)), rtol=1e-6)
  assert result["stderr"] <= 1e-6


def test_esd_moments_match_dense_spectrum(mlp):
  num_probes = 100
  result = measures.hessian_esd(mlp.loss_fn, mlp.params, mlp.batches, num_iters=12,
                                num_probes=num_probes, key=6)
  nodes, weights = result["nodes"], result["weights"]
  assert nodes.shape == weights.shape == (num_probes, 12)
  np.testing.assert_allclose(weights.sum(axis=1), 1, atol=1e-5)
  dim = mlp.dense.shape[0]
  for power in (1, 2):
    a = np.linalg.matrix_power(mlp.dense, power)
    # Per probe the quadrature is exact (power ≤ 2·12 − 1): only the probe's randomness is left,
    # Var(vᵀAv) = 2(‖A‖_F² − Σ_j A_jj²)/d² for v = z/√d, z Rademacher.
    stderr = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / num_probes) / dim
    estimate = np.mean(np.sum(weights * nodes.astype(np.float64) ** power, axis=1))
    assert abs(estimate - np.trace(a) / dim) <= 4 * stderr


def test_esd_exact_for_diagonal_and_identity_hessians():
  dim = 11
  diag = jnp.linspace(0.5, 3.0, dim)
  full = measures.hessian_esd(Partial(_quadratic, diag), QUAD_PARAMS, QUAD_BATCHES,
                              num_iters=dim, num_probes=2, key=7)
  # Rademacher probes weigh every eigenvector of a diagonal matrix by 1/d.
  np.testing.assert_allclose(np.sort(full["nodes"], axis=1), np.tile(diag, (2, 1)), rtol=1e-5)
  np.testing.assert_allclose(full["weights"], 1 / dim, atol=1e-5)
  identity = measures.hessian_esd(Partial(_quadratic, jnp.ones(dim)), QUAD_PARAMS,
                                  QUAD_BATCHES, num_iters=dim, num_probes=2, key=7)
  # One distinct eigenvalue: breakdown after one step, then restarts; the density is δ(x − 1).
  np.testing.assert_allclose(identity["nodes"], 1, rtol=1e-5)
  np.testing.assert_allclose(identity["weights"].sum(axis=1), 1, rtol=1e-6)


def test_slq_quadrature_is_exact_to_degree_2m_minus_1(x64):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(30, 30))
  a = jnp.asarray((a + a.T) / 2)
  probes = jnp.asarray(rng.normal(size=(3, 30)))
  m = 6
  nodes, weights = jax.jit(lambda p: hessian.slq(lambda v: a @ v, p, m))(probes)
  for power in range(2 * m):
    a_power = np.linalg.matrix_power(np.asarray(a), power)
    expected = np.einsum("pi,ij,pj->p", probes, a_power, probes) / np.sum(probes**2, axis=1)
    np.testing.assert_allclose(np.sum(weights * nodes**power, axis=1), expected, rtol=1e-8)


def test_lanczos_iterations_are_capped_at_the_dimension():
  q = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
  out = measures.lambda_max(lambda p, b: 0.5 * p @ q @ p, jnp.ones(3), [{"x": np.zeros((1,))}],
                            num_iters=100)
  assert out["num_iters"] == 3 and abs(out["lambda_max"] - 3.0) < 1e-5


def test_esd_density_is_a_smoothed_probability():
  nodes = np.array([[0.0, 1.0, 2.0]])
  weights = np.array([[0.25, 0.5, 0.25]])
  grid, density = measures.esd_density(nodes, weights, sigma=0.05, num_points=4001)
  np.testing.assert_allclose(np.trapezoid(density, grid), 1, rtol=1e-6)
  peak = density[np.argmin(np.abs(grid - 1.0))]
  np.testing.assert_allclose(peak, 0.5 / (0.05 * np.sqrt(2 * np.pi)), rtol=1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda m: measures.top_eigenvalues(m.loss_fn, m.params, m.batches, 0), "k must be"),
    (lambda m: measures.top_eigenvalues(m.loss_fn, m.params, m.batches, 2, method="arnoldi"),
     "unknown method 'arnoldi'; choose one of \\['lanczos', 'power'\\]"),
    (lambda m: measures.top_eigenvalues(m.loss_fn, m.params, m.batches, 3, num_iters=2),
     "num_iters=2 must be at least k=3"),
    (lambda m: measures.lambda_max(m.loss_fn, m.params, m.batches, tol=-1.0), "tol must be"),
    (lambda m: measures.lambda_max(m.loss_fn, m.params, []), "batches is empty"),
    (lambda m: measures.hvp(m.loss_fn, m.params, m.batches[0], m.params), "sequence of batches"),
    (lambda m: measures.hessian_trace(m.loss_fn, m.params, [{"x": np.zeros((3, 2)),
                                                            "y": np.zeros(4)}]),
     "one non-empty leading example axis"),
    (lambda m: measures.hessian_trace(m.loss_fn, m.params, m.batches, num_probes=0),
     "num_probes must be"),
    (lambda m: measures.hessian_esd(m.loss_fn, m.params, m.batches, num_iters=1000),
     "num_iters=1000 exceeds the number of parameters 213"),
])
def test_bad_arguments_raise_before_compiling(mlp, call, match):
  with pytest.raises(ValueError, match=match):
    call(mlp)
