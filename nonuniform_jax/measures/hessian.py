"""Curvature of a loss: Hessian-vector products, top eigenvalues, trace and spectral density.

The loss is the mean over the union of ``batches`` (sizes n_b, n = Σ_b n_b)::

    L(θ) = Σ_b (n_b / n) · loss_fn(θ, B_b),      H = ∇²L(θ)

and H is never materialised: every estimator only applies H v = ∂/∂ε ∇L(θ + εv) |_{ε=0},
forward-over-reverse (``jax.jvp`` of ``jax.grad``), batch by batch inside one jitted function,
and runs its iterations on device (``lax`` loops, no host sync per iteration).

* ``hvp``: H v for a pytree v like ``params`` (``grouped_hvp`` inside other jitted code).
* ``top_eigenvalues`` / ``lambda_max``: the largest eigenvalues by Lanczos with full
  reorthogonalisation (default) or by power iteration with deflation, with the residual
  ‖H u − λ u‖ of every returned pair (as PyHessian, Yao et al. 2020, reports for power iteration).
* ``hessian_trace``: Hutchinson's estimator tr H ≈ (1/P) Σ_p z_pᵀ H z_p, z_p Rademacher
  (Hutchinson 1989; Avron & Toledo 2011), with its standard error.
* ``hessian_esd``: the spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang 2016;
  Ghorbani, Krishnan & Xiao, ICML 2019; PyHessian), and ``esd_density`` to smooth it.

The operator-level pieces (``lanczos``, ``eigsh``, ``slq``) take any symmetric ``matvec`` on flat
vectors and may be used inside other jitted code (e.g. for mean_i H_i² − H²).

``loss_fn(params, batch) -> scalar mean loss``; to close over arrays that change between calls
(BatchNorm statistics) without recompiling, pass ``jax.tree_util.Partial(f, state)``.
"""

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from nonuniform_jax import checks
from nonuniform_jax.measures import batching
from nonuniform_jax.per_example import LossFn
from nonuniform_jax.pytree import parameter_count

MatVec = Callable[[jax.Array], jax.Array]
METHODS = ("lanczos", "power")


# ---------------------------------------------------------------- operators on flat vectors


class Lanczos(NamedTuple):
  """The Lanczos decomposition A Q_s ≈ Q_s T_s after s steps (s ≤ m = ``num_iters``).

  alphas: [m] diagonal of T (entries ≥ s unused). betas: [m] off-diagonal, betas[j] = T[j, j+1];
  0 where the Krylov space became invariant and the basis was restarted. vectors: [m + 1, d]
  orthonormal rows q_0..q_s (the rest zero). steps: s, the number of matrix-vector products.
  """
  alphas: jax.Array
  betas: jax.Array
  vectors: jax.Array
  steps: jax.Array


def _ritz(alphas, betas, steps):
  """Eigenvalues (descending) and eigenvectors (columns) of T_s, padded to m × m.

  The unused entries are given a diagonal value below every eigenvalue of T_s (Gershgorin) and
  no coupling, so the first s columns are exactly T_s's eigenpairs, zero-padded."""
  m = alphas.shape[0]
  valid = jnp.arange(m) < steps
  off = jnp.where(valid[1:], betas[:-1], 0)
  radius = jnp.abs(jnp.concatenate([off, jnp.zeros(1, off.dtype)]))
  radius = radius + jnp.abs(jnp.concatenate([jnp.zeros(1, off.dtype), off]))
  lower = jnp.min(jnp.where(valid, alphas - radius, jnp.inf))
  diag = jnp.where(valid, alphas, lower - 1 - jnp.abs(lower))
  t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
  values, vectors = jnp.linalg.eigh(t)
  return values[::-1], vectors[:, ::-1]


