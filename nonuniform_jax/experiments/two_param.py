"""An explicit gradient-noise penalty on a two-parameter model (docs/experiments.md §2).

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025), the second figure.
Data: x_i = 2·N(0, 1), y_i = θ*_1 θ*_2 x_i + e_i, e_i ~ N(0, 1), i = 1..n; model θ1 θ2 x with
per-example loss ℓ_i(θ) = ½(θ1 θ2 x_i − y_i)². The minima form the hyperbola θ1 θ2 = z,
z = Σ x_i y_i / Σ x_i², whose points differ in norm: the per-example gradient is
(θ1θ2x_i − y_i) x_i (θ2, θ1), so at a minimum tr Σ ∝ ‖θ‖² and the flattest, least noisy
minima are the balanced ones |θ1| = |θ2| = sqrt|z|.

Methods, from θ0 = (0.1, 0.19) with learning rate η and minibatches of b examples (epochs of
shuffled batches, without replacement):

* ``sgd``: plain SGD;
* ``sam``: SAM with radius ρ (the library's ``optim.sam``);
* ``cov``: SGD on L + (aλ/2) tr Σ_B, a = (n − b)/(b(n − 1)) (the library's ``optim.cov``).

Every seed draws its own data and batch order; within a seed the methods share them. Expected:
all reach the hyperbola; COV, then SAM, end at a more balanced point of smaller norm.
Entry point: ``run(config, workdir) -> summary``.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nonuniform_jax import checks, optim
from nonuniform_jax.experiments import common

METHODS = ("sgd", "sam", "cov")
LABELS = {"sgd": "SGD", "sam": "SAM", "cov": "COV"}


def per_example_loss(theta: jax.Array, batch) -> jax.Array:
  """ℓ_i(θ) = ½(θ1 θ2 x_i − y_i)² for ``batch = {'x': [b], 'y': [b]}``; θ is [2]; returns [b]."""
  return 0.5 * (theta[0] * theta[1] * batch["x"] - batch["y"]) ** 2


def loss_fn(theta: jax.Array, batch) -> jax.Array:
  """Mean loss over ``batch`` (the measures' convention)."""
  return jnp.mean(per_example_loss(theta, batch))


def make_data(config: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """The n training pairs {'x': [n], 'y': [n]} of one seed."""
  z = jax.random.normal(key, (2, config.num_examples))
  x = config.x_scale * z[0]
  return {"x": x, "y": config.theta_product * x + config.noise_std * z[1]}


def optimizer(method: str, config: ml_collections.ConfigDict):
  sgd = optax.sgd(config.learning_rate)
  if method == "sgd":
    return optax.with_extra_args_support(sgd)
  if method == "sam":
    return optax.chain(optim.sam(config.sam_rho), sgd)
  return optax.chain(optim.cov(config.cov_lambda, n=config.num_examples), sgd)


def make_inputs(config: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """What one seed's runs share: the data and the minibatch indices [num_steps, b]."""
  data_key, batch_key = jax.random.split(key)
  return {"data": make_data(config, data_key),
          "batches": common.shuffled_batches(batch_key, config.num_examples, config.batch_size,
                                             config.num_steps)}


def trajectory(method: str, config: ml_collections.ConfigDict, inputs: dict) -> jax.Array:
  """θ_0, …, θ_T [T + 1, 2] of one seed of ``method`` on :func:`make_inputs`' data and batches."""
  data, batches = inputs["data"], inputs["batches"]
  tx = optimizer(method, config)
  theta0 = jnp.asarray(config.init, jnp.float32)

  def step(carry, idx):
    theta, state = carry
    batch = jax.tree.map(lambda v: v[idx], data)
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    updates, state = tx.update(grad_fn(theta), state, theta, grad_fn=grad_fn,
                               per_example_loss_fn=per_example_loss, batch=batch)
    theta = optax.apply_updates(theta, updates)
    return (theta, state), theta

  _, thetas = jax.lax.scan(step, (theta0, tx.init(theta0)), batches)
  return jnp.concatenate([theta0[None], thetas])


def full_losses(thetas: np.ndarray, data: dict) -> np.ndarray:
  """Training loss on all n examples at each θ of ``thetas`` [..., 2]."""
  prod = thetas[..., 0] * thetas[..., 1]
  return np.mean(0.5 * (prod[..., None] * data["x"] - data["y"]) ** 2, axis=-1)


def check_config(config: ml_collections.ConfigDict) -> None:
  checks.choices("method", config.methods, METHODS)
  for name in ("learning_rate", "num_steps", "num_seeds", "num_examples", "batch_size",
               "log_every"):
    checks.positive(name, config[name])
  if config.batch_size > config.num_examples:
    raise ValueError(f"batch_size must be <= num_examples={config.num_examples}, got "
                     f"{config.batch_size}")
  if len(config.init) != 2:
    raise ValueError(f"init must be two numbers (θ1, θ2), got {config.init!r}")
  for method in config.methods:   # the optimizers check their own hyperparameters
    optimizer(method, config)


def compute(config: ml_collections.ConfigDict, workdir: str):
  keys = common.seed_keys(config.seed, config.num_seeds)
  inputs = jax.jit(jax.vmap(functools.partial(make_inputs, config)))(keys)
  datas = [{k: np.asarray(v[s]) for k, v in inputs["data"].items()}
           for s in range(config.num_seeds)]
  z = np.array([np.sum(d["x"] * d["y"]) / np.sum(d["x"] ** 2) for d in datas])
  min_norm = np.sqrt(2 * np.abs(z))            # ‖θ‖ at the balanced minima |θ1| = |θ2| = √|z|
  min_loss = np.array([full_losses(np.array([np.sqrt(abs(zs)), np.sign(zs) * np.sqrt(abs(zs))]),
                                   d) for zs, d in zip(z, datas)])
  logged = np.unique(np.r_[np.arange(0, config.num_steps + 1, config.log_every),
                           config.num_steps])
  trajectories, results, records = {}, {}, []
  for method in config.methods:
    thetas = np.asarray(
        jax.jit(jax.vmap(functools.partial(trajectory, method, config)))(inputs))
    trajectories[method] = thetas
    final = thetas[:, -1]
    norms = np.linalg.norm(thetas, axis=-1)
    losses = np.stack([full_losses(thetas[s, logged], datas[s]) for s in range(len(datas))])
    results[method] = {
        "final_theta": [[float(a), float(b)] for a, b in final],
        "norm": common.stats(norms[:, -1]),
        "norm_over_min_norm": common.stats(norms[:, -1] / min_norm),
        "product": common.stats(final[:, 0] * final[:, 1]),
        "balance": common.stats(np.minimum(np.abs(final[:, 0]), np.abs(final[:, 1]))
                                / np.maximum(np.abs(final[:, 0]), np.abs(final[:, 1]))),
        "train_loss": common.stats(losses[:, -1]),
        "excess_train_loss": common.stats(losses[:, -1] - min_loss),
    }
    for j, t in enumerate(logged):
      records.append({"method": method, "step": int(t), "norm": float(norms[:, t].mean()),
                      "norm_std": float(norms[:, t].std()),
                      "product": float(np.mean(thetas[:, t, 0] * thetas[:, t, 1])),
                      "train_loss": float(losses[:, j].mean())})
  plot(config, trajectories, datas[0], z[0], workdir)
  rows = [[LABELS[m], common.mean_std(r["norm"]), common.mean_std(r["norm_over_min_norm"]),
           common.mean_std(r["balance"]), common.mean_std(r["product"]),
           common.mean_std(r["excess_train_loss"])] for m, r in results.items()]
  table = common.markdown_table(
      [f"method (mean ± std, {config.num_seeds} seeds)", "final ‖θ‖",
       "‖θ‖ / min-norm minimum", "balance min|θi|/max|θi|", "θ1θ2", "train loss − min loss"], rows)
  table += (f"\nLeast-squares product z (the hyperbola θ1θ2 = z): "
            f"{common.mean_std(common.stats(z))}; min-norm minimum ‖θ‖ = √(2|z|) = "
            f"{common.mean_std(common.stats(min_norm))}.\n")
  out = {"methods": results, "z": common.stats(z), "min_norm": common.stats(min_norm)}
  return out, records, table


def plot(config, trajectories, data, z, workdir) -> None:
  plt = common.pyplot()
  lim = 0.25
  grid = np.linspace(-lim, lim, 101)
  t1, t2 = np.meshgrid(grid, grid)
  loss = full_losses(np.stack([t1, t2], -1), data)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
  cs = ax1.contour(t1, t2, loss, levels=30, linewidths=0.6)
  ax1.clabel(cs, inline=True, fontsize=6)
  branch = np.linspace(0.01, lim, 200)
  for sign in (1, -1):
    ax1.plot(sign * branch, z / (sign * branch), ":", color="gray", lw=1)
  r = np.sqrt(abs(z))
  ax1.plot([r, -r], [np.sign(z) * r, -np.sign(z) * r], "*", ms=14, color="gold", mec="k",
           label="min-norm minima")
  for method, thetas in trajectories.items():
    ax1.plot(thetas[0, :, 0], thetas[0, :, 1], lw=1.5, label=LABELS[method])
  ax1.plot(*config.init, "ko", ms=4)
  ax1.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="θ1", ylabel="θ2", aspect="equal",
          title=f"training loss, seed 0 (hyperbola θ1θ2 = {z:.4f})")
  ax1.legend(fontsize=8)
  for method, thetas in trajectories.items():
    norms = np.linalg.norm(thetas, axis=-1)
    steps = np.arange(norms.shape[1])
    mean, std = norms.mean(0), norms.std(0)
    ax2.plot(steps, mean, label=LABELS[method])
    ax2.fill_between(steps, mean - std, mean + std, alpha=0.25)
  ax2.set(xlabel="iteration", ylabel="‖θ‖",
          title=f"‖θ‖ (mean ± std over {config.num_seeds} seeds)")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(f"{workdir}/two_param.png", dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the study of the module docstring in ``workdir``; returns the summary (also written to
  summary.json, with metrics.jsonl, results.md and two_param.png)."""
  return common.run_study(config, workdir, check_config, compute)
