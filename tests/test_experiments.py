"""The small studies (docs/experiments.md §1–3): toy losses and gradients against hand-derived
formulas, the qualitative outcomes on reduced settings, and one end-to-end run per study."""

import itertools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sparse_regression as sparse_config
from configs import toy_minima as toy_config
from configs import two_param as two_param_config
from nonuniform_jax import train
from nonuniform_jax.experiments import common, sparse_regression, toy_minima, two_param

# ---------------------------------------------------------------- §1 toy: hand-derived formulas


@jax.jit
def _toy_value_grad_curvature(x, batch):   # compiled once for every point below
  return (toy_minima.per_example_loss(x, batch)[0], jax.grad(toy_minima.loss_fn)(x, batch),
          jax.hessian(toy_minima.loss_fn)(x, batch))


@pytest.mark.parametrize("x", [-0.7, -0.2, 0.1, 0.3, 0.5, 0.9, 1.0001, 1.4, 2.5])
@pytest.mark.parametrize("c", [0.1, 1.9])
def test_toy_example_loss_gradient_curvature(x, c):
  # ℓ = min(x², c(x−1)²): the branch with the smaller value, its derivative and curvature.
  x = float(np.float32(x))                     # the point the float32 code sees
  on_zero_branch = x ** 2 < c * (x - 1) ** 2
  want_loss = x ** 2 if on_zero_branch else c * (x - 1) ** 2
  want_grad = 2 * x if on_zero_branch else 2 * c * (x - 1)
  want_curv = 2.0 if on_zero_branch else 2 * c
  loss, grad, curv = _toy_value_grad_curvature(jnp.float32(x), {"c": jnp.array([c], jnp.float32)})
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(curv, want_curv, rtol=1e-5)


def test_toy_full_loss_by_hand():
  # x = 0.5: f1 = min(0.25, 0.025) = 0.025, f2 = min(0.25, 0.475) = 0.25, f = 0.1375;
  # f' = ½(0.2·(0.5 − 1) + 2·0.5) = 0.45.
  batch = {"c": jnp.array([0.1, 1.9])}
  np.testing.assert_allclose(toy_minima.loss_fn(jnp.float32(0.5), batch), 0.1375, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(toy_minima.loss_fn)(jnp.float32(0.5), batch), 0.45,
                             rtol=1e-6)


def test_stability_value_reproduces_the_paper():
  # (1 − ηa)² + η²(n − b)/(b(n − 1))s², η = 0.6, n = 2, b = 1.
  assert toy_minima.stability_value(2.0, 0.0, 0.6, 2, 1) == pytest.approx(0.04)
  assert toy_minima.stability_value(2.0, 1.8, 0.6, 2, 1) == pytest.approx(1.2064)


def test_toy_nesterov_momentum_schedule():
  # Optax's Nesterov form with μ_t = t/(t+2): v_t = g + μ_t v_{t−1}, step = −η(g + μ_t v_t).
  config = toy_config.get_config()
  tx = toy_minima.optimizer("nesterov", config)
  x = jnp.float32(1.0)
  state = tx.init(x)
  v, want = 0.0, []
  for t in range(4):
    mu = t / (t + 2)
    v = 1.0 + mu * v
    want.append(-0.6 * (1.0 + mu * v))
    update, state = tx.update(jnp.float32(1.0), state, x, grad_fn=None)
    np.testing.assert_allclose(update, want[-1], rtol=1e-6)


# ---------------------------------------------------------------- §2, §3: hand-derived formulas


def test_two_param_loss_and_gradient_by_hand():
  # θ = (0.3, −0.2), x = 2, y = 0.5: r = θ1θ2x − y = −0.62, ℓ = ½r² = 0.1922,
  # ∇ℓ = r·x·(θ2, θ1) = (0.248, −0.372).
  theta = jnp.array([0.3, -0.2])
  batch = {"x": jnp.array([2.0]), "y": jnp.array([0.5])}
  np.testing.assert_allclose(two_param.per_example_loss(theta, batch), [0.1922], rtol=1e-5)
  np.testing.assert_allclose(jax.grad(two_param.loss_fn)(theta, batch), [0.248, -0.372],
                             rtol=1e-5)