def lanczos(matvec: MatVec, v0: jax.Array, num_iters: int, *, k: int = 1,
            tol: float = 0.0) -> Lanczos:
  """Lanczos tridiagonalisation of a symmetric operator A on R^d, started at v0/‖v0‖.

  Every new vector is orthogonalised against all previous ones (classical Gram–Schmidt, twice),
  so T_s = Q_sᵀ A Q_s holds to rounding. When the Krylov space becomes invariant (β ≤ 100·ε·‖T‖)
  the basis continues, with β = 0, from the coordinate vector e_j least covered by the basis
  (smallest Σ_r q_rj², so e_j is not in its span) orthogonalised against it: T stays
  block-diagonal and every Ritz value remains valid. Stops after ``num_iters`` ≤ d steps or, with
  ``tol`` > 0, once the k largest Ritz pairs have ‖A u − θ u‖ = β_s |s_last| ≤ tol·|θ|.
  Memory: (num_iters + 1) · d. Traceable; not jitted itself.
  """
  m = num_iters
  d, dtype = v0.shape[0], v0.dtype
  eps = jnp.finfo(dtype).eps

  def orthogonalise(w, basis):
    for _ in range(2):
      w = w - basis.T @ (basis @ w)
    return w

  def restart(basis):
    e = jnp.zeros(d, dtype).at[jnp.argmin(jnp.sum(basis**2, axis=0))].set(1)
    r = orthogonalise(e, basis)
    return r / jnp.linalg.norm(r)

  def converged(alphas, betas, steps, breakdown):
    values, vectors = _ritz(alphas, betas, steps)
    estimate = jnp.abs(betas[steps - 1] * vectors[steps - 1, :k])
    # At a restart every estimate is 0, but the new block may still hold a larger eigenvalue.
    return (steps >= k) & ~breakdown & jnp.all(estimate <= tol * jnp.abs(values[:k]))

  def body(state):
    j, basis, alphas, betas, norm, _ = state
    w = matvec(basis[j])
    alpha = jnp.vdot(basis[j], w)
    w = orthogonalise(w, basis)
    beta = jnp.linalg.norm(w)
    norm = jnp.maximum(norm, jnp.abs(alpha) + beta)
    breakdown = beta <= 100 * eps * norm
    q = lax.cond(breakdown, lambda: restart(basis), lambda: w / beta)
    basis = basis.at[j + 1].set(q)
    alphas = alphas.at[j].set(alpha)
    betas = betas.at[j].set(jnp.where(breakdown, 0, beta))
    done = converged(alphas, betas, j + 1, breakdown) if tol > 0 else jnp.array(False)
    return j + 1, basis, alphas, betas, norm, done

  basis = jnp.zeros((m + 1, d), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  zeros = jnp.zeros(m, dtype)
  init = (jnp.array(0), basis, zeros, zeros, jnp.zeros((), dtype), jnp.array(False))
  steps, basis, alphas, betas, _, _ = lax.while_loop(
      lambda s: (s[0] < m) & ~s[5], body, init)
  return Lanczos(alphas, betas, basis, steps)


def _power_iteration(matvec, dim, key, k, num_iters, tol, dtype):
  """k dominant (largest |λ|) eigenpairs, one at a time, each by power iteration on the operator
  deflated by projection, P A P with P = I − U Uᵀ over the pairs already found."""
  vectors = jnp.zeros((k, dim), dtype)
  values = jnp.zeros(k, dtype)
  iterations = []
  starts = jax.random.normal(key, (k, dim), dtype)
  for i in range(k):
    def operator(v, found=vectors):
      w = matvec(v - found.T @ (found @ v))
      return w - found.T @ (found @ w)

    def step(v):
      w = operator(v)
      lam = jnp.vdot(v, w)
      return w, lam, jnp.linalg.norm(w - lam * v)

    def body(state):
      t, _, w, _, _ = state
      v = w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(dtype).tiny)
      return (t + 1, v, *step(v))

    v = starts[i] - vectors.T @ (vectors @ starts[i])
    v = v / jnp.linalg.norm(v)
    t, v, _, lam, _ = lax.while_loop(
        lambda s: (s[0] < num_iters) & (s[4] > tol * jnp.abs(s[3])), body, (1, v, *step(v)))
    vectors = vectors.at[i].set(v)
    values = values.at[i].set(lam)
    iterations.append(t)
  return values, vectors, sum(iterations)


