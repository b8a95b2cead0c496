"""The SAM family's step diagnostics (nonuniform_jax.optim.diagnostics) against values computed
by hand in float64 numpy on the small network of kfac_reference (a LayerNorm without factors),
their collection from a chain, and their way into the train step's metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from nonuniform_jax import models, optim, steps
from nonuniform_jax.optim import kfac
from tests.kfac_reference import Problem, dense_inverse

RHO, RHO1, RHO2, ALPHA, DAMPING, DECAY = 0.05, 0.1, 0.2, 0.9, 1e-3, 0.95


@pytest.fixture(scope="module")
def problem():
  return Problem()


def first_step(problem, tx, **extra):
  """One jitted update of ``tx`` from its initial state: the new state."""
  @jax.jit
  def run(state, extra):
    grads = jax.grad(problem.loss)(problem.params)
    return tx.update(grads, state, problem.params, grad_fn=jax.grad(problem.loss), **extra)[1]
  return run(tx.init(problem.params), extra)


def flat_grad(problem, flat):
  _, unravel = ravel_pytree(problem.params)
  return np.asarray(ravel_pytree(problem.grad(unravel(jnp.asarray(flat, jnp.float32))))[0],
                    np.float64)


def test_sam_and_asam_ascent_norms(problem):
  flat = np.asarray(ravel_pytree(problem.params)[0], np.float64)
  g = flat_grad(problem, flat)
  diag = optim.step_diagnostics(first_step(problem, optim.sam(RHO)))
  assert set(diag) == {"sam/grad_norm", "sam/eps_norm"}
  np.testing.assert_allclose(diag["sam/grad_norm"], np.linalg.norm(g), rtol=1e-5)
  np.testing.assert_allclose(diag["sam/eps_norm"], RHO, rtol=1e-6)   # ε = ρ g/‖g‖
  # ASAM: ε = ρ T²g/‖Tg‖, T = |θ| + η on kernels, 1 elsewhere.
  names = traverse_util.flatten_dict(problem.params, sep="/")
  kernel = np.asarray(ravel_pytree(traverse_util.unflatten_dict(
      {k: jnp.full(v.shape, k.endswith("kernel")) for k, v in names.items()}, sep="/"))[0], bool)
  t = np.where(kernel, np.abs(flat) + 0.01, 1.0)
  want = np.linalg.norm(RHO * t**2 * g / np.linalg.norm(t * g))
  diag = optim.step_diagnostics(first_step(problem, optim.sam(RHO, adaptive=True, eta=0.01)))
  np.testing.assert_allclose(diag["sam/eps_norm"], want, rtol=1e-5)
  assert abs(want - RHO) > 1e-3   # ASAM's ascent is not ρ long


def test_grouped_sam_reports_the_mean_over_groups(problem):
  """m-sharpness: the mean of the groups' ‖g1‖ (each group's ‖ε‖ is ρ)."""
  per_example = jax.vmap(jax.grad(lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      problem.model.apply({"params": p}, x[None]), y[None]).mean()), (None, 0, 0))
  groups = jax.tree.map(lambda x: x.reshape((2, 4) + x.shape[1:]),
                        per_example(problem.params, problem.x, problem.y))
  group_grads = jax.tree.map(lambda x: x.mean(1), groups)
  tx = optim.sam(RHO, grouped=True)
  state = jax.jit(lambda s: tx.update(group_grads, s, problem.params,
                                      grad_fn=lambda p: p)[1])(tx.init(problem.params))
  norms = [np.linalg.norm(ravel_pytree(jax.tree.map(lambda x, i=i: x[i], group_grads))[0])
           for i in range(2)]
  diag = optim.step_diagnostics(state)
  np.testing.assert_allclose(diag["sam/grad_norm"], np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(diag["sam/eps_norm"], RHO, rtol=1e-6)


@pytest.mark.parametrize("init", kfac.INITS)
def test_csam_kfac_norms_and_spectra_by_hand(problem, init):
  """One CSAM-K-FAC step: ‖ε1‖ = ρ1; d = α·δ (m starts at 0); v = (F + λI)⁻¹d from a dense
  solve, ‖ε2‖ = ρ2‖v‖/√(dᵀv); the eigenvalue ranges of the running factors (decay·I +
  (1 − decay)·X, or X) from numpy's eigvalsh; and ‖ε2‖ within its bound ρ2/√(f_min + λ)."""
  batch = jax.tree.map(np.asarray, problem.batch_factors(problem.params))
  tx = optim.csam(RHO1, RHO2, ALPHA, metric="kfac", damping=DAMPING, kfac_layers=problem.layers,
                  schedule=kfac.Schedule(ema_decay=DECAY), factor_init=init)
  diag = optim.step_diagnostics(first_step(problem, tx, kfac_factors=batch))

  flat = np.asarray(ravel_pytree(problem.params)[0], np.float64)
  g1 = flat_grad(problem, flat)
  e1 = RHO1 * g1 / np.linalg.norm(g1)
  d = ALPHA * (flat_grad(problem, flat + e1) - g1)
  running = batch if init == "batch" else jax.tree.map(
      lambda x: DECAY * np.eye(x.shape[0]) + (1 - DECAY) * x, batch)
  v = dense_inverse(problem.params, running, DAMPING, "zero") @ d
  want = {"csam/grad_norm": np.linalg.norm(g1), "csam/eps1_norm": RHO1,
          "csam/d_norm": np.linalg.norm(d), "csam/d_dot_v": d @ v,
          "csam/eps2_norm": RHO2 * np.linalg.norm(v) / np.sqrt(d @ v)}
  f_min, f_max = np.inf, 0.0
  for name, f in running.items():
    la, lg = (np.clip(np.linalg.eigvalsh(np.asarray(m, np.float64)), 0, None)
              for m in (f.a, f.g))
    want.update({f"kfac/{name}/a_min": la.min(), f"kfac/{name}/a_max": la.max(),
                 f"kfac/{name}/g_min": lg.min(), f"kfac/{name}/g_max": lg.max()})
    f_min, f_max = min(f_min, la.min() * lg.min()), max(f_max, la.max() * lg.max())
  want.update({"kfac/f_min": f_min, "kfac/f_max": f_max})
  assert set(diag) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(diag[key], value, rtol=3e-3, atol=1e-6, err_msg=key)
  assert diag["csam/eps2_norm"] <= RHO2 / np.sqrt(f_min + DAMPING)
  if init == "identity":   # the blend keeps the metric near I: ε2 about ρ2 long
    assert 0.5 * RHO2 < diag["csam/eps2_norm"] < 2 * RHO2