def test_sparse_regression_loss_and_gradient_by_hand():
  rng = np.random.default_rng(3)
  params = {"u": rng.normal(size=7).astype(np.float32), "v": rng.normal(size=7).astype(np.float32)}
  batch = {"x": rng.normal(size=(5, 7)).astype(np.float32),
           "y": rng.normal(size=5).astype(np.float32)}
  r = batch["x"] @ (params["u"] * params["v"]) - batch["y"]
  np.testing.assert_allclose(sparse_regression.per_example_loss(params, batch), 0.5 * r ** 2,
                             rtol=1e-5)
  grads = jax.grad(sparse_regression.loss_fn)(params, batch)
  # ∂/∂u ½r² = r x ⊙ v, ∂/∂v = r x ⊙ u, averaged over the batch.
  np.testing.assert_allclose(grads["u"], np.mean(r[:, None] * batch["x"], 0) * params["v"],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["v"], np.mean(r[:, None] * batch["x"], 0) * params["u"],
                             rtol=1e-4, atol=1e-6)


def test_haochen_gradients_by_hand():
  rng = np.random.default_rng(4)
  v, x, y = (rng.normal(size=s).astype(np.float32) for s in (6, (4, 6), 4))
  res = y - x @ (v * v)
  # ∇ ¼ mean (y − ⟨v⊙v, x⟩)² = −mean(res · x) ⊙ v.
  np.testing.assert_allclose(jax.grad(sparse_regression.haochen_loss)(v, x, y),
                             -np.mean(res[:, None] * x, 0) * v, rtol=1e-4, atol=1e-6)
  # The label-noise term's gradient is −noise · v ⊙ x_i.
  np.testing.assert_allclose(
      jax.grad(sparse_regression.haochen_label_noise)(v, x[1], y[1], 0.7), -0.7 * v * x[1],
      rtol=1e-4, atol=1e-6)


def test_sparse_regression_data():
  config = sparse_config.get_config()
  data = sparse_regression.make_data(config, jax.random.key(0))
  theta = np.asarray(data["theta_star"])
  assert np.linalg.norm(theta) == pytest.approx(1.0, rel=1e-5)
  assert (theta[:3] > 0).all() and (theta[3:] == 0).all()
  np.testing.assert_allclose(data["y_test"], data["x_test"] @ theta, rtol=1e-5, atol=1e-5)
  residual = np.asarray(data["y_train"] - data["x_train"] @ theta)
  assert 0.1 < residual.std() < 0.3           # label noise 0.2 on 100 points


def test_shuffled_batches_are_epochs_without_replacement():
  idx = np.asarray(common.shuffled_batches(jax.random.key(0), 10, 3, 7))
  assert idx.shape == (7, 3)
  for epoch in (idx[0:3], idx[3:6]):           # 3 batches per epoch, one example left out
    assert len(set(epoch.ravel())) == 9
  assert not np.array_equal(idx[0:3], idx[3:6])


# ---------------------------------------------------------------- qualitative outcomes, end to end


def _table_cells(line: str) -> list[str]:
  """The cells of a markdown table row, split at the '|' that are not escaped as '\\|'."""
  return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def _assert_tables_well_formed(text: str):
  """Every row of every markdown table in ``text`` has as many cells as its header."""
  tables = [list(rows) for is_table, rows in itertools.groupby(
      text.splitlines(), lambda line: line.startswith("|")) if is_table]
  assert tables
  for table in tables:
    width = len(_table_cells(table[0]))
    for row in table[1:]:
      assert len(_table_cells(row)) == width, (table[0], row)


def test_markdown_table_escapes_bars_in_cells():
  table = common.markdown_table(["min|θi|/max|θi|", "b"], [["|x−1| ≥ 0.1", 2], [3, "c"]])
  _assert_tables_well_formed(table)
  assert _table_cells(table.splitlines()[0]) == [" min\\|θi\\|/max\\|θi\\| ", " b "]


