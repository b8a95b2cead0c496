"""Cheap diagnostics of nonuniformity named in the paper's README, logged beside the measures.

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025) lists, besides the
gradient noise, four quick signs of uneven training. Each is a function of arrays (gradients,
updates, per-example losses, activations) that the caller already has; none runs a model.

* ``channel_gradient_norm_variance``: per layer, Var_c ‖∇W_{·,c}‖ over output channels c.
* ``update_moments``: per layer, skewness and excess kurtosis of the update magnitudes |u_j|.
* ``class_loss_imbalance``: std over classes of the mean per-class loss.
* ``activation_disparity``: coefficient of variation over units of the mean |activation|.

A "layer" is a module of the parameter tree: the leaves sharing a parent path, named by that path
joined with '/' as ``optim.kfac`` names layers (a leaf at the top of the tree is its own layer).
Every function returns Python floats; statistics of a constant (zero spread) are NaN.
"""

from typing import Any

import jax
import jax.numpy as jnp

from nonuniform_jax.measures.gradient_noise import _layer_name


def _layers(tree) -> dict[str, dict[str, jax.Array]]:
  """``{layer: {leaf name: leaf}}`` (see the module docstring)."""
  out: dict[str, dict[str, jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf_name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1]))) if path else ""
    out.setdefault(_layer_name(path), {})[leaf_name] = jnp.asarray(leaf, jnp.float32)
  return out


def channel_gradient_norm_variance(grads) -> dict[str, float]:
  """Per layer with a ``kernel``: the variance over output channels c of the channel's gradient
  norm, n_c = sqrt(‖∇kernel[..., c]‖² + (∇bias_c)²) (Flax kernels keep output channels last, for
  Dense [d_in, F] and Conv [*window, C, F] alike; the bias term only where the layer has one).

  Returns ``{layer: Var_c n_c}`` (biased variance over the F channels). ``grads`` is any
  gradient pytree, e.g. the mean gradient of a batch.
  """
  out = {}
  for name, leaves in _layers(grads).items():
    if "kernel" not in leaves:
      continue
    kernel = leaves["kernel"]
    sq = jnp.sum(kernel.reshape(-1, kernel.shape[-1]) ** 2, axis=0)
    if "bias" in leaves:
      sq = sq + leaves["bias"] ** 2
    out[name] = float(jnp.var(jnp.sqrt(sq)))
  return out


def update_moments(updates) -> dict[str, dict[str, float]]:
  """Per layer, the shape of the distribution of update magnitudes m_j = |u_j| over the layer's
  parameters j (all its leaves pooled)::

      skewness = E[(m − μ)³] / σ³,   kurtosis = E[(m − μ)⁴] / σ⁴ − 3   (excess; 0 for a Gaussian)

  with μ, σ the mean and (biased) standard deviation of m — the Fisher–Pearson moments of
  ``scipy.stats.skew``/``kurtosis`` with their defaults. ``updates`` is any pytree of parameter
  updates (e.g. the optimizer's output for one step).

  Returns ``{layer: {'skewness': ..., 'kurtosis': ...}}``.
  """
  out = {}
  for name, leaves in _layers(updates).items():
    m = jnp.abs(jnp.concatenate([x.ravel() for x in leaves.values()]))
    centred = m - jnp.mean(m)
    var = jnp.mean(centred ** 2)
    out[name] = {"skewness": float(jnp.mean(centred ** 3) / var ** 1.5),
                 "kurtosis": float(jnp.mean(centred ** 4) / var ** 2 - 3.0)}
  return out


def class_loss_imbalance(losses, labels, num_classes: int, mask=None) -> dict[str, Any]:
  """The spread of the loss across classes: with L_c the mean loss of the examples of class c,

      imbalance = sqrt(mean_c (L_c − mean_c' L_c')²)   over the classes present (std, biased)

  Args:
    losses: [n] per-example losses.
    labels: [n] integer classes, or [n, num_classes] one-hot/soft labels (the argmax is used).
    num_classes: number of classes C.
    mask: optional [n] booleans; False examples (padding) are ignored.

  Returns:
    dict: ``imbalance`` (float), ``class_losses`` ([C] numpy array, NaN for absent classes) and
    ``num_classes_present``.
  """
  if not (isinstance(num_classes, int) and num_classes >= 1):
    raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
  losses = jnp.asarray(losses, jnp.float32)
  labels = jnp.asarray(labels)
  if labels.ndim == 2:
    labels = jnp.argmax(labels, axis=-1)
  weight = jnp.ones_like(losses) if mask is None else jnp.asarray(mask, jnp.float32)
  counts = jax.ops.segment_sum(weight, labels, num_classes)
  totals = jax.ops.segment_sum(weight * losses, labels, num_classes)
  present = counts > 0
  class_losses = jnp.where(present, totals / jnp.where(present, counts, 1.0), jnp.nan)
  mean = jnp.nanmean(class_losses)
  imbalance = jnp.sqrt(jnp.nanmean((class_losses - mean) ** 2))
  return {"imbalance": float(imbalance), "class_losses": jax.device_get(class_losses),
          "num_classes_present": int(jnp.sum(present))}


def activation_disparity(activations, mask=None) -> float:
  """Feature activation disparity of one layer's activations a [n, ..., U] (U units last; any
  middle axes, e.g. spatial positions or tokens, are averaged like examples)::

      m_u = mean over examples (and positions) of |a_{·,u}|
      disparity = std_u(m_u) / mean_u(m_u)        (coefficient of variation, biased std)

  0 when every unit is used equally; large when a few units carry the signal and the rest are
  nearly silent. ``mask`` [n] drops padded examples. Feed the output of a block (e.g. Flax's
  ``capture_intermediates``) or a Dense layer's captured input (its last axis is the units;
  drop the bias column of ``'kfac'`` captures, which is constant 1).
  """
  a = jnp.abs(jnp.asarray(activations, jnp.float32))
  if a.ndim < 2:
    raise ValueError(f"activations must be [n, ..., units], got shape {a.shape}")
  a = a.reshape(a.shape[0], -1, a.shape[-1])
  weight = jnp.ones(a.shape[0]) if mask is None else jnp.asarray(mask, jnp.float32)
  units = jnp.einsum("n,ntu->u", weight, a) / (jnp.sum(weight) * a.shape[1])
  return float(jnp.std(units) / jnp.mean(units))
