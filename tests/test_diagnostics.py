"""The README diagnostics against explicit loops and scipy."""

import numpy as np
import pytest
import scipy.stats

from nonuniform_jax import measures


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