def test_identity_metric_steps_rho2(problem):
  diag = optim.step_diagnostics(first_step(problem, optim.csam(RHO1, RHO2, ALPHA)))
  np.testing.assert_allclose(diag["csam/eps2_norm"], RHO2, rtol=1e-5)
  np.testing.assert_allclose(diag["csam/eps1_norm"], RHO1, rtol=1e-5)
  np.testing.assert_allclose(diag["csam/d_dot_v"], diag["csam/d_norm"] ** 2, rtol=1e-5)


def test_collected_from_anywhere_in_a_chain(problem):
  """Nested chains, the K-FAC spectra beside their transformation's scalars, nothing for a
  plain optimizer, zeros before the first update, and a clash of keys refused."""
  inner = optax.chain(optim.gam(RHO, kfac_layers=problem.layers), optax.sgd(0.1))
  state = optax.chain(optax.identity(), inner).init(problem.params)
  diag = optim.step_diagnostics(state)
  assert {"sam/eps_norm", "sam/grad_norm", "gam/q", "kfac/f_min"} <= set(diag)
  assert all(float(diag[k]) == 0 for k in ("sam/eps_norm", "gam/q"))
  assert optim.step_diagnostics(optax.sgd(0.1).init(problem.params)) == {}
  with pytest.raises(ValueError, match="sam/eps_norm"):
    optim.step_diagnostics(optax.chain(optim.sam(0.1), optim.sam(0.2)).init(problem.params))


def test_train_step_returns_the_diagnostics():
  """steps.make_train_step merges them into its metrics (here SAM and CSAM-K-FAC)."""
  model = models.get_model("mlp", 3, widths=(8,))
  batch = {"inputs": jnp.asarray(np.random.default_rng(0).normal(size=(16, 5)), jnp.float32),
           "labels": jnp.arange(16) % 3}
  params = model.init(jax.random.key(0), batch["inputs"])["params"]
  for tx, passes, extra in (
      (optim.sam(RHO), 2, ()),
      (optim.csam(RHO1, RHO2, ALPHA, metric="kfac", kfac_layers=["Dense_0", "Dense_1"]), 3,
       ("kfac_factors",))):
    chain = optax.chain(tx, optax.sgd(0.1))
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                             opt_state=chain.init(params))
    step = jax.jit(steps.make_train_step(model, chain, seed=0, passes=passes, extra_args=extra))
    _, metrics = step(state, batch)
    if passes == 2:
      np.testing.assert_allclose(metrics["sam/eps_norm"], RHO, rtol=1e-6)
    else:
      np.testing.assert_allclose(metrics["csam/eps1_norm"], RHO1, rtol=1e-6)
      assert {"csam/eps2_norm", "kfac/Dense_0/a_min", "kfac/f_max"} <= set(metrics)
      assert float(metrics["csam/eps2_norm"]) > 0
    assert {"train_loss", "train_accuracy"} <= set(metrics)