def eigsh(matvec: MatVec, dim: int, *, key: jax.Array, k: int = 1, method: str = "lanczos",
          num_iters: int = 100, tol: float = 1e-3, dtype=jnp.float32) -> dict:
  """Top-k eigenpairs of a symmetric operator A on R^dim (traceable; not jitted itself).

  ``method='lanczos'``: the k algebraically largest eigenvalues (descending) from at most
  ``num_iters`` ≤ dim Lanczos steps, stopping once every pair has ‖A u − θ u‖ ≤ tol·|θ|
  (``tol`` = 0: always ``num_iters`` steps). ``method='power'``: the k largest in magnitude, in
  the order found, each by at most ``num_iters`` power iterations with the same stopping rule.

  Returns eigenvalues [k], eigenvectors [k, dim] (unit rows), residuals [k] = ‖A u − λ u‖
  computed explicitly (k more products), iterations (products inside the loops) and converged
  (every residual ≤ tol·|λ|).
  """
  if method == "lanczos":
    run = lanczos(matvec, jax.random.normal(key, (dim,), dtype), num_iters, k=k, tol=tol)
    ritz_values, ritz_vectors = _ritz(run.alphas, run.betas, run.steps)
    values = ritz_values[:k]
    vectors = ritz_vectors[:, :k].T @ run.vectors[:num_iters]
    vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    iterations = run.steps
  else:
    values, vectors, iterations = _power_iteration(matvec, dim, key, k, num_iters, tol, dtype)
  residuals = lax.map(lambda pair: jnp.linalg.norm(matvec(pair[1]) - pair[0] * pair[1]),
                      (values, vectors))
  return {"eigenvalues": values, "eigenvectors": vectors, "residuals": residuals,
          "iterations": iterations, "converged": jnp.all(residuals <= tol * jnp.abs(values))}


def slq(matvec: MatVec, probes: jax.Array, num_iters: int):
  """Stochastic Lanczos quadrature of a symmetric operator A from probe vectors [P, d].

  For probe v (normalised), m = ``num_iters`` Lanczos steps give T_m = S diag(θ) Sᵀ and the
  Gauss quadrature vᵀ f(A) v ≈ Σ_i w_i f(θ_i) with nodes θ_i and weights w_i = S_{0i}², exact
  for polynomials f of degree ≤ 2m − 1. Returns (nodes, weights), each [P, m]; the weights of a
  probe sum to 1. For Rademacher or Gaussian probes, E[Σ_i w_i θ_i^j] = tr(A^j)/d.
  """
  def one(probe):
    run = lanczos(matvec, probe, num_iters)
    nodes, vectors = _ritz(run.alphas, run.betas, run.steps)
    return nodes, vectors[0] ** 2
  return lax.map(one, probes)


# ---------------------------------------------------------------- the Hessian of a loss


def grouped_hvp(loss_fn: LossFn, params, groups, v):
  """H v over the batches of ``groups`` (``batching.group_batches``): ``hvp`` without its
  grouping and jit, for use inside other jitted code (e.g. mean_i H_i² − H², ``measures.wu``)."""
  def per_batch(batch, index):
    del index
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))[1]
  return batching.batch_mean(per_batch, groups)


def _flat_operator(loss_fn, params, groups):
  """(θ ravelled, unravel, v ↦ H v on ravelled vectors)."""
  flat, unravel = ravel_pytree(params)
  def matvec(x):
    return ravel_pytree(grouped_hvp(loss_fn, params, groups, unravel(x)))[0]
  return flat, unravel, matvec


_hvp_jit = jax.jit(grouped_hvp)


def hvp(loss_fn: LossFn, params, batches: Sequence[Any], v):
  """H v, the Hessian of the size-weighted mean loss over ``batches`` at ``params`` applied to a
  pytree ``v`` like ``params`` (forward-over-reverse, one batch at a time; H never formed)."""
  groups = batching.group_batches(batches)
  return _hvp_jit(batching.as_loss_pytree(loss_fn), params, groups, v)


def _settings(groups, **settings) -> dict:
  return {**settings, "num_examples": batching.total_examples(groups),
          "num_batches": batching.num_batches(groups)}


@functools.partial(jax.jit, static_argnames=("k", "method", "num_iters", "tol"))
def _top_eigenvalues(loss_fn, params, groups, key, k, method, num_iters, tol):
  flat, unravel, matvec = _flat_operator(loss_fn, params, groups)
  out = eigsh(matvec, flat.size, key=key, k=k, method=method, num_iters=num_iters, tol=tol,
              dtype=flat.dtype)
  out["eigenvectors"] = jax.vmap(unravel)(out["eigenvectors"])
  return out


