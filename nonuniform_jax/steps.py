"""The jitted train and evaluation steps, built from an ``Objective`` (or a Flax model), an Optax
transformation and a few explicit settings (no configs here).

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

from nonuniform_jax import checks
from nonuniform_jax import per_example as per_example_lib
from nonuniform_jax.objective import Objective, cross_entropy
from nonuniform_jax.optim import kfac
from nonuniform_jax.optim.diagnostics import step_diagnostics

BN_POLICIES = ("clean", "every_pass")
EXTRA_ARGS = ("kfac_factors", "per_example_grads", "per_example_loss_fn")
per_example_cross_entropy = cross_entropy   # the name the step's users know


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any      # {} for models without BatchNorm
  opt_state: Any


def _objective(model_or_objective, label_smoothing: float, l2: float) -> Objective:
  if isinstance(model_or_objective, Objective):
    if label_smoothing or l2:
      raise ValueError("label_smoothing and l2 belong to the Objective; pass them to it")
    return model_or_objective
  return Objective(model_or_objective, label_smoothing=label_smoothing, l2=l2)


def _group(batch, groups: int):
  return jax.tree.map(lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:]), batch)


def _mean0(tree):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


class PerturbedPasses:
  """``grad_fn`` for a SAM-family transformation: the gradient of the same minibatch loss at
  other parameters, with the BatchNorm statistics of each pass kept in ``statistics`` (first the
  clean pass's), in the order the transformation calls it (at the top level of its update).

  BatchNorm normalises with the batch's own statistics in every pass; only the running averages
  differ by policy: under 'every_pass' each pass starts from the statistics the previous one
  produced, and the step keeps the last.
  """

  def __init__(self, objective: Objective, clean_statistics, batch, key, *, groups: int,
               grouped_perturbation: bool, gbatch=None, gkeys=None):
    self.statistics = [clean_statistics]
    self._objective, self._batch, self._key = objective, batch, key
    self._groups, self._grouped = groups, grouped_perturbation
    self._gbatch, self._gkeys = gbatch, gkeys

  def _grad(self, params, batch_stats, batch, key):
    g, (_, new_stats) = jax.grad(self._objective.train_loss, has_aux=True)(params, batch_stats,
                                                                           batch, key)
    return g, new_stats

  def __call__(self, params):
    if self._groups > 1:
      axis = 0 if self._grouped else None
      g, new_stats = jax.vmap(self._grad, in_axes=(axis, None, 0, 0))(
          params, self.statistics[-1], self._gbatch, self._gkeys)
      new_stats = _mean0(new_stats)
      if not self._grouped:
        g = _mean0(g)
    else:
      g, new_stats = self._grad(params, self.statistics[-1], self._batch, self._key)
    self.statistics.append(new_stats)
    return g


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
  ResNet-20), so the trainer passes the bool, from the optimizer's ``kfac.Schedule``
  (``plan.Optimizer.kfac_schedule.stats_due(update_index)``); it must equal
  ``kfac.stats_due(opt_state)``. It goes on to ``tx.update`` as ``kfac_due``, so the
  factor schedule's conditionals are chosen while tracing too where the periods allow
  (``kfac.update_state``; all of them with the default equal periods).

  Args:
    model: an ``objective.Objective``, or a Flax module (then ``label_smoothing`` and ``l2``
      build its Objective: ``l2 > 0`` adds ``l2/2·‖θ‖²`` to the loss, as original SAM).
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
  for arg in extra_args:
    checks.choice("extra_args entry", arg, EXTRA_ARGS)
  if extra_args and groups > 1:
    raise ValueError(f"{list(extra_args)} need the whole batch in one group, got {groups}")
  checks.choice("bn_policy", bn_policy, BN_POLICIES)
  objective = _objective(model, label_smoothing, l2)
  value_and_grad = jax.value_and_grad(objective.train_loss, has_aux=True)
  base_key = jax.random.key(seed)

  def clean_pass(state, batch, key, kfac_due):
    """(loss, logits, statistics, gradient, factors or None, the grouped batch and keys)."""
    if groups > 1:
      gbatch, gkeys = _group(batch, groups), jax.random.split(key, groups)
      (losses, (logits, stats)), grads = jax.vmap(value_and_grad, in_axes=(None, None, 0, 0))(
          state.params, state.batch_stats, gbatch, gkeys)
      grads = grads if grouped_perturbation else _mean0(grads)
      return (jnp.mean(losses), logits.reshape((-1,) + logits.shape[2:]), _mean0(stats), grads,
              None, gbatch, gkeys)
    if "kfac_factors" in extra_args:
      out = kfac.loss_grad_and_factors(
          objective.train_captures, state.params,
          objective.zero_perturbations(state.params, state.batch_stats, batch["inputs"], key),
          state.batch_stats, batch, key,
          due=kfac.stats_due(state.opt_state) if kfac_due is None else bool(kfac_due),
          has_aux=True)
      return out.loss, out.aux[0], out.aux[1], out.grads, out.factors, None, None
    (loss, (logits, stats)), grads = value_and_grad(state.params, state.batch_stats, batch, key)
    return loss, logits, stats, grads, None, None, None

  def per_example(state, batch, key) -> dict:
    """Per-example losses and gradients: each example a batch of one (models without
    BatchNorm, whose examples do not interact)."""
    def loss_fn(params, b):
      return objective.train_loss(params, state.batch_stats, b, key)[0]
    out = {}
    if "per_example_grads" in extra_args:
      out["per_example_grads"] = per_example_lib.per_example_grads(loss_fn, state.params, batch)
    if "per_example_loss_fn" in extra_args:
      out["per_example_loss_fn"] = jax.vmap(per_example_lib.example_loss(loss_fn),
                                            in_axes=(None, 0))
      out["batch"] = batch
    return out

  def train_step(state: TrainState, batch, kfac_due: bool | None = None):
    key = jax.random.fold_in(base_key, state.step)
    loss, logits, stats, grads, factors, gbatch, gkeys = clean_pass(state, batch, key, kfac_due)
    extra = per_example(state, batch, key)
    if factors is not None:
      extra["kfac_factors"] = factors
      if kfac_due is not None:   # the factor update too is chosen while tracing
        extra["kfac_due"] = bool(kfac_due)
    if passes > 1:
      extra["grad_fn"] = PerturbedPasses(objective, stats, batch, key, groups=groups,
                                         grouped_perturbation=grouped_perturbation,
                                         gbatch=gbatch, gkeys=gkeys)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    if passes > 1 and bn_policy == "every_pass":
      stats = extra["grad_fn"].statistics[-1]
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=stats, opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
    # The SAM family's own scalars (ascent norms, K-FAC spectra; optim.diagnostics), if any.
    return new_state, {"train_loss": loss, "train_accuracy": accuracy,
                       **step_diagnostics(opt_state)}

  return train_step


def make_eval_step(model) -> Callable:
  """Returns ``eval_step(params, batch_stats, batch) -> sums`` (``Objective.eval_sums``) of an
  Objective or a Flax model."""
  return _objective(model, 0.0, 0.0).eval_sums
