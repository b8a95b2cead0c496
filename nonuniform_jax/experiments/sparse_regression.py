"""High-dimensional sparse regression with a diagonal linear network (docs/experiments.md §3).

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025), Figure 4.
Data (one draw per seed): X ~ N(0, I_d) with n training and n_test test rows;
θ*_j = |N(0, 1)| for j < r and 0 otherwise, normalised to ‖θ*‖ = 1; y = Xθ* + σ·N(0, 1) on the
training set and clean on the test set. Model f(x) = ⟨u ⊙ v, x⟩ with u, v ~ init_scale·N(0, I);
per-example loss ℓ_i = ½(⟨u ⊙ v, x_i⟩ − y_i)², so the training loss is (1/2n)‖X(u⊙v) − y‖².
Minibatches of b examples without replacement (epochs of shuffled batches), plain SGD steps
with learning rate η. Methods (the optimizers are the library's):

* ``sgd``: SGD;
* ``sam``: SAM with radius ρ (``optim.sam``);
* ``sam_gcm``: SAM whose ascent is shaped by the exact minibatch gradient covariance
  (``optim.sam_gcm``, ρ, ξ);
* ``csam``: CSAM, the nonuniformity-guided SAM (``optim.csam``, ρ1, ρ2, α, identity metric);
* ``label_noise_sgd``: SGD on labels y_B + σ_ln·N(0, 1), fresh noise every step (a reference
  whose noise is parameter dependent, like the minibatch noise the other methods shape).

Per epoch (after its last step, and at epoch 0): test loss (1/2n_test)‖X_test w − y_test‖²,
training loss on the clean training labels, ‖w‖₁, ‖w − θ*‖₂ and the off-support ‖w_{j≥r}‖₁,
w = u ⊙ v. Top-r support recovery is not reported: one true coefficient is often tiny.

The reference of HaoChen, Wei, Lee & Ma ("Shape Matters: Understanding the Implicit Bias of the
Noise Covariance", COLT 2021) runs beside it: f(x) = ⟨v ⊙ v, x⟩, noiseless labels y = Xw*,
w* with ``support`` ones, v0 = init·1, per-example loss ¼(y_i − f(x_i))², learning rate divided by
10 after 1/3 and 2/3 of the steps (as their label-noise runs), and three full-batch updates:

* ``gd``: gradient descent;
* ``label_noise_gd``: the gradient of L(v) + ¼[(y_i + δξ − f(x_i))² − (y_i − f(x_i))²] with one
  example i drawn uniformly and ξ ~ N(0, 1) per step (their label-noise gradient descent);
* ``gaussian_noise_gd``: the gradient of L plus δ·N(0, I) (isotropic noise).

Reported: the squared error ‖v ⊙ v − w*‖² (their "test error") and the training loss.
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
from nonuniform_jax.per_example import per_example_grads

METHODS = ("sgd", "sam", "sam_gcm", "csam", "label_noise_sgd")
LABELS = {"sgd": "SGD", "sam": "SAM", "sam_gcm": "SAM-GCM", "csam": "CSAM",
          "label_noise_sgd": "label-noise SGD"}
METRICS = ("test_loss", "train_loss", "l1", "error", "off_support_l1")
METRIC_LABELS = {"test_loss": "test loss", "train_loss": "training loss", "l1": "‖u⊙v‖₁",
                 "error": "‖u⊙v − θ*‖₂", "off_support_l1": "off-support ‖u⊙v‖₁"}
HAOCHEN_METHODS = ("gd", "label_noise_gd", "gaussian_noise_gd")
HAOCHEN_LABELS = {"gd": "GD", "label_noise_gd": "label-noise GD",
                  "gaussian_noise_gd": "Gaussian-noise GD"}


# ---------------------------------------------------------------- the diagonal network


def per_example_loss(params, batch) -> jax.Array:
  """ℓ_i = ½(⟨u ⊙ v, x_i⟩ − y_i)² for ``batch = {'x': [b, d], 'y': [b]}``; returns [b]."""
  return 0.5 * (batch["x"] @ (params["u"] * params["v"]) - batch["y"]) ** 2


def loss_fn(params, batch) -> jax.Array:
  """Mean loss over ``batch`` (the measures' convention)."""
  return jnp.mean(per_example_loss(params, batch))


def make_data(config: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """One seed's data: x_train [n, d], y_train [n], x_test [n_test, d], y_test, theta_star [d].

  Every Gaussian comes from one draw, sliced (one random call site compiles faster)."""
  n, n_test, d, r = config.num_train, config.num_test, config.dim, config.sparsity
  z = jax.random.normal(key, ((n + n_test) * d + d + n,))
  x = z[:n * d].reshape(n, d)
  x_test = z[n * d:(n + n_test) * d].reshape(n_test, d)
  theta = jnp.where(jnp.arange(d) < r, jnp.abs(z[(n + n_test) * d:(n + n_test + 1) * d]), 0.0)
  theta = theta / jnp.linalg.norm(theta)
  y = x @ theta + config.label_noise_std * z[(n + n_test + 1) * d:]
  return {"x_train": x, "y_train": y, "x_test": x_test, "y_test": x_test @ theta,
          "theta_star": theta}


def epoch_metrics(params, data, sparsity: int) -> dict:
  w = params["u"] * params["v"]
  return {
      "test_loss": 0.5 * jnp.mean((data["x_test"] @ w - data["y_test"]) ** 2),
      "train_loss": 0.5 * jnp.mean((data["x_train"] @ w - data["y_train"]) ** 2),
      "l1": jnp.sum(jnp.abs(w)),
      "error": jnp.linalg.norm(w - data["theta_star"]),
      "off_support_l1": jnp.sum(jnp.abs(w[sparsity:])),
  }


def optimizer(method: str, config: ml_collections.ConfigDict):
  sgd = optax.sgd(config.learning_rate)
  if method in ("sgd", "label_noise_sgd"):
    return optax.with_extra_args_support(sgd)
  if method == "sam":
    return optax.chain(optim.sam(config.sam.rho), sgd)
  if method == "sam_gcm":
    return optax.chain(optim.sam_gcm(config.sam_gcm.rho, config.sam_gcm.xi), sgd)
  c = config.csam
  return optax.chain(optim.csam(c.rho1, c.rho2, c.alpha, metric=c.metric), sgd)


def make_inputs(config: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """What one seed's runs share: the data, the initial u and v, the minibatch indices
  [epochs, batches per epoch, b] and the label noise of label-noise SGD (same shape). Drawn once
  per seed and given to every method, so the methods differ only in their updates."""
  data_key, init_key, batch_key, noise_key = jax.random.split(key, 4)
  u, v = config.init_scale * jax.random.normal(init_key, (2, config.dim))
  per_epoch = config.num_train // config.batch_size
  batches = common.shuffled_batches(batch_key, config.num_train, config.batch_size,
                                    config.num_epochs * per_epoch)
  batches = batches.reshape(config.num_epochs, per_epoch, config.batch_size)
  return {"data": make_data(config, data_key), "params": {"u": u, "v": v}, "batches": batches,
          "label_noise": config.label_noise_sgd_std * jax.random.normal(noise_key, batches.shape)}


def train(method: str, config: ml_collections.ConfigDict, inputs: dict) -> dict:
  """One seed of ``method`` from :func:`make_inputs`: the metrics of ``METRICS``, each
  [num_epochs + 1] (epoch 0 = the initialisation)."""
  data, params, batches = inputs["data"], inputs["params"], inputs["batches"]
  label_noise = (inputs["label_noise"] if method == "label_noise_sgd"
                 else jnp.zeros(batches.shape))
  tx = optimizer(method, config)

  def step(carry, step_inputs):
    params, state = carry
    idx, noise = step_inputs
    batch = {"x": data["x_train"][idx], "y": data["y_train"][idx] + noise}
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    extra = {}
    if method == "sam_gcm":
      extra["per_example_grads"] = per_example_grads(loss_fn, params, batch, per_example_loss)
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn, **extra)
    return (optax.apply_updates(params, updates), state), None

  def epoch(carry, epoch_inputs):
    carry, _ = jax.lax.scan(step, carry, epoch_inputs)
    return carry, epoch_metrics(carry[0], data, config.sparsity)

  _, metrics = jax.lax.scan(epoch, (params, tx.init(params)), (batches, label_noise))
  first = epoch_metrics(params, data, config.sparsity)
  return jax.tree.map(lambda a, m: jnp.concatenate([a[None], m]), first, metrics)


# ---------------------------------------------------------------- HaoChen et al.'s reference


def haochen_loss(v, x, y) -> jax.Array:
  """¼ mean_i (y_i − ⟨v ⊙ v, x_i⟩)² (HaoChen et al.'s scaling)."""
  return jnp.mean(0.25 * (y - x @ (v * v)) ** 2)


def haochen_label_noise(v, x_i, y_i, noise) -> jax.Array:
  """¼[(y_i + noise − f(x_i))² − (y_i − f(x_i))²], f(x) = ⟨v ⊙ v, x⟩: added to the loss, its
  gradient −noise · v ⊙ x_i is the label-noise part of HaoChen et al.'s update."""
  pred = x_i @ (v * v)
  return 0.25 * ((y_i + noise - pred) ** 2 - (y_i - pred) ** 2)


def haochen_train(method: str, hc: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """One seed of HaoChen et al.'s quadratically parameterised model (module docstring)."""
  data_key, run_key = jax.random.split(key)
  x = jax.random.normal(data_key, (hc.num_examples, hc.dim))
  w_star = (jnp.arange(hc.dim) < hc.support).astype(jnp.float32)
  y = x @ w_star
  third = hc.num_steps // 3
  tx = optax.sgd(optax.piecewise_constant_schedule(hc.learning_rate, {third: 0.1, 2 * third: 0.1}))
  v = hc.init * jnp.ones(hc.dim)

  def step(carry, k):
    v, state = carry
    k_index, k_noise = jax.random.split(k)
    grads = jax.grad(haochen_loss)(v, x, y)
    if method == "label_noise_gd":
      i = jax.random.randint(k_index, (), 0, hc.num_examples)
      noise = hc.delta * jax.random.normal(k_noise)
      grads = grads + jax.grad(haochen_label_noise)(v, x[i], y[i], noise)
    elif method == "gaussian_noise_gd":
      grads = grads + hc.delta * jax.random.normal(k_noise, v.shape)
    updates, state = tx.update(grads, state, v)
    return (optax.apply_updates(v, updates), state), None

  (v, _), _ = jax.lax.scan(step, (v, tx.init(v)), jax.random.split(run_key, hc.num_steps))
  return {"squared_error": jnp.sum((v * v - w_star) ** 2), "train_loss": haochen_loss(v, x, y),
          "l1": jnp.sum(jnp.abs(v * v))}


# ---------------------------------------------------------------- the study


def check_config(config: ml_collections.ConfigDict) -> None:
  checks.choices("method", config.methods, METHODS)
  for name in ("num_train", "num_test", "dim", "sparsity", "batch_size", "learning_rate",
               "num_epochs", "num_seeds", "init_scale"):
    checks.positive(name, config[name])
  if config.sparsity > config.dim:
    raise ValueError(f"sparsity must be <= dim={config.dim}, got {config.sparsity}")
  if config.batch_size > config.num_train:
    raise ValueError(f"batch_size must be <= num_train={config.num_train}, got "
                     f"{config.batch_size}")
  for method in config.methods:   # the optimizers check their own hyperparameters
    optimizer(method, config)
  hc = config.haochen
  if hc.enabled:
    checks.choices("haochen.method", hc.methods, HAOCHEN_METHODS)
    for name in ("dim", "support", "num_examples", "learning_rate", "num_steps", "num_seeds"):
      checks.positive(f"haochen.{name}", hc[name])
    if hc.num_steps < 3:
      raise ValueError(f"haochen.num_steps must be >= 3 (the rate drops after 1/3 and 2/3 of "
                       f"them), got {hc.num_steps}")


def compute(config: ml_collections.ConfigDict, workdir: str):
  keys = common.seed_keys(config.seed, config.num_seeds)
  inputs = jax.jit(jax.vmap(functools.partial(make_inputs, config)))(keys)
  curves, results, records = {}, {}, []
  for method in config.methods:
    out = jax.jit(jax.vmap(functools.partial(train, method, config)))(inputs)
    curves[method] = {k: np.asarray(v) for k, v in out.items()}
    results[method] = {k: common.stats(v[:, -1]) for k, v in curves[method].items()}
    results[method]["min_test_loss"] = common.stats(curves[method]["test_loss"].min(axis=1))
    for epoch in range(config.num_epochs + 1):
      record = {"method": method, "epoch": epoch}
      for k, v in curves[method].items():
        record[k] = float(v[:, epoch].mean())
        record[f"{k}_std"] = float(v[:, epoch].std())
      records.append(record)
  summary = {"methods": results}
  header = [f"method (final, mean ± std, {config.num_seeds} seeds)"]
  header += [METRIC_LABELS[k] for k in METRICS] + ["lowest test loss"]
  rows = [[LABELS[m]] + [common.mean_std(r[k]) for k in METRICS + ("min_test_loss",)]
          for m, r in results.items()]
  table = common.markdown_table(header, rows)
  if config.haochen.enabled:
    hc = config.haochen
    hc_keys = common.seed_keys(hc.seed, hc.num_seeds)
    hc_results = {}
    for method in hc.methods:
      out = jax.jit(jax.vmap(functools.partial(haochen_train, method, hc)))(hc_keys)
      hc_results[method] = {k: common.stats(v) for k, v in out.items()}
    summary["haochen"] = hc_results
    table += (f"\nHaoChen et al. reference (d={hc.dim}, {hc.num_examples} examples, w* with "
              f"{hc.support} ones, {hc.num_steps} steps, δ={hc.delta}, {hc.num_seeds} seeds):\n\n")
    table += common.markdown_table(
        ["method", "‖v⊙v − w*‖² (mean ± std)", "max over seeds", "training loss"],
        [[HAOCHEN_LABELS[m], common.mean_std(r["squared_error"]),
          f"{r['squared_error']['max']:.4g}", common.mean_std(r["train_loss"])]
         for m, r in hc_results.items()])
  plot(config, curves, workdir)
  return summary, records, table


def plot(config, curves, workdir) -> None:
  plt = common.pyplot()
  fig, axes = plt.subplots(2, 3, figsize=(13, 7))
  axes = axes.ravel()
  epochs = np.arange(config.num_epochs + 1)
  for ax, metric in zip(axes, METRICS):
    for method, c in curves.items():
      v = c[metric]
      mean = v.mean(0)
      ax.plot(epochs, mean, lw=1.5, label=LABELS[method])
      ax.fill_between(epochs, v.min(0), v.max(0), alpha=0.2)
    if metric in ("test_loss", "train_loss"):
      ax.set_yscale("log")
    ax.set(xlabel="epoch", title=METRIC_LABELS[metric])
  handles, labels = axes[0].get_legend_handles_labels()
  axes[-1].legend(handles, labels, loc="center")
  axes[-1].axis("off")
  fig.suptitle(f"sparse regression n={config.num_train}, d={config.dim}, r={config.sparsity}: "
               f"mean and min–max over {config.num_seeds} seeds", fontsize=10)
  fig.tight_layout()
  fig.savefig(f"{workdir}/sparse_regression.png", dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the study of the module docstring in ``workdir``; returns the summary (also written to
  summary.json, with metrics.jsonl, results.md and sparse_regression.png)."""
  return common.run_study(config, workdir, check_config, compute)
