"""The jitted train and evaluation steps, built from a model, an Optax transformation and a few
explicit settings (no configs here).

One train step evaluates the gradient of the minibatch loss once per pass the optimizer needs
(SGD 1, SAM 2, CSAM 3) and never runs an extra forward pass. BatchNorm running statistics come
from the clean pass (``bn_policy='clean'``) or are updated by every pass in order
(``bn_policy='every_pass'``, the behaviour of the paper's PyTorch code).
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from nonuniform_jax.models import layers
from nonuniform_jax.optim import kfac
from nonuniform_jax.optim.diagnostics import step_diagnostics

BN_POLICIES = ("clean", "every_pass")


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any      # {} for models without BatchNorm
  opt_state: Any


def per_example_cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Cross-entropy of each example, [b], with optional label smoothing."""
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if label_smoothing > 0:
    one_hot = optax.smooth_labels(one_hot, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot)


def l2_penalty(params) -> jax.Array:
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def make_loss_fn(model, *, label_smoothing: float = 0.0, l2: float = 0.0, train: bool = True):
  """``loss_fn(params, batch_stats, batch, dropout_key) -> (mean loss, (logits, batch_stats))``.

  ``l2 > 0`` adds ``l2/2·‖θ‖²`` to the loss (weight decay inside the loss, as original SAM).
  """
  def loss_fn(params, batch_stats, batch, dropout_key):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if train and batch_stats:
      logits, updated = model.apply(variables, batch["inputs"], train=True,
                                    rngs={"dropout": dropout_key}, mutable=["batch_stats"])
      new_stats = updated["batch_stats"]
    else:
      logits = model.apply(variables, batch["inputs"], train=train, rngs={"dropout": dropout_key})
      new_stats = batch_stats
    loss = jnp.mean(per_example_cross_entropy(logits, batch["labels"], label_smoothing))
    if l2 > 0:
      loss = loss + l2 * l2_penalty(params)
    return loss, (logits, new_stats)

  return loss_fn


def _group(batch, groups: int):
  return jax.tree.map(lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:]), batch)


def _mean0(tree):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def make_train_step(model, tx, *, seed: int, label_smoothing: float = 0.0, l2: float = 0.0,
                    passes: int = 1, groups: int = 1, grouped_perturbation: bool = False,
                    bn_policy: str = "clean", extra_args: tuple[str, ...] = ()) -> Callable:
  """Returns ``train_step(state, batch, kfac_due=None) -> (state, metrics)`` (not yet jitted).

  ``metrics``: ``train_loss``, ``train_accuracy`` and the optimizer's step diagnostics
  (``optim.step_diagnostics``: ``sam/*``, ``csam/*``, ``kfac/*``... for the SAM family).

  ``kfac_due`` (with 'kfac_factors' only): whether this step refreshes the K-FAC statistics, as
  a Python bool known to the caller (jit it as a static argument: two programs, each with only
  its own pass), or None to read it from the optimizer state and choose with ``lax.cond`` (one
  program). XLA:CPU runs convolutions inside a conditional many times slower (measured 26x on
  ResNet-20), so the trainer passes the bool; it must equal ``kfac.stats_due(opt_state)``,
  i.e. ``update_index % stats_every == 0``. It goes on to ``tx.update`` as ``kfac_due``, so the
  factor schedule's conditionals are chosen while tracing too where the periods allow
  (``kfac.update_state``; all of them with the default equal periods).

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)``.
    tx: an Optax transformation. With ``passes > 1`` it is a SAM-family transformation whose
      update takes ``grad_fn`` (the gradient of the same minibatch loss at other parameters).
    seed: dropout keys are ``fold_in(key(seed), step)`` (one per step, shared by all passes).
    passes: gradient evaluations per step the transformation makes (1 plain, 2 SAM, 3 CSAM).
    groups: the batch is split into this many equal groups, each forwarded on its own (vmapped):
      BatchNorm normalises each group with its own statistics (per-device statistics, or
      m-sharpness groups); running statistics are the mean of the groups'. 1: the whole batch.
    grouped_perturbation: m-sharpness: each group is perturbed along its own gradient and ``tx``
      is in grouped mode. Otherwise the groups' gradients are averaged first.
    bn_policy: 'clean' or 'every_pass'.
    extra_args: what else ``tx.update`` needs from the step, from ``EXTRA_ARGS``:
      'kfac_factors' (CSAM's K-FAC metric, GAM: the clean pass also captures the layer
      statistics, in the same forward and backward, on the steps that refresh them),
      'per_example_grads' (SAM-GCM), 'per_example_loss_fn' (COV, with 'batch').
  """
  unknown = set(extra_args) - set(EXTRA_ARGS)
  if unknown:
    raise ValueError(f"unknown extra_args {sorted(unknown)}; choose from {list(EXTRA_ARGS)}")
  if extra_args and groups > 1:
    raise ValueError(f"{list(extra_args)} need the whole batch in one group, got {groups}")
  if bn_policy not in BN_POLICIES:
    raise ValueError(f"unknown bn_policy {bn_policy!r}; choose one of {list(BN_POLICIES)}")
  loss_fn = make_loss_fn(model, label_smoothing=label_smoothing, l2=l2)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  base_key = jax.random.key(seed)

  def train_step(state: TrainState, batch, kfac_due: bool | None = None):
    key = jax.random.fold_in(base_key, state.step)
    if groups > 1:
      gbatch = _group(batch, groups)
      gkeys = jax.random.split(key, groups)
      (losses, (logits, stats)), grads = jax.vmap(
          value_and_grad, in_axes=(None, None, 0, 0))(state.params, state.batch_stats, gbatch,
                                                      gkeys)
      loss, stats = jnp.mean(losses), _mean0(stats)
      logits = logits.reshape((-1,) + logits.shape[2:])
      if not grouped_perturbation:
        grads = _mean0(grads)
    elif "kfac_factors" in extra_args:
      out = kfac.loss_grad_and_factors(
          _capturing_loss(model, label_smoothing, l2), state.params,
          _zero_perturbations(model, state, batch, key), state.batch_stats, batch, key,
          due=kfac.stats_due(state.opt_state) if kfac_due is None else bool(kfac_due),
          has_aux=True)
      loss, grads, (logits, stats) = out.loss, out.grads, out.aux
    else:
      (loss, (logits, stats)), grads = value_and_grad(state.params, state.batch_stats, batch,
                                                      key)
    extra = {}
    if "kfac_factors" in extra_args:
      extra["kfac_factors"] = out.factors
      if kfac_due is not None:   # the factor update too is chosen while tracing
        extra["kfac_due"] = bool(kfac_due)
    # Per-example losses: each example on its own (models without BatchNorm, whose examples
    # do not interact).
    def example_loss(params, example):
      return loss_fn(params, state.batch_stats, jax.tree.map(lambda x: x[None], example), key)[0]

    if "per_example_grads" in extra_args:
      extra["per_example_grads"] = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(
          state.params, batch)
    if "per_example_loss_fn" in extra_args:
      extra["per_example_loss_fn"] = jax.vmap(example_loss, in_axes=(None, 0))
      extra["batch"] = batch
    if passes > 1:
      # Perturbed passes: BatchNorm normalises with the batch's own statistics in every pass;
      # only the running averages differ by policy. Under 'every_pass' each pass starts from the
      # running statistics the previous pass produced, which the chain below threads through
      # (the transformation calls grad_fn at the top level of its update, in order).
      chain = [stats]

      def one_grad(params, batch_stats, b, k):
        g, (_, new_stats) = jax.grad(loss_fn, has_aux=True)(params, batch_stats, b, k)
        return g, new_stats

      def grad_fn(params):
        if groups > 1:
          axis = 0 if grouped_perturbation else None
          g, new_stats = jax.vmap(one_grad, in_axes=(axis, None, 0, 0))(params, chain[-1],
                                                                       gbatch, gkeys)
          new_stats = _mean0(new_stats)
          if not grouped_perturbation:
            g = _mean0(g)
        else:
          g, new_stats = one_grad(params, chain[-1], batch, key)
        chain.append(new_stats)
        return g

      extra["grad_fn"] = grad_fn
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    if passes > 1 and bn_policy == "every_pass":
      stats = chain[-1]
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    # The SAM family's own scalars (ascent norms, K-FAC spectra; optim.diagnostics), if any.
    return new_state, {"train_loss": loss, "train_accuracy": accuracy,
                       **step_diagnostics(opt_state)}

  return train_step


