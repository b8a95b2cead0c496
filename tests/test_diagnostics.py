"""The README diagnostics against explicit loops and scipy, and the measure that computes them
from a model against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from nonuniform_jax import measures, models
from nonuniform_jax.models import layers


def tree(rng):
  """A parameter-shaped tree: a conv layer, a dense layer, a norm layer and a top-level leaf."""
  return {
      "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 5)), "bias": rng.normal(size=5)},
      "Block_0": {"Dense_0": {"kernel": rng.normal(size=(4, 6))}},  # no bias
      "LayerNorm_0": {"scale": rng.normal(size=6), "bias": rng.normal(size=6)},
      "cls": rng.normal(size=(1, 1, 6)),
  }


def test_channel_gradient_norm_variance():
  grads = tree(np.random.default_rng(0))
  out = measures.channel_gradient_norm_variance(grads)
  assert sorted(out) == ["Block_0/Dense_0", "Conv_0"]
  conv = grads["Conv_0"]
  norms = [np.sqrt(np.sum(conv["kernel"][..., c] ** 2) + conv["bias"][c] ** 2) for c in range(5)]
  np.testing.assert_allclose(out["Conv_0"], np.var(norms), rtol=1e-5)
  dense = grads["Block_0"]["Dense_0"]["kernel"]
  norms = [np.linalg.norm(dense[:, c]) for c in range(6)]
  np.testing.assert_allclose(out["Block_0/Dense_0"], np.var(norms), rtol=1e-5)


def test_update_moments_match_scipy():
  updates = tree(np.random.default_rng(1))
  out = measures.update_moments(updates)
  assert sorted(out) == ["Block_0/Dense_0", "Conv_0", "LayerNorm_0", "cls"]
  pooled = {
      "Conv_0": np.concatenate([updates["Conv_0"]["kernel"].ravel(), updates["Conv_0"]["bias"]]),
      "LayerNorm_0": np.concatenate([updates["LayerNorm_0"]["bias"],
                                     updates["LayerNorm_0"]["scale"]]),
      "cls": updates["cls"].ravel(),
  }
  for name, values in pooled.items():
    m = np.abs(values)
    np.testing.assert_allclose(out[name]["skewness"], scipy.stats.skew(m), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[name]["kurtosis"], scipy.stats.kurtosis(m), rtol=1e-4,
                               atol=1e-6)


def test_class_loss_imbalance():
  rng = np.random.default_rng(2)
  losses = rng.exponential(size=20)
  labels = rng.integers(0, 3, size=20)  # class 3 of 4 never occurs
  mask = np.arange(20) < 17  # the last three are padding
  out = measures.class_loss_imbalance(losses, labels, 4, mask=mask)
  means = [losses[mask & (labels == c)].mean() for c in range(3)]
  np.testing.assert_allclose(out["class_losses"][:3], means, rtol=1e-5)
  assert np.isnan(out["class_losses"][3]) and out["num_classes_present"] == 3
  np.testing.assert_allclose(out["imbalance"], np.std(means), rtol=1e-5)
  one_hot = np.eye(4)[labels]
  assert measures.class_loss_imbalance(losses, one_hot, 4, mask=mask)["imbalance"] == pytest.approx(
      out["imbalance"])
  with pytest.raises(ValueError, match="num_classes"):
    measures.class_loss_imbalance(losses, labels, 0)


def test_activation_disparity():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(7, 5, 6)) * np.arange(1, 7)  # [examples, tokens, units], unequal units
  mask = np.arange(7) < 5
  units = np.abs(a[mask]).mean(axis=(0, 1))
  np.testing.assert_allclose(measures.activation_disparity(a, mask=mask),
                             np.std(units) / np.mean(units), rtol=1e-5)
  assert measures.activation_disparity(np.ones((4, 3))) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="activations"):
    measures.activation_disparity(np.ones(4))


def test_nonuniformity_diagnostics_against_brute_force():
  """The measure over two batches of different sizes equals the array functions applied to the
  losses, mean gradient and layer inputs of the concatenated data, computed directly."""
  model = models.get_model("mlp", 3, widths=(8,))
  rng = np.random.default_rng(4)
  x = rng.normal(size=(19, 5)).astype(np.float32) * np.arange(1, 6, dtype=np.float32)
  y = rng.integers(0, 3, 19)
  batches = [{"inputs": x[:12], "labels": y[:12]}, {"inputs": x[12:], "labels": y[12:]}]
  params = model.init(jax.random.key(0), x)["params"]

  def per_example_loss(params, x):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y)

  def capture_loss_fn(params, perturbations, batch):
    logits, state = model.apply({"params": params, "perturbations": perturbations},
                                batch["inputs"], mutable=["kfac"])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]),
            state["kfac"])

  def perturbations_fn(batch):
    return layers.zero_perturbations(model, {"params": params}, batch["inputs"])

  out = measures.nonuniformity_diagnostics(capture_loss_fn, params, batches,
                                           perturbations_fn=perturbations_fn, num_classes=4)
  grads = jax.grad(lambda p: jnp.mean(per_example_loss(p, x)))(params)
  _, state = model.apply({"params": params}, x, capture_intermediates=True,
                         mutable=["intermediates"])
  hidden = jax.nn.relu(state["intermediates"]["Dense_0"]["__call__"][0])  # Dense_1's input
  imbalance = measures.class_loss_imbalance(per_example_loss(params, x), y, 4)
  moments = measures.update_moments(grads)
  channels = measures.channel_gradient_norm_variance(grads)
  want = {"class_loss_imbalance": imbalance["imbalance"],
          "activation_disparity/Dense_0": measures.activation_disparity(x),
          "activation_disparity/Dense_1": measures.activation_disparity(hidden)}
  for name in ("Dense_0", "Dense_1"):
    want[f"channel_grad_norm_var/{name}"] = channels[name]
    want[f"update_skewness/{name}"] = moments[name]["skewness"]
    want[f"update_kurtosis/{name}"] = moments[name]["kurtosis"]
  assert set(out) == set(want) | {"class_losses", "num_examples", "num_batches"}
  for key, value in want.items():
    np.testing.assert_allclose(out[key], value, rtol=1e-4, atol=1e-7, err_msg=key)
  np.testing.assert_allclose(out["class_losses"], imbalance["class_losses"], rtol=1e-5)
  assert np.isnan(out["class_losses"][3])   # class 3 of num_classes=4 is absent
  assert (out["num_examples"], out["num_batches"]) == (19, 2)
  # Without num_classes: the largest label + 1 (3 classes, all present; the same spread).
  default = measures.nonuniformity_diagnostics(capture_loss_fn, params, batches,
                                               perturbations_fn=perturbations_fn)
  assert len(default["class_losses"]) == 3
  assert default["class_loss_imbalance"] == pytest.approx(out["class_loss_imbalance"])
  with pytest.raises(ValueError, match="'labels'"):
    measures.nonuniformity_diagnostics(capture_loss_fn, params, [{"inputs": x}],
                                       perturbations_fn=perturbations_fn)
  with pytest.raises(ValueError, match="num_classes=2"):
    measures.nonuniformity_diagnostics(capture_loss_fn, params, batches,
                                       perturbations_fn=perturbations_fn, num_classes=2)