def _assert_outputs(workdir, summary, figures, lines):
  for name in ("config.json", "summary.json", "metrics.jsonl", "results.md") + figures:
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "results.md")) as f:
    _assert_tables_well_formed(f.read())
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == summary
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len(f.read().splitlines()) == lines


def test_toy_minima_gd_stays_sgd_escapes(tmp_path):
  config = toy_config.get_config()             # the paper's x0, η, 200 steps, 100 seeds
  config.methods = ("gd", "sgd")
  summary = train.train_and_evaluate(config, str(tmp_path))   # the trainer's dispatch
  methods = summary["results"]["methods"]
  assert methods["gd"]["escape_rate"] == 0.0 and methods["gd"]["stay_rate"] == 1.0
  assert methods["sgd"]["escape_rate"] >= 0.7  # measured: 0.90 of 100 seeds
  minima = summary["results"]["minima"]
  for x, s, stability in (("x=0", 0.0, 0.04), ("x=1", 1.8, 1.2064)):
    assert minima[x]["sharpness_a"] == pytest.approx(2.0, abs=1e-4)
    assert minima[x]["nonuniformity_s"] == pytest.approx(s, abs=1e-4)
    assert minima[x]["stability"] == pytest.approx(stability, abs=1e-4)
  _assert_outputs(str(tmp_path), summary, ("toy_minima.png", "toy_minima_trajectories.png"),
                  2 * 201)
  # A completed workdir is not run again; a different config there is refused.
  assert toy_minima.run(config, str(tmp_path)) == summary
  config.num_steps = 10
  with pytest.raises(ValueError, match="different config"):
    toy_minima.run(config, str(tmp_path))


def test_two_param_end_to_end(tmp_path):
  config = two_param_config.get_config()
  config.num_examples, config.num_steps, config.num_seeds, config.log_every = 1000, 400, 2, 100
  summary = two_param.run(config, str(tmp_path))
  for method in ("sgd", "sam", "cov"):
    assert np.isfinite(summary["results"]["methods"][method]["final_theta"]).all()
  _assert_outputs(str(tmp_path), summary, ("two_param.png",), 3 * 5)


def test_sparse_regression_ordering(tmp_path):
  # Reduced: 100 of 400 epochs, 3 seeds. SAM-GCM < SAM < SGD in test loss and ‖u⊙v‖₁ held on
  # every single seed of seeds 0–2, 10–12 and 20–22, with test-loss ratios of 1.5× or more; the
  # means asserted here are 0.011 < 0.026 < 0.061 (test loss) and 2.35 < 3.17 < 4.16 (‖u⊙v‖₁).
  # HaoChen et al.'s label-noise GD needs 300 000 steps for an error below 1e-2; after 60 000 its
  # error (below 4 here) is already a tenth of GD's (above 50).
  config = sparse_config.get_config()
  config.methods = ("sgd", "sam", "sam_gcm")
  config.num_epochs, config.num_seeds = 100, 3
  config.haochen.methods = ("gd", "label_noise_gd")
  config.haochen.num_steps, config.haochen.num_seeds = 60_000, 2
  summary = sparse_regression.run(config, str(tmp_path))
  r = summary["results"]["methods"]
  for metric in ("test_loss", "l1"):
    assert r["sam_gcm"][metric]["mean"] < r["sam"][metric]["mean"] < r["sgd"][metric]["mean"]
  hc = summary["results"]["haochen"]
  assert hc["label_noise_gd"]["squared_error"]["max"] < hc["gd"]["squared_error"]["min"] / 10
  _assert_outputs(str(tmp_path), summary, ("sparse_regression.png",), 3 * 101)


def test_bad_method_is_refused_before_anything_is_written(tmp_path):
  config = sparse_config.get_config()
  config.methods = ("sgd", "adam")
  with pytest.raises(ValueError, match="unknown method 'adam'"):
    sparse_regression.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_bad_optimizer_setting_is_refused_before_anything_is_written(tmp_path):
  config = toy_config.get_config()
  config.sam_rho = -0.1
  with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
    toy_minima.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)
