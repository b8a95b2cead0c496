"""Equal sharpness, different nonuniformity: two minima of a 1-D loss (docs/experiments.md §1).

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025), the first figure.
Two examples with losses f_i(x) = min(x², c_i (x − 1)²), c = (0.1, 1.9), and f = ½(f_1 + f_2).
Both x = 0 and x = 1 are global minima (f = 0) with the same sharpness a = f''= 2, but the
per-example curvatures are (2, 2) at x = 0 and (2c_1, 2c_2) = (0.2, 3.8) at x = 1, so Wu's
nonuniformity s = sqrt(mean_i h_i² − a²) is 0 at x = 0 and 1.8 at x = 1. Wu, Ma & E (NeurIPS 2018):
SGD with learning rate η and batch b of n examples (without replacement) can stay at a minimum only
if its linear stability value

    (1 − η a)² + η² (n − b) / (b (n − 1)) · s²  ≤  1,

here 0.04 at x = 0 and 1.2064 at x = 1 (η = 0.6, n = 2, b = 1). Started at x0 = 1.0001, GD stays
at x = 1 and the stochastic methods escape to x = 0.

Methods (learning rate η, ``num_steps`` updates; every stochastic method draws one of the two
examples uniformly at random per step):

* ``gd``: gradient descent on f (both examples every step);
* ``sgd``: SGD;
* ``momentum``: SGD with heavy-ball momentum μ (Optax's trace, zero initial velocity);
* ``nesterov``: SGD with Nesterov momentum μ_t = t / (t + 2), t = 0, 1, … (Optax's Nesterov form
  with the momentum injected as a schedule);
* ``sam``: per-example SAM, x ← x − η f_i'(x + ρ sign f_i'(x)) with the library's ``optim.sam``.

Sharpness a = λ_max(H) and nonuniformity s are measured at both minima by the library's measures
(``measures.lambda_max``, ``measures.wu_nonuniformity``) and the stability
value computed from them. Entry point: ``run(config, workdir) -> summary``.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nonuniform_jax import checks, measures, optim
from nonuniform_jax.experiments import common

METHODS = ("gd", "sgd", "momentum", "nesterov", "sam")
LABELS = {"gd": "GD", "sgd": "SGD", "momentum": "SGD momentum", "nesterov": "Nesterov",
          "sam": "SAM"}
MINIMA = (0.0, 1.0)


def per_example_loss(x: jax.Array, batch) -> jax.Array:
  """ℓ_i(x) = min(x², c_i (x − 1)²) for every example of ``batch = {'c': [b]}``; returns [b]."""
  c = batch["c"]
  return jnp.minimum(x ** 2, c * (x - 1.0) ** 2)


def loss_fn(x: jax.Array, batch) -> jax.Array:
  """Mean loss over ``batch`` (the measures' convention); over both examples it is f."""
  return jnp.mean(per_example_loss(x, batch))


def optimizer(method: str, config: ml_collections.ConfigDict):
  """The Optax transformation of ``method``, accepting ``grad_fn`` (only SAM uses it)."""
  lr = config.learning_rate
  if method in ("gd", "sgd"):
    tx = optax.sgd(lr)
  elif method == "momentum":
    tx = optax.sgd(lr, momentum=config.momentum)
  elif method == "nesterov":
    tx = optax.inject_hyperparams(optax.sgd)(
        learning_rate=lr, momentum=lambda t: t / (t + 2.0), nesterov=True)
  else:
    tx = optax.chain(optim.sam(config.sam_rho), optax.sgd(lr))
  return optax.with_extra_args_support(tx)


def draw_examples(config: ml_collections.ConfigDict, key: jax.Array) -> jax.Array:
  """The example drawn at each step, [num_steps], uniform over the examples; one draw per seed,
  shared by the stochastic methods (GD ignores it)."""
  return jax.random.randint(key, (config.num_steps,), 0, len(config.coefficients))


def trajectory(method: str, config: ml_collections.ConfigDict, picks: jax.Array) -> jax.Array:
  """x_0, …, x_T [T + 1] of one run of ``method``; ``picks`` from :func:`draw_examples`."""
  coeffs = jnp.asarray(config.coefficients, jnp.float32)
  tx = optimizer(method, config)
  x0 = jnp.asarray(config.x0, jnp.float32)

  def step(carry, pick):
    x, state = carry
    batch = {"c": coeffs if method == "gd" else coeffs[pick][None]}
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    updates, state = tx.update(grad_fn(x), state, x, grad_fn=grad_fn)
    x = optax.apply_updates(x, updates)
    return (x, state), x

  _, xs = jax.lax.scan(step, (x0, tx.init(x0)), picks)
  return jnp.concatenate([x0[None], xs])


def stability_value(a: float, s: float, lr: float, n: int, b: int) -> float:
  """Wu, Ma & E's linear stability value (1 − ηa)² + η² (n − b)/(b (n − 1)) · s² (≤ 1: stable)."""
  return (1.0 - lr * a) ** 2 + lr ** 2 * (n - b) / (b * (n - 1)) * s ** 2


def minimum_measures(config: ml_collections.ConfigDict) -> dict:
  """Sharpness a and nonuniformity s at x = 0 and x = 1 by the library's measures, and the
  stability value of SGD with one example per step."""
  coeffs = jnp.asarray(config.coefficients, jnp.float32)
  batches = [{"c": coeffs}]
  n = int(coeffs.shape[0])
  key = jax.random.key(config.seed)
  out = {}
  for x in MINIMA:
    params = jnp.asarray(x, jnp.float32)
    # Power iteration: Lanczos needs num_iters <= the number of parameters, here 1.
    sharp = measures.lambda_max(loss_fn, params, batches, method="power",
                                num_iters=config.measure_iterations, key=key)
    nonuni = measures.wu_nonuniformity(
        loss_fn, params, batches, per_example_loss_fn=per_example_loss, method="power",
        num_iters=config.measure_iterations, key=key)
    a, s = sharp.pop("lambda_max"), nonuni.pop("nonuniformity")
    sharp.pop("eigenvector")
    out[f"x={x:g}"] = {"sharpness_a": a, "nonuniformity_s": s,
                       "stability": stability_value(a, s, config.learning_rate, n, 1),
                       "lambda_max_details": sharp, "wu_nonuniformity_details": nonuni}
  return out


def check_config(config: ml_collections.ConfigDict) -> None:
  checks.choices("method", config.methods, METHODS)
  for name in ("learning_rate", "num_steps", "num_seeds", "tolerance", "measure_iterations"):
    checks.positive(name, config[name])
  if len(config.coefficients) < 2:
    raise ValueError(f"coefficients needs at least two examples, got {config.coefficients!r}")
  for method in config.methods:   # the optimizers check their own hyperparameters
    optimizer(method, config)


def compute(config: ml_collections.ConfigDict, workdir: str):
  keys = common.seed_keys(config.seed, config.num_seeds)
  picks = jax.jit(jax.vmap(functools.partial(draw_examples, config)))(keys)
  tol = config.tolerance
  trajectories, results, records = {}, {}, []
  for method in config.methods:
    xs = np.asarray(jax.jit(jax.vmap(functools.partial(trajectory, method, config)))(picks))
    trajectories[method] = xs
    at_zero, at_one = np.abs(xs) < tol, np.abs(xs - 1.0) < tol
    left = ~at_one
    left_step = np.where(left.any(axis=1), left.argmax(axis=1), -1)   # first step away from 1
    final = xs[:, -1]
    results[method] = {
        "escape_rate": float(at_zero[:, -1].mean()),
        "stay_rate": float(at_one[:, -1].mean()),
        "elsewhere_rate": float(1.0 - at_zero[:, -1].mean() - at_one[:, -1].mean()),
        "median_exit_step": float(np.median(left_step[left_step >= 0]))
                            if (left_step >= 0).any() else None,
        "final_x": [float(v) for v in final],
    }
    for t in range(xs.shape[1]):
      finite = np.isfinite(xs[:, t])
      records.append({"method": method, "step": t,
                      "x_mean": float(xs[finite, t].mean()) if finite.any() else None,
                      "frac_at_zero": float(at_zero[:, t].mean()),
                      "frac_at_one": float(at_one[:, t].mean())})
  minima = minimum_measures(config)
  plot(config, trajectories, results, minima, workdir)
  rows = [[LABELS[m], f"{r['escape_rate']:.2f}", f"{r['stay_rate']:.2f}",
           f"{r['elsewhere_rate']:.2f}",
           "never" if r["median_exit_step"] is None else f"{r['median_exit_step']:g}"]
          for m, r in results.items()]
  table = common.markdown_table(
      [f"method ({config.num_seeds} seeds)", f"ended at x=0 (|x|<{tol:g})",
       f"ended at x=1", "elsewhere", "median first step with |x−1|≥tol"], rows)
  table += "\n" + common.markdown_table(
      ["minimum", "sharpness a", "nonuniformity s", "stability (1−ηa)²+η²(n−b)/(b(n−1))s²"],
      [[k, f"{v['sharpness_a']:.4f}", f"{v['nonuniformity_s']:.4f}", f"{v['stability']:.4f}"]
       for k, v in minima.items()])
  return {"methods": results, "minima": minima}, records, table


def plot(config, trajectories, results, minima, workdir) -> None:
  plt = common.pyplot()
  grid = np.linspace(-0.5, 1.5, 401, dtype=np.float32)
  coeffs = np.asarray(config.coefficients, np.float32)
  per_ex = np.minimum(grid[:, None] ** 2, coeffs * (grid[:, None] - 1.0) ** 2)
  f = per_ex.mean(axis=1)
  full = lambda x: np.mean(np.minimum(x[..., None] ** 2, coeffs * (x[..., None] - 1) ** 2), -1)

  methods = list(trajectories)
  cols = 3
  rows = -(-(len(methods) + 1) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  axes = axes.ravel()
  ax = axes[0]
  for i, c in enumerate(coeffs):
    ax.plot(grid, per_ex[:, i], "--", lw=1.2, label=f"f{i + 1} (c={c:g})")
  ax.plot(grid, f, "k-", lw=2, label="f")
  text = "\n".join(f"{k}: a={v['sharpness_a']:.3g}, s={v['nonuniformity_s']:.3g}, "
                   f"stab.={v['stability']:.5g}" for k, v in minima.items())
  ax.set_title("losses; measured at the minima", fontsize=9)
  ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=7)
  ax.set_ylim(0, 0.6)
  ax.legend(fontsize=7, loc="lower right")
  for ax, method in zip(axes[1:], methods):
    xs = trajectories[method][0]
    ax.plot(grid, f, "k-", lw=1.5)
    ax.plot(xs, full(xs), "o-", color="tab:red", ms=2.5, lw=0.6, label="seed 0")
    ax.plot(xs[-1:], full(xs[-1:]), "*", color="tab:green", ms=12, label="final")
    r = results[method]
    ax.set_title(f"{LABELS[method]}: at x=0 in {r['escape_rate']:.0%} of "
                 f"{config.num_seeds} seeds", fontsize=9)
    ax.set_xlim(grid[0], grid[-1])
    ax.set_ylim(0, 0.6)
    ax.legend(fontsize=7)
  for ax in axes[len(methods) + 1:]:
    ax.axis("off")
  fig.suptitle(f"f = mean_i min(x², c_i(x−1)²), x0 = {config.x0}, η = {config.learning_rate}, "
               f"{config.num_steps} steps", fontsize=10)
  fig.tight_layout()
  fig.savefig(f"{workdir}/toy_minima.png", dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 2.8), squeeze=False)
  for ax, method in zip(axes[0], methods):
    xs = trajectories[method][:config.figure_seeds]
    ax.plot(np.arange(xs.shape[1]), np.clip(xs, -0.5, 1.5).T, lw=0.6, alpha=0.7)
    ax.set_title(LABELS[method], fontsize=9)
    ax.set_xlabel("iteration")
    ax.set_ylim(-0.5, 1.5)
  axes[0, 0].set_ylabel(f"x (first {config.figure_seeds} seeds, clipped)")
  fig.tight_layout()
  fig.savefig(f"{workdir}/toy_minima_trajectories.png", dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the study of the module docstring in ``workdir``; returns the summary (also written to
  summary.json, with metrics.jsonl, results.md, toy_minima.png, toy_minima_trajectories.png)."""
  return common.run_study(config, workdir, check_config, compute)
