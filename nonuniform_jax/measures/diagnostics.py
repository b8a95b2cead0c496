"""Cheap diagnostics of nonuniformity named in the paper's README, logged beside the measures.

"Beyond Sharpness: The Role of Nonuniformity in Generalization" (AAAI 2025) lists, besides the
gradient noise, four quick signs of uneven training. Each is a function of arrays (gradients,
updates, per-example losses, activations) that the caller already has; none runs a model.

* ``channel_gradient_norm_variance``: per layer, Var_c ‖∇W_{·,c}‖ over output channels c.
* ``update_moments``: per layer, skewness and excess kurtosis of the update magnitudes |u_j|.
* ``class_loss_imbalance``: std over classes of the mean per-class loss.
* ``activation_disparity``: coefficient of variation over units of the mean |activation|.

``nonuniformity_diagnostics`` is the measure that feeds them from a model: one capture pass per
batch (``optim.kfac.loss_grad_and_captures``) gives the per-example losses, the mean gradient and
every Dense layer's input, so a training run logs all four (``evaluators.MEASURES``).

A "layer" is a module of the parameter tree: the leaves sharing a parent path, named by that path
joined with '/' as ``optim.kfac`` names layers (a leaf at the top of the tree is its own layer).
Every function returns Python floats; statistics of a constant (zero spread) are NaN.
"""

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from nonuniform_jax import checks, pytree
from nonuniform_jax.measures import batching
from nonuniform_jax.optim import kfac
from nonuniform_jax.per_example import num_examples


def _layers(tree) -> dict[str, dict[str, jax.Array]]:
  """``{layer: {leaf name: leaf}}`` (see the module docstring)."""
  out: dict[str, dict[str, jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf_name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1]))) if path else ""
    out.setdefault(pytree.layer_name(path), {})[leaf_name] = jnp.asarray(leaf, jnp.float32)
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
  checks.integer("num_classes", num_classes, 1)
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


# ---------------------------------------------------------------- the measure


def _dense_inputs(params, layers) -> dict[str, int]:
  """``{layer: d_in}`` for the captured layers whose kernel is 2-D (Dense): their captured input
  [B, T, K̄] holds the layer's input in its first d_in columns (then the bias column, if any)."""
  out = {}
  for name in layers:
    kernel = pytree.layer_params(params, name)["kernel"]
    if np.ndim(kernel) == 2:
      out[name] = np.shape(kernel)[0]
  return out


@jax.jit
def _diagnostics_batch(capture_loss_fn, perturbations_fn, params, batch, weight):
  """One capture pass over ``batch``: ``weight`` times (the mean gradient, and per Dense layer
  the mean over examples and locations of |input| per unit [d_in]), and the losses [b]."""
  def with_losses(p, q, b):
    losses, kfac_collection = capture_loss_fn(p, q, b)
    return losses, kfac_collection, losses

  out = kfac.loss_grad_and_captures(with_losses, params, perturbations_fn(batch), batch,
                                    has_aux=True)
  units = {name: jnp.mean(jnp.abs(out.captures[name].inputs[..., :d].astype(jnp.float32)),
                          axis=(0, 1))
           for name, d in _dense_inputs(params, out.captures).items()}
  return otu.tree_scale(weight, {"grads": out.grads, "units": units}), out.aux


def _labels_of(batch):
  if not (isinstance(batch, Mapping) and "labels" in batch):
    raise ValueError("nonuniformity_diagnostics needs batches with a 'labels' entry ([b] integer "
                     "classes or [b, C] one-hot), got "
                     + (f"keys {sorted(batch)}" if isinstance(batch, Mapping)
                        else type(batch).__name__))
  return np.asarray(batch["labels"])


def nonuniformity_diagnostics(capture_loss_fn: Callable, params, batches: Sequence[Any], *,
                              perturbations_fn: Callable, num_classes: int | None = None,
                              key=None) -> dict:
  """The four diagnostics of this module over the union of ``batches``, from one capture pass
  per batch (``optim.kfac.loss_grad_and_captures``; a host loop over jitted steps, one
  compilation per batch shape), as a flat dict of floats for the evaluators' scalars:

      class_loss_imbalance            ``class_loss_imbalance`` of the per-example losses
      channel_grad_norm_var/<layer>   ``channel_gradient_norm_variance`` of the mean gradient ḡ
      update_skewness/<layer>,        ``update_moments`` of ḡ. A measure has no optimizer step,
        update_kurtosis/<layer>       so these describe the gradient: the SGD update direction
                                      up to the learning rate (not Adam's or SAM's update)
      activation_disparity/<layer>    ``activation_disparity`` of each Dense layer's input
                                      (captured layers with a 2-D kernel; bias column dropped)

  All are exact over the union: ḡ is the size-weighted mean of the batch gradients, the losses
  are concatenated, and the per-unit means of |input| are accumulated across batches before the
  disparity is taken (not a mean of per-batch disparities). Positions (tokens) count like
  examples; batches are assumed to share the number of positions per example.

  Args:
    capture_loss_fn: ``(params, perturbations, batch) -> (losses [b], 'kfac' collection)``, as
      for the fast path (``measures.captures``).
    params: the point θ.
    batches: sequence of batches, each a dict with ``'labels'`` ([b] integer classes or [b, C]
      one-hot/soft labels).
    perturbations_fn: ``batch -> zero perturbations`` (as for ``gradient_noise``).
    num_classes: C; by default the width of one-hot labels, else the largest label + 1.
    key: unused (the diagnostics are exact); accepted for the common measure signature.

  Returns:
    dict of Python floats as above, plus ``class_losses`` (list [C], NaN for absent classes),
    ``num_examples`` and ``num_batches``.
  """
  del key
  groups = batching.group_batches(batches)
  ordered = list(batching.ungroup(groups))   # the order of the losses below
  labels = np.concatenate([_labels_of(b) for b in ordered])
  if num_classes is None:
    num_classes = labels.shape[-1] if labels.ndim == 2 else int(np.max(labels)) + 1
  checks.integer("num_classes", num_classes, 1)
  if labels.ndim == 1 and np.max(labels) >= num_classes:
    raise ValueError(f"labels go up to {int(np.max(labels))}, beyond num_classes={num_classes}")
  capture_loss_fn = batching.as_loss_pytree(capture_loss_fn)
  perturbations_fn = batching.as_loss_pytree(perturbations_fn)
  n = batching.total_examples(groups)
  total, losses = None, []
  for batch in ordered:
    part, batch_losses = _diagnostics_batch(capture_loss_fn, perturbations_fn, params, batch,
                                            np.float32(num_examples(batch) / n))
    total = part if total is None else pytree.tree_add(total, part)
    losses.append(batch_losses)
  imbalance = class_loss_imbalance(jnp.concatenate(losses), labels, int(num_classes))
  out = {"class_loss_imbalance": imbalance["imbalance"]}
  out.update({f"channel_grad_norm_var/{k}": v
              for k, v in channel_gradient_norm_variance(total["grads"]).items()})
  for name, moments in update_moments(total["grads"]).items():
    out[f"update_skewness/{name}"] = moments["skewness"]
    out[f"update_kurtosis/{name}"] = moments["kurtosis"]
  out.update({f"activation_disparity/{k}": activation_disparity(v[None])
              for k, v in total["units"].items()})
  return {**out, "class_losses": [float(c) for c in imbalance["class_losses"]],
          "num_examples": n, "num_batches": batching.num_batches(groups)}