EXTRA_ARGS = ("kfac_factors", "per_example_grads", "per_example_loss_fn")


def _capturing_loss(model, label_smoothing: float, l2: float):
  """Per-example losses with the K-FAC captures (``kfac.loss_grad_and_factors``'s form):
  ``(params, perturbations, batch_stats, batch, key) -> (losses, kfac, (logits, stats))``."""
  def fn(params, perturbations, batch_stats, batch, key):
    variables = {"params": params, "perturbations": perturbations}
    mutable = ["kfac"] + (["batch_stats"] if batch_stats else [])
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, state = model.apply(variables, batch["inputs"], train=True, rngs={"dropout": key},
                                mutable=mutable)
    losses = per_example_cross_entropy(logits, batch["labels"], label_smoothing)
    if l2 > 0:
      losses = losses + l2 * l2_penalty(params)
    return losses, state["kfac"], (logits, state.get("batch_stats", batch_stats))
  return fn


def _zero_perturbations(model, state, batch, key):
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return layers.zero_perturbations(model, variables, batch["inputs"], train=True,
                                   rngs={"dropout": key})


def make_eval_step(model) -> Callable:
  """Returns ``eval_step(params, batch_stats, batch) -> sums`` over the real (mask 1) examples:
  loss (plain cross-entropy, no smoothing), correct predictions and count; with a ``noisy``
  field (1 where the label was flipped) also the correct predictions and count on the noisy
  part, and with ``clean_labels`` the noisy part's predictions that match the true labels."""
  loss_fn = make_loss_fn(model, train=False)

  def eval_step(params, batch_stats, batch):
    _, (logits, _) = loss_fn(params, batch_stats, batch, jax.random.key(0))
    mask = batch["mask"]
    losses = per_example_cross_entropy(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    sums = {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}
    if "noisy" in batch:
      noisy = batch["noisy"] * mask
      sums["noisy_correct"] = jnp.sum(correct * noisy)
      sums["noisy_count"] = jnp.sum(noisy)
      if "clean_labels" in batch:
        true = (jnp.argmax(logits, -1) == batch["clean_labels"]).astype(jnp.float32)
        sums["noisy_true_correct"] = jnp.sum(true * noisy)
    return sums

  return eval_step