def top_eigenvalues(loss_fn: LossFn, params, batches: Sequence[Any], k: int, *,
                    method: str = "lanczos", num_iters: int = 100, tol: float = 1e-3,
                    key=None) -> dict:
  """The k largest eigenvalues of H (see ``eigsh`` for the two methods and the stopping rule).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar mean loss``.
    params: any pytree of float arrays.
    batches: a sequence of batches; H is the Hessian of the size-weighted mean loss.
    k: number of eigenvalues, ≥ 1.
    method: 'lanczos' (algebraically largest, descending) or 'power' (largest magnitude, with
      deflation, in the order found).
    num_iters: at most this many Hessian-vector products in the Lanczos loop (k ≤ num_iters ≤
      number of parameters), or per eigenvalue for power iteration.
    tol: stop once ‖H u − λ u‖ ≤ tol·|λ| for every pair; 0 runs all ``num_iters``.
    key: PRNG key or int seed (start vector); None means seed 0.

  Returns:
    A dict: eigenvalues [k], residuals [k] (‖H u − λ u‖, computed explicitly), eigenvectors (a
    pytree like ``params`` with a leading k axis, unit norm), iterations (HVPs in the loop),
    num_hvps (iterations + k), converged, and the settings (k, method, num_iters, tol, seed,
    num_examples, num_batches).
  """
  checks.integer("k", k, 1)
  checks.choice("method", method, METHODS)
  checks.integer("num_iters", num_iters, 1)
  checks.non_negative("tol", tol)
  dim = parameter_count(params)
  if k > dim:
    raise ValueError(f"k={k} exceeds the number of parameters {dim}")
  if method == "lanczos":
    if num_iters < k:
      raise ValueError(f"num_iters={num_iters} must be at least k={k} for Lanczos")
    num_iters = min(num_iters, dim)   # a Krylov space cannot grow past the dimension
  groups = batching.group_batches(batches)
  key, seed = batching.make_key(key)
  out = _top_eigenvalues(batching.as_loss_pytree(loss_fn), params, groups, key, k=k,
                         method=method, num_iters=num_iters, tol=float(tol))
  iterations = int(out["iterations"])
  return {"eigenvalues": np.asarray(out["eigenvalues"]),
          "residuals": np.asarray(out["residuals"]),
          "eigenvectors": out["eigenvectors"],
          "iterations": iterations, "num_hvps": iterations + k,
          "converged": bool(out["converged"]),
          **_settings(groups, k=k, method=method, num_iters=num_iters, tol=float(tol),
                      seed=seed)}


def lambda_max(loss_fn: LossFn, params, batches: Sequence[Any], *, method: str = "lanczos",
               num_iters: int = 100, tol: float = 1e-3, key=None) -> dict:
  """λ_max(H), the sharpness: ``top_eigenvalues`` with k = 1.

  Returns a dict: lambda_max, residual ‖H u − λ u‖, eigenvector (pytree like ``params``),
  iterations, num_hvps, converged and the settings.
  """
  out = top_eigenvalues(loss_fn, params, batches, 1, method=method, num_iters=num_iters,
                        tol=tol, key=key)
  return {"lambda_max": float(out.pop("eigenvalues")[0]),
          "residual": float(out.pop("residuals")[0]),
          "eigenvector": jax.tree.map(lambda x: x[0], out.pop("eigenvectors")),
          **{name: value for name, value in out.items() if name != "k"}}


@functools.partial(jax.jit, static_argnames=("num_probes",))
def _hutchinson(loss_fn, params, groups, key, num_probes):
  flat, _, matvec = _flat_operator(loss_fn, params, groups)
  def sample(probe_key):
    z = jax.random.rademacher(probe_key, flat.shape, flat.dtype)
    return jnp.vdot(z, matvec(z))
  return lax.map(sample, jax.random.split(key, num_probes))


