"""CSAM (nonuniform_jax.optim.csam) against a hand-written three-pass reference.

The reference works on the flattened parameters in float64 numpy: ε1, δ, the consistent
momentum, d, the metric (identity, ASAM's T from the parameter names, or the dense
(G ⊗ A + λI)⁻¹ of kfac_reference.dense_inverse with its own EMA and refresh schedule), ε2 and
the SGD step. The transformation's ε1 and ε2 are read from the points where it calls grad_fn.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from tests.kfac_reference import Problem, dense_inverse
from nonuniform_jax import optim
from nonuniform_jax.optim import kfac

RHO1, RHO2, ALPHA, ETA, LR, DAMPING = 0.1, 0.2, 0.6, 0.05, 0.5, 1e-2
STATS_EVERY, INVERSE_EVERY, DECAY = 2, 3, 0.9
STEPS = 4   # reaches step 3: an inverse refresh on a step without new statistics


@functools.lru_cache(maxsize=None)
def run_csam(problem, metric, sign=-1, unfactored="zero", init="identity", form="exact"):
  """STEPS jitted steps of chain(csam, sgd); returns per step (ε1, ε2, params after) and the
  final state, plus the compiled step (to count compilations)."""
  tx = optax.chain(optim.csam(RHO1, RHO2, ALPHA, metric=metric, eta=ETA, damping=DAMPING,
                              momentum_sign=sign, unfactored=unfactored,
                              kfac_layers=problem.layers,
                              schedule=kfac.Schedule(STATS_EVERY, INVERSE_EVERY, DECAY),
                              factor_init=init, inverse=form),
                   optax.sgd(LR))

  @jax.jit
  def step(params, state):
    points = []

    def grad_fn(p):
      points.append(p)
      return jax.grad(problem.loss)(p)

    extra = {}
    if metric == "kfac":
      out = kfac.loss_grad_and_factors(problem.per_example_loss, params, problem.perts,
                                       problem.x, problem.y, due=kfac.stats_due(state))
      grads, extra = out.grads, {"kfac_factors": out.factors}
    else:
      grads = jax.grad(problem.loss)(params)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn, **extra)
    eps = [ravel_pytree(optax.tree_utils.tree_sub(p, params))[0] for p in points]
    return optax.apply_updates(params, updates), state, eps

  params, state, records = problem.params, tx.init(problem.params), []
  for _ in range(STEPS):
    params, state, eps = step(params, state)
    records.append((*map(np.asarray, eps), np.asarray(ravel_pytree(params)[0])))
  return records, state, step


@functools.lru_cache(maxsize=None)
def reference_csam(problem, metric, sign=-1, unfactored="zero", init="identity", form="exact"):
  """The same STEPS by hand (docs/methods.md, CSAM), float64. The running factors start at the
  identity (``init`` 'identity') or at the first batch factors ('batch')."""
  flat, unravel = ravel_pytree(problem.params)
  flat = np.asarray(flat, np.float64)
  grad = lambda v: np.asarray(ravel_pytree(problem.grad(unravel(jnp.asarray(v, jnp.float32))))[0],
                              np.float64)
  names = traverse_util.flatten_dict(problem.params, sep="/")
  is_kernel = ravel_pytree(traverse_util.unflatten_dict(
      {k: jnp.full(v.shape, k.endswith("kernel")) for k, v in names.items()}, sep="/"))[0]
  is_kernel = np.asarray(is_kernel, bool)
  m, ema, inv, records = np.zeros_like(flat), None, None, []
  for k in range(STEPS):
    g1 = grad(flat)
    e1 = RHO1 * g1 / (np.linalg.norm(g1) + 1e-12)
    delta = grad(flat + e1) - g1
    m = ALPHA * m + (1 - ALPHA) * delta
    d = delta + sign * m
    if metric == "identity":
      e2 = RHO2 * d / (np.linalg.norm(d) + 1e-12)
    elif metric == "adaptive":
      t = np.where(is_kernel, np.abs(flat) + ETA, 1.0)
      e2 = RHO2 * t**2 * d / (np.linalg.norm(t * d) + 1e-12)
    else:
      if k % STATS_EVERY == 0:
        batch = jax.tree.map(np.asarray, problem.batch_factors(unravel(jnp.asarray(flat,
                                                                                   jnp.float32))))
        if ema is None and init == "identity":
          ema = jax.tree.map(lambda b: np.eye(b.shape[0]), batch)
        ema = batch if ema is None else jax.tree.map(
            lambda e, b: DECAY * e + (1 - DECAY) * b, ema, batch)
      if k % INVERSE_EVERY == 0:
        inv = dense_inverse(problem.params, ema, DAMPING, unfactored, form)
      v = inv @ d
      e2 = RHO2 * v / np.sqrt(d @ v + 1e-12)
    flat = flat - LR * grad(flat + e2)
    records.append((e1, e2, flat, d, inv))
  return records, m


@pytest.fixture(scope="module")
def problem():
  return Problem()


@pytest.mark.parametrize("metric,sign,unfactored,init,form", [
    ("identity", -1, "zero", "identity", "exact"), ("adaptive", -1, "zero", "identity", "exact"),
    ("kfac", -1, "zero", "identity", "exact"), ("kfac", 1, "identity", "batch", "exact"),
    ("kfac", -1, "zero", "identity", "factored"), ("kfac", -1, "zero", "batch", "factored")])
def test_csam_matches_the_three_pass_reference(problem, metric, sign, unfactored, init, form):
  got, state, step = run_csam(problem, metric, sign, unfactored, init, form)
  want, momentum = reference_csam(problem, metric, sign, unfactored, init, form)
  for (e1, e2, params), (r1, r2, rparams, _, _) in zip(got, want):
    np.testing.assert_allclose(e1, r1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(e2, r2, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(params, rparams, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ravel_pytree(state[0].momentum)[0], momentum, rtol=1e-3, atol=1e-6)
  assert step._cache_size() == 1  # counters and refreshes live in the state: no recompilation
  # The last step's diagnostics are the norms of the reference's last step.
  r1, r2, _, d, inv = want[-1]
  diag = optim.step_diagnostics(state)
  np.testing.assert_allclose(diag["csam/eps1_norm"], np.linalg.norm(r1), rtol=1e-5)
  np.testing.assert_allclose(diag["csam/eps2_norm"], np.linalg.norm(r2), rtol=2e-3)
  np.testing.assert_allclose(diag["csam/d_norm"], np.linalg.norm(d), rtol=1e-3)
  if metric != "adaptive":
    np.testing.assert_allclose(diag["csam/d_dot_v"], d @ (d if inv is None else inv @ d),
                               rtol=2e-3)


def test_sign_and_metric_change_the_step(problem):
  """The reference itself distinguishes the settings (so the test above can fail)."""
  minus, plus = reference_csam(problem, "identity", -1)[0], reference_csam(problem, "identity",
                                                                            1)[0]
  assert np.linalg.norm(minus[1][1] - plus[1][1]) > 1e-3  # m ≠ 0 from the second step
  first = {(init, form): reference_csam(problem, "kfac", -1, "zero", init, form)[0][0][1]
           for init in ("identity", "batch") for form in ("exact", "factored")}
  for a, b in ((("identity", "exact"), ("batch", "exact")),
               (("identity", "exact"), ("identity", "factored")),
               (("batch", "exact"), ("batch", "factored"))):
    assert np.linalg.norm(first[a] - first[b]) > 0.05 * np.linalg.norm(first[a])
  zero = reference_csam(problem, "kfac", -1, "zero")[0][0]
  ident = reference_csam(problem, "kfac", 1, "identity")[0][0]
  unfactored = np.diag(zero[4]) == 0  # the LayerNorm parameters
  assert unfactored.sum() == 10
  assert np.all(zero[1][unfactored] == 0) and np.abs(ident[1][unfactored]).min() > 0


@pytest.mark.parametrize("sign,unfactored", [(-1, "zero"), (1, "identity")])
def test_kfac_step_maximises_the_ascent_on_the_ellipsoid(problem, sign, unfactored):
  """ε2 attains εᵀ(F + λI)ε = ρ2² and no point of that ellipsoid has a larger dᵀε."""
  (_, e2, _), = run_csam(problem, "kfac", sign, unfactored)[0][:1]
  (_, _, _, d, inv), = reference_csam(problem, "kfac", sign, unfactored)[0][:1]
  active = np.abs(np.diag(inv)) > 0 if unfactored == "zero" else np.ones(len(d), bool)
  metric = np.linalg.inv(inv[np.ix_(active, active)])
  np.testing.assert_allclose(e2[~active], 0.0)
  e2 = e2[active].astype(np.float64)
  np.testing.assert_allclose(e2 @ metric @ e2, RHO2**2, rtol=1e-3)
  u = np.random.default_rng(0).normal(size=(2000, active.sum()))
  u *= RHO2 / np.sqrt(np.einsum("ni,ij,nj->n", u, metric, u))[:, None]
  assert (u @ d[active]).max() < d[active] @ e2


def test_bad_arguments_raise_before_compilation(problem):
  with pytest.raises(ValueError, match="rho1"):
    optim.csam(-0.1, 0.2, 0.9)
  with pytest.raises(ValueError, match="rho2"):
    optim.csam(0.1, -0.2, 0.9)
  for alpha in (-0.1, 1.0):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
      optim.csam(0.1, 0.2, alpha)
  with pytest.raises(ValueError, match="identity.*adaptive.*kfac"):
    optim.csam(0.1, 0.2, 0.9, metric="fisher")
  with pytest.raises(ValueError, match="momentum_sign"):
    optim.csam(0.1, 0.2, 0.9, momentum_sign=0)
  with pytest.raises(ValueError, match="zero.*identity"):
    optim.csam(0.1, 0.2, 0.9, metric="kfac", unfactored="skip", kfac_layers=problem.layers)
  with pytest.raises(ValueError, match="kfac_layers"):
    optim.csam(0.1, 0.2, 0.9, metric="kfac")
  with pytest.raises(ValueError, match="damping"):
    optim.csam(0.1, 0.2, 0.9, metric="kfac", damping=0.0, kfac_layers=problem.layers)
  with pytest.raises(ValueError, match="stats_every must be an integer >= 1, got 0"):
    optim.csam(0.1, 0.2, 0.9, metric="kfac", schedule=kfac.Schedule(stats_every=0),
               kfac_layers=problem.layers)
  for metric in ("kfac", "identity"):
    for schedule in (50, None):
      with pytest.raises(ValueError, match="schedule must be a kfac.Schedule"):
        optim.csam(0.1, 0.2, 0.9, metric=metric, schedule=schedule, kfac_layers=problem.layers)
  with pytest.raises(ValueError, match="init must be one of .*identity.*batch.*'zeros'"):
    optim.csam(0.1, 0.2, 0.9, metric="kfac", factor_init="zeros", kfac_layers=problem.layers)
  with pytest.raises(ValueError, match="inverse must be one of .*exact.*factored.*'cholesky'"):
    optim.csam(0.1, 0.2, 0.9, metric="kfac", inverse="cholesky", kfac_layers=problem.layers)
  with pytest.raises(ValueError, match="grouped"):
    optim.csam(0.1, 0.2, 0.9, grouped=True)
  tx = optim.csam(0.1, 0.2, 0.9, metric="kfac", kfac_layers=problem.layers)
  with pytest.raises(ValueError, match="kfac_factors"):
    tx.update(problem.params, tx.init(problem.params), problem.params, grad_fn=lambda p: p)
  assert optim.nonuniform_sam is optim.csam
