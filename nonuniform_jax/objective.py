"""Where a batch becomes a loss: the ``Objective`` of a model, built once per run and used by the
train step, the evaluation step, the evaluators and the measures.

BatchNorm is explicit in every return value: a function that applies the model in training
mode returns the new running statistics beside its result (they equal the given ones for models
without BatchNorm, whose ``batch_stats`` is ``{}``).

* training (``train_loss``, ``train_captures``): dropout on, BatchNorm normalising with the
  batch's own statistics, label smoothing and the L2 term when set;
* evaluation (``eval_sums``): plain cross-entropy, dropout off, BatchNorm's running averages;
* measures (``measure_functions``): plain cross-entropy, dropout off, BatchNorm in the measures'
  mode ('running' averages or each 'batch''s own statistics, running averages untouched), as
  functions of the parameters with the statistics bound as a traced argument (``Partial``), so
  that later evaluations, with new statistics, reuse their compilations.

Precision: with ``precision='bfloat16'`` the training and evaluation passes cast the parameters
and inputs to bfloat16 on their way into the model, so activations and matrix products run in
bfloat16, while the parameters, their gradients (the cast's transpose returns float32), the
optimizer state, the logits' softmax and loss, and BatchNorm's statistics (Flax reduces in
float32) stay float32. The measures always run the model in float32, whatever the training
precision.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import Partial

from nonuniform_jax import checks
from nonuniform_jax.models import layers

PRECISIONS = ("float32", "bfloat16")


def cross_entropy(logits, labels, label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy of each example, [b], in float32, with optional label smoothing."""
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if checks.traced(label_smoothing) or label_smoothing > 0:   # traced: a population's
    one_hot = optax.smooth_labels(one_hot, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot)


def l2_penalty(params) -> jax.Array:
  """½‖θ‖²."""
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def _variables(params, batch_stats, **extra) -> dict:
  v = {"params": params, **extra}
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


