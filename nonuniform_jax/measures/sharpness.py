"""Perturbation sharpness: how much the loss rises when the weights move.

With L_B the mean loss on batch B, c = |θ| (``adaptive``, elementwise) or 1, and every
expectation over ``batches`` weighted by batch size (n_b / n):

* ``sam_sharpness``:  E_B[L_B(θ + ε_B) − L_B(θ)], ε_B the SAM (or ASAM) ascent step along ∇L_B
  (Foret et al., ICLR 2021; Kwon et al., ICML 2021), exactly as ``optim.sam`` takes it.
* ``worst_case_sharpness``:  E_B[max_{‖δ ⊘ c‖_p ≤ ρ} L_B(θ + δ) − L_B(θ)], p ∈ {2, ∞}, by
  projected gradient ascent on each batch (Andriushchenko et al., "A Modern Look at the
  Relationship between Sharpness and Generalization", ICML 2023).
* ``average_sharpness``:  E_B E_{δ ~ N(0, ρ² diag(c²))}[L_B(θ + δ) − L_B(θ)] (same paper).
* ``pacbayes_flatness``:  1/σ'², σ' the largest σ whose Gaussian weight noise moves a training
  metric by a target (Jiang et al., "Fantastic Generalization Measures and Where to Find Them",
  ICLR 2020), plain or magnitude-aware.

Every function takes ``loss_fn(params, batch) -> scalar mean loss``, ``params`` (any pytree),
``batches`` (a sequence of batches, sizes may differ) and ``key`` where random (a PRNG key or an
int seed; None means 0); batch b draws from ``fold_in(key, b)``. All loops run on device.
To close over arrays that change between calls (BatchNorm statistics) without recompiling, pass
``loss_fn = jax.tree_util.Partial(f, state)`` with ``f(state, params, batch)``.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax import lax

from nonuniform_jax import checks
from nonuniform_jax.measures import batching
from nonuniform_jax.optim.sam import global_norm, sam_perturbation
from nonuniform_jax.per_example import LossFn, num_examples

NORMS = ("2", "inf")


def _norm_name(p) -> str:
  """'2' or 'inf' from p ∈ {2, '2', inf, 'inf'}."""
  if isinstance(p, str):
    if p in NORMS:
      return p
  elif p == 2:
    return "2"
  elif p == float("inf"):
    return "inf"
  raise ValueError(f"unknown p {p!r}; choose one of [2, inf]")


def _scale(params, adaptive: bool):
  """c: |θ| elementwise (adaptive) or None (c = 1)."""
  return jax.tree.map(jnp.abs, params) if adaptive else None


def _times(scale, tree):
  return tree if scale is None else otu.tree_mul(scale, tree)


def _result(groups, out: dict, **settings) -> dict:
  return {**{name: float(value) for name, value in out.items()}, **settings,
          "num_examples": batching.total_examples(groups),
          "num_batches": batching.num_batches(groups)}


# ---------------------------------------------------------------- SAM sharpness


@functools.partial(jax.jit, static_argnames=("adaptive",))
def _sam_sharpness(loss_fn, params, groups, rho, eta, adaptive):
  def per_batch(batch, index):
    del index
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    eps = sam_perturbation(grads, params, rho, adaptive, eta)
    return {"loss": loss, "perturbed_loss": loss_fn(otu.tree_add(params, eps), batch)}
  out = batching.batch_mean(per_batch, groups)
  return {"sharpness": out["perturbed_loss"] - out["loss"], **out}


def sam_sharpness(loss_fn: LossFn, params, batches: Sequence[Any], rho: float, *,
                  adaptive: bool = False, eta: float = 0.0) -> dict:
  """E_B[L_B(θ + ε_B) − L_B(θ)] with SAM's step ε_B = ρ ∇L_B/‖∇L_B‖ on each batch.

  ``adaptive=True`` takes ASAM's step ε_B = ρ T² ∇L_B/‖T ∇L_B‖, T = |θ| + η on kernels and 1
  elsewhere (``optim.sam.sam_perturbation``). One gradient and two losses per batch.

  Returns a dict: sharpness, loss (E_B L_B(θ)), perturbed_loss, and the settings (rho,
  adaptive, eta, num_examples, num_batches).
  """
  checks.non_negative("rho", rho)
  checks.non_negative("eta", eta)
  groups = batching.group_batches(batches)
  out = _sam_sharpness(batching.as_loss_pytree(loss_fn), params, groups, rho, eta,
                       adaptive=bool(adaptive))
  return _result(groups, out, rho=float(rho), adaptive=bool(adaptive), eta=float(eta))


# ---------------------------------------------------------------- worst-case sharpness


@functools.partial(jax.jit, static_argnames=("p", "adaptive", "num_steps", "random_init"))
def _worst_case(loss_fn, params, groups, key, rho, step_size, p, adaptive, num_steps,
                random_init):
  scale = _scale(params, adaptive)

  def direction(g):  # steepest ascent direction for the unit ball of the norm
    if p == "2":
      return otu.tree_scale(1 / (global_norm(g) + 1e-12), g)
    return jax.tree.map(jnp.sign, g)

  def project(d):
    if p == "2":
      return otu.tree_scale(jnp.minimum(1, rho / (global_norm(d) + 1e-12)), d)
    return jax.tree.map(lambda x: jnp.clip(x, -rho, rho), d)

  def init(batch_key):
    if not random_init:
      return otu.tree_zeros_like(params)
    if p == "2":  # uniform on the sphere of radius ρ
      z = otu.tree_random_like(batch_key, params)
      return otu.tree_scale(rho / global_norm(z), z)
    return otu.tree_random_like(  # uniform in the box
        batch_key, params, lambda k, s, dt: jax.random.uniform(k, s, dt, -rho, rho))

  def per_batch(batch, index):
    def loss_at(d):  # d = δ ⊘ c, the coordinates in which the constraint is a ball
      return loss_fn(otu.tree_add(params, _times(scale, d)), batch)

    def step(_, state):
      d, best_d, best_g, best_loss, eta = state
      loss, g = jax.value_and_grad(loss_at)(d)
      better = loss > best_loss
      best_d, best_g = otu.tree_where(better, (d, g), (best_d, best_g))
      best_loss = jnp.where(better, loss, best_loss)
      eta = jnp.where(better, eta, eta / 2)  # overshoot: go back to the best point, halve
      d = project(otu.tree_add_scale(best_d, eta, direction(best_g)))
      return d, best_d, best_g, best_loss, eta

    clean = loss_fn(params, batch)
    d0 = init(jax.random.fold_in(key, index))
    state = (d0, d0, otu.tree_zeros_like(d0), jnp.full((), -jnp.inf, clean.dtype),
             jnp.asarray(step_size, clean.dtype))
    d, _, _, best_loss, _ = lax.fori_loop(0, num_steps, step, state)
    # δ = 0 is feasible, so the maximum is at least the clean loss.
    worst = jnp.maximum(jnp.maximum(best_loss, loss_at(d)), clean)
    return {"loss": clean, "perturbed_loss": worst}

  out = batching.batch_mean(per_batch, groups)
  return {"sharpness": out["perturbed_loss"] - out["loss"], **out}


def worst_case_sharpness(loss_fn: LossFn, params, batches: Sequence[Any], rho: float, *,
                         p=2, adaptive: bool = False, num_steps: int = 20,
                         step_size: float | None = None, random_init: bool = True,
                         key=None) -> dict:
  """E_B[max_{‖δ ⊘ c‖_p ≤ ρ} L_B(θ + δ) − L_B(θ)] by projected gradient ascent per batch.

  The ascent runs in d = δ ⊘ c, where the constraint is the ball ‖d‖_p ≤ ρ (c = |θ| when
  ``adaptive``, so a weight at 0 does not move): from d_0 (uniform on the ℓ2 sphere / in the
  ℓ∞ box of radius ρ with ``random_init``, else 0), each of ``num_steps`` steps evaluates the loss
  and gradient at d_t, keeps the best point seen, and proposes
  d_{t+1} = Π(d_best + η_t u(∇_d L_B)), u(g) = g/‖g‖₂ (p = 2) or sign(g) (p = ∞), Π the
  projection on the ball. η_0 = ``step_size`` (default 2ρ, as Auto-PGD) is halved whenever a
  step fails to raise the loss. The value is the largest loss seen, including at δ = 0, so it is
  a lower bound on the maximum. Andriushchenko et al. (ICML 2023) use 20 steps on batches of
  128 examples.

  Args:
    loss_fn, params, batches: as every measure.
    rho: radius ρ ≥ 0.
    p: 2 or inf (``float('inf')`` or 'inf').
    adaptive: scale the ball by c = |θ| (elementwise adaptive sharpness).
    num_steps: gradient evaluations per batch.
    step_size: the first step η_0 in units of d; None means 2ρ.
    random_init: start from a random point of the ball (needed at an exact stationary point).
    key: PRNG key or int seed for the random start.

  Returns a dict: sharpness, loss, perturbed_loss (means over batches), and the settings (rho,
  p, adaptive, num_steps, step_size, random_init, seed, num_examples, num_batches).
  """
  checks.non_negative("rho", rho)
  p = _norm_name(p)
  checks.integer("num_steps", num_steps, 1)
  step_size = 2.0 * rho if step_size is None else step_size
  checks.non_negative("step_size", step_size)
  groups = batching.group_batches(batches)
  key, seed = batching.make_key(key)
  out = _worst_case(batching.as_loss_pytree(loss_fn), params, groups, key, rho, step_size, p=p,
                    adaptive=bool(adaptive), num_steps=num_steps, random_init=bool(random_init))
  return _result(groups, out, rho=float(rho), p=p, adaptive=bool(adaptive),
                 num_steps=num_steps, step_size=float(step_size),
                 random_init=bool(random_init), seed=seed)


# ---------------------------------------------------------------- average sharpness


@functools.partial(jax.jit, static_argnames=("adaptive", "num_draws"))
def _average(loss_fn, params, groups, key, rho, adaptive, num_draws):
  scale = _scale(params, adaptive)
  n = batching.total_examples(groups)

  def per_batch(batch, index):
    clean = loss_fn(params, batch)

    def draw(draw_key):
      z = otu.tree_random_like(draw_key, params)
      return loss_fn(otu.tree_add_scale(params, rho, _times(scale, z)), batch) - clean

    rises = lax.map(draw, jax.random.split(jax.random.fold_in(key, index), num_draws))
    weight = num_examples(batch) / n
    # Var of Σ_b w_b mean_b = Σ_b w_b² Var_b / S; batch_mean supplies one factor w_b.
    variance = weight * jnp.var(rises, ddof=1) / num_draws if num_draws > 1 else jnp.nan
    return {"sharpness": jnp.mean(rises), "loss": clean, "variance": variance}

  out = batching.batch_mean(per_batch, groups)
  return {"sharpness": out["sharpness"], "stderr": jnp.sqrt(out["variance"]),
          "loss": out["loss"]}


def average_sharpness(loss_fn: LossFn, params, batches: Sequence[Any], rho: float, *,
                      adaptive: bool = False, num_draws: int = 20, key=None) -> dict:
  """E_B E_{δ ~ N(0, ρ² diag(c²))}[L_B(θ + δ) − L_B(θ)], c = |θ| (adaptive) or 1, by
  ``num_draws`` Gaussian draws per batch (Andriushchenko et al., ICML 2023).

  Returns a dict: sharpness, stderr (of the Monte Carlo mean), loss, and the settings (rho,
  adaptive, num_draws, seed, num_examples, num_batches).
  """
  checks.non_negative("rho", rho)
  checks.integer("num_draws", num_draws, 1)
  groups = batching.group_batches(batches)
  key, seed = batching.make_key(key)
  out = _average(batching.as_loss_pytree(loss_fn), params, groups, key, rho,
                 adaptive=bool(adaptive), num_draws=num_draws)
  return _result(groups, out, rho=float(rho), adaptive=bool(adaptive), num_draws=num_draws,
                 seed=seed)


# ---------------------------------------------------------------- PAC-Bayes flatness


@functools.partial(jax.jit, static_argnames=("magnitude_aware", "search_depth", "num_samples"))
def _pacbayes(metric_fn, params, groups, key, target, tolerance, sigma_max, magnitude_eps,
              magnitude_aware, search_depth, num_samples):
  def metric(p):
    return batching.batch_mean(lambda batch, index: metric_fn(p, batch), groups)

  clean = metric(params)
  sample_keys = jax.random.split(key, num_samples)

  def deviation(sigma):
    def one(sample_key):
      z = otu.tree_random_like(sample_key, params)
      if magnitude_aware:
        z = jax.tree.map(lambda x, t: x * jnp.sqrt(sigma**2 * t**2 + magnitude_eps**2), z, params)
      else:
        z = otu.tree_scale(sigma, z)
      return metric(otu.tree_add(params, z))
    return jnp.abs(jnp.mean(lax.map(one, sample_keys)) - clean)

  def body(state):
    i, low, high, _, _, _ = state
    sigma = (low + high) / 2
    dev = deviation(sigma)
    too_far = dev > target
    return (i + 1, jnp.where(too_far, low, sigma), jnp.where(too_far, sigma, high), sigma, dev,
            jnp.abs(dev - target) < tolerance)

  zero = jnp.zeros((), clean.dtype)
  init = (0, zero, jnp.asarray(sigma_max, clean.dtype), zero, zero, jnp.array(False))
  i, _, _, sigma, dev, reached = lax.while_loop(
      lambda s: (s[0] < search_depth) & ~s[5], body, init)
  return {"sigma": sigma, "deviation": dev, "clean_metric": clean, "iterations": i,
          "reached": reached}


def pacbayes_flatness(loss_fn: LossFn, params, batches: Sequence[Any], *,
                      metric_fn: LossFn | None = None, target: float = 0.1,
                      magnitude_aware: bool = False, magnitude_eps: float = 1e-3,
                      sigma_max: float = 2.0, search_depth: int = 15, tolerance: float = 1e-2,
                      num_samples: int = 10, key=None) -> dict:
  """PAC-Bayes flatness 1/σ'² (Jiang et al., ICLR 2020, "pacbayes.flatness" and
  "pacbayes.mag.flatness").

  σ' is found by bisection on [0, ``sigma_max``] so that weight noise u moves the metric M by
  ``target``: |E_u M(θ + u) − M(θ)| ≈ target, with u ~ N(0, σ² I) (plain) or
  u_j ~ N(0, σ² θ_j² + ε²) (``magnitude_aware``, ε = ``magnitude_eps``). E_u is a mean over
  ``num_samples`` draws, the same draws at every σ (common random numbers, so the deviation
  varies smoothly with σ); M is the size-weighted mean over ``batches``. The search stops after
  ``search_depth`` halvings or once the deviation is within ``tolerance`` of the target.
  Jiang et al. use the training accuracy (``metric_fn``) and a drop of 0.1 (the defaults here
  follow their protocol: depth 15, tolerance 0.01, σ ≤ 2).

  Args:
    loss_fn: ``loss_fn(params, batch) -> mean loss``; the metric when ``metric_fn`` is None.
    metric_fn: ``metric_fn(params, batch) -> mean metric``, e.g. the accuracy.
    target: the deviation of the metric to reach (an accuracy drop of 0.1 by default).

  Returns a dict: flatness (1/σ'²), sigma (σ'), deviation (reached at σ'), clean_metric (M(θ)),
  iterations, reached (|deviation − target| < tolerance), and the settings (target,
  magnitude_aware, magnitude_eps, sigma_max, search_depth, tolerance, num_samples, seed,
  metric ('metric_fn' or 'loss_fn'), num_examples, num_batches).
  """
  for name, value in (("target", target), ("sigma_max", sigma_max), ("tolerance", tolerance),
                      ("magnitude_eps", magnitude_eps)):
    checks.non_negative(name, value)
  checks.integer("search_depth", search_depth, 1)
  checks.integer("num_samples", num_samples, 1)
  groups = batching.group_batches(batches)
  key, seed = batching.make_key(key)
  out = _pacbayes(batching.as_loss_pytree(loss_fn if metric_fn is None else metric_fn), params,
                  groups, key, target, tolerance, sigma_max, magnitude_eps,
                  magnitude_aware=bool(magnitude_aware), search_depth=search_depth,
                  num_samples=num_samples)
  sigma = float(out["sigma"])
  result = _result(groups, {"sigma": sigma, "deviation": out["deviation"],
                            "clean_metric": out["clean_metric"]},
                   target=float(target), magnitude_aware=bool(magnitude_aware),
                   magnitude_eps=float(magnitude_eps), sigma_max=float(sigma_max),
                   search_depth=search_depth, tolerance=float(tolerance),
                   num_samples=num_samples, seed=seed,
                   metric="loss_fn" if metric_fn is None else "metric_fn")
  return {"flatness": 1 / sigma**2 if sigma > 0 else float("inf"),
          "iterations": int(out["iterations"]), "reached": bool(out["reached"]), **result}