def hessian_trace(loss_fn: LossFn, params, batches: Sequence[Any], *, num_probes: int = 100,
                  key=None) -> dict:
  """tr H by Hutchinson's estimator with Rademacher probes z_p (one HVP each)::

      tr H ≈ (1/P) Σ_p z_pᵀ H z_p,   stderr = std_p(z_pᵀ H z_p) / √P

  Unbiased; Var(zᵀHz) = 2(‖H‖_F² − Σ_j H_jj²), so the estimate is exact for diagonal H.

  Returns a dict: trace, stderr (NaN for one probe), samples [P], and the settings
  (num_probes, seed, num_examples, num_batches).
  """
  checks.integer("num_probes", num_probes, 1)
  groups = batching.group_batches(batches)
  key, seed = batching.make_key(key)
  samples = np.asarray(_hutchinson(batching.as_loss_pytree(loss_fn), params, groups, key,
                                   num_probes=num_probes), np.float64)
  stderr = samples.std(ddof=1) / np.sqrt(num_probes) if num_probes > 1 else float("nan")
  return {"trace": float(samples.mean()), "stderr": float(stderr), "samples": samples,
          **_settings(groups, num_probes=num_probes, seed=seed)}


@functools.partial(jax.jit, static_argnames=("num_iters", "num_probes"))
def _esd(loss_fn, params, groups, key, num_iters, num_probes):
  flat, _, matvec = _flat_operator(loss_fn, params, groups)
  probes = jax.random.rademacher(key, (num_probes, flat.size), flat.dtype)
  return slq(matvec, probes, num_iters)


def hessian_esd(loss_fn: LossFn, params, batches: Sequence[Any], *, num_iters: int = 100,
                num_probes: int = 1, key=None) -> dict:
  """The empirical spectral density of H by stochastic Lanczos quadrature (see ``slq``)::

      φ(x) = (1/d) Σ_i δ(x − λ_i) ≈ (1/P) Σ_p Σ_j w_pj δ(x − θ_pj)

  with Rademacher probes and ``num_iters`` Lanczos steps each (PyHessian's defaults: 100 steps,
  1 probe). Σ_j w_pj θ_pj^q estimates tr(H^q)/d, exactly in expectation for q ≤ 2·num_iters − 1.
  Smooth it with ``esd_density``. Probes run one after another, each holding a Lanczos basis of
  (num_iters + 1) × (number of parameters) floats.

  Returns a dict: nodes [P, m], weights [P, m] (each row sums to 1), and the settings
  (num_iters, num_probes, seed, num_examples, num_batches).
  """
  checks.integer("num_iters", num_iters, 1)
  checks.integer("num_probes", num_probes, 1)
  dim = parameter_count(params)
  if num_iters > dim:
    raise ValueError(f"num_iters={num_iters} exceeds the number of parameters {dim}")
  groups = batching.group_batches(batches)
  key, seed = batching.make_key(key)
  nodes, weights = _esd(batching.as_loss_pytree(loss_fn), params, groups, key,
                        num_iters=num_iters, num_probes=num_probes)
  return {"nodes": np.asarray(nodes), "weights": np.asarray(weights),
          **_settings(groups, num_iters=num_iters, num_probes=num_probes, seed=seed)}


def esd_density(nodes, weights, grid=None, *, sigma: float | None = None,
                num_points: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The Gaussian-smoothed spectral density (1/P) Σ_p Σ_j w_pj N(x; θ_pj, σ²) on a grid.

  Args:
    nodes, weights: from ``hessian_esd`` (or ``slq``), [P, m] or [m].
    grid: points x; default ``num_points`` points covering the nodes with a margin.
    sigma: the Gaussian's standard deviation; default 1% of the nodes' range (or of their
      magnitude when all coincide).

  Returns:
    (grid, density), numpy arrays; the density integrates to 1 over a grid that covers it.
  """
  nodes = np.asarray(nodes, np.float64).reshape(-1, np.shape(nodes)[-1])
  weights = np.asarray(weights, np.float64).reshape(nodes.shape)
  low, high = nodes.min(), nodes.max()
  if sigma is None:
    sigma = 0.01 * ((high - low) or max(abs(high), 1.0))
  checks.positive("sigma", sigma)
  if grid is None:
    margin = 0.05 * (high - low) + 5 * sigma
    grid = np.linspace(low - margin, high + margin, num_points)
  grid = np.asarray(grid, np.float64)
  gauss = np.exp(-0.5 * ((grid[:, None, None] - nodes) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
  return grid, np.einsum("xpj,pj->x", gauss, weights) / nodes.shape[0]