class Objective:
  """The losses of ``model`` (a Flax module called as ``model.apply(variables, x, train=...)``).

  Args:
    model: the network.
    label_smoothing: of the training loss (evaluation and measures use plain cross-entropy).
    l2: ``l2/2·‖θ‖²`` is added to the training loss (weight decay inside the loss, as original
      SAM; 0 leaves it to the optimizer).
    precision: 'float32' or 'bfloat16', of the training and evaluation passes (module
      docstring).
  """

  def __init__(self, model, *, label_smoothing: float = 0.0, l2: float = 0.0,
               precision: str = "float32"):
    checks.choice("precision", precision, PRECISIONS)
    self.model = model
    self.label_smoothing = label_smoothing
    self.l2 = l2
    self.precision = precision
    self._measure_fns = {mode: self._plain_measure_functions(mode == "batch")
                         for mode in ("running", "batch")}

  # ------------------------------------------------------------------------------- training

  def _cast(self, tree):
    """``tree``'s floating arrays in the compute dtype (unchanged in float32)."""
    if self.precision == "float32":
      return tree
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def _penalised(self, losses, params):
    on = checks.traced(self.l2) or self.l2 > 0   # traced: a population's
    return losses + self.l2 * l2_penalty(params) if on else losses

  def train_loss(self, params, batch_stats, batch, rng) -> tuple[jax.Array, tuple[Any, Any]]:
    """``(mean loss, (logits, new batch_stats))`` of a training batch; ``rng`` draws dropout."""
    variables = _variables(self._cast(params), batch_stats)
    inputs = self._cast(batch["inputs"])
    if batch_stats:
      logits, updated = self.model.apply(variables, inputs, train=True,
                                         rngs={"dropout": rng}, mutable=["batch_stats"])
      new_stats = updated["batch_stats"]
    else:
      logits = self.model.apply(variables, inputs, train=True, rngs={"dropout": rng})
      new_stats = batch_stats
    loss = jnp.mean(cross_entropy(logits, batch["labels"], self.label_smoothing))
    return self._penalised(loss, params), (logits, new_stats)

  def train_captures(self, params, perturbations, batch_stats, batch, rng):
    """The training loss per example with the K-FAC captures, in the form
    ``kfac.loss_grad_and_factors`` takes: ``(losses [b], kfac collection, (logits, new
    batch_stats))``."""
    mutable = [layers.KFAC] + (["batch_stats"] if batch_stats else [])
    logits, state = self.model.apply(_variables(self._cast(params), batch_stats,
                                                perturbations=perturbations),
                                     self._cast(batch["inputs"]), train=True,
                                     rngs={"dropout": rng}, mutable=mutable)
    losses = self._penalised(cross_entropy(logits, batch["labels"], self.label_smoothing),
                             params)
    return losses, state[layers.KFAC], (logits, state.get("batch_stats", batch_stats))

  def zero_perturbations(self, params, batch_stats, inputs, rng):
    """Zeros shaped (and typed) like the captured layers' outputs in training mode
    (``layers``)."""
    return layers.zero_perturbations(self.model, _variables(self._cast(params), batch_stats),
                                     self._cast(inputs), train=True, rngs={"dropout": rng})

  # ----------------------------------------------------------------------------- evaluation

  def eval_sums(self, params, batch_stats, batch) -> dict:
    """Sums over the real (mask 1) examples of a padded evaluation batch: loss (plain
    cross-entropy), correct predictions and count; with a ``noisy`` field (1 where the label was
    flipped) also the correct predictions and count on the noisy part, and with
    ``clean_labels`` the noisy part's predictions that match the true labels."""
    logits = self.model.apply(_variables(self._cast(params), batch_stats),
                              self._cast(batch["inputs"]), train=False)
    mask = batch["mask"]
    losses = cross_entropy(logits, batch["labels"])
    predicted = jnp.argmax(logits, -1)
    correct = (predicted == batch["labels"]).astype(jnp.float32)
    sums = {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}
    if "noisy" in batch:
      noisy = batch["noisy"] * mask
      sums["noisy_correct"] = jnp.sum(correct * noisy)
      sums["noisy_count"] = jnp.sum(noisy)
      if "clean_labels" in batch:
        true = (predicted == batch["clean_labels"]).astype(jnp.float32)
        sums["noisy_true_correct"] = jnp.sum(true * noisy)
    return sums

  # ------------------------------------------------------------------------------- measures

  def _plain_measure_functions(self, bn_train: bool) -> dict:
    """The measures' functions with the BatchNorm statistics as their first argument, built
    once: the measures jit on the function's identity and trace its arguments."""
    model = self.model

    def logits_of(batch_stats, params, x):
      if bn_train and batch_stats:
        return model.apply(_variables(params, batch_stats), x, train=True,
                           mutable=["batch_stats"])[0]
      return model.apply(_variables(params, batch_stats), x, train=False)

    def per_example_loss_fn(batch_stats, params, batch):
      return optax.softmax_cross_entropy_with_integer_labels(
          logits_of(batch_stats, params, batch["inputs"]).astype(jnp.float32), batch["labels"])

    def loss_fn(batch_stats, params, batch):
      return jnp.mean(per_example_loss_fn(batch_stats, params, batch))

    def metric_fn(batch_stats, params, batch):
      return jnp.mean(jnp.argmax(logits_of(batch_stats, params, batch["inputs"]), -1)
                      == batch["labels"])

    def capture_loss_fn(batch_stats, params, perturbations, batch):
      train = bn_train and bool(batch_stats)
      logits, state = model.apply(_variables(params, batch_stats, perturbations=perturbations),
                                  batch["inputs"], train=train,
                                  mutable=[layers.KFAC] + (["batch_stats"] if train else []))
      losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                               batch["labels"])
      return losses, state[layers.KFAC]

    def perturbations_fn(batch_stats, params, batch):   # shapes only: jax.eval_shape inside
      return layers.zero_perturbations(model, _variables(params, batch_stats), batch["inputs"],
                                       train=bn_train and bool(batch_stats))

    return {"loss_fn": loss_fn, "per_example_loss_fn": per_example_loss_fn,
            "metric_fn": metric_fn, "capture_loss_fn": capture_loss_fn,
            "perturbations_fn": perturbations_fn}

  def measure_functions(self, batch_stats, bn_mode: str) -> dict[str, Callable]:
    """``loss_fn(params, batch)``, ``per_example_loss_fn``, ``metric_fn`` (accuracy),
    ``capture_loss_fn(params, perturbations, batch)`` and ``perturbations_fn(params, batch)``
    for the measures, BatchNorm in ``bn_mode`` ('running' or 'batch'), each a ``Partial`` over
    ``batch_stats``."""
    return {name: Partial(fn, batch_stats) for name, fn in self._measure_fns[bn_mode].items()}
