"""Base optimizers and learning-rate schedules, built from Optax pieces by name.

These are what the SAM family wraps: ``optax.chain(sam(...), base_optimizer(...))``.
"""

from typing import Sequence

import optax

from nonuniform_jax import checks

BASE_OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "linear")
WEIGHT_DECAY_MODES = ("coupled", "decoupled")


def learning_rate_schedule(name: str, peak: float, total_steps: int, *, warmup_steps: int = 0,
                           step_boundaries: Sequence[float] = (0.5, 0.75),
                           step_factor: float = 0.1, end_factor: float = 0.0) -> optax.Schedule:
  """A schedule peaking at ``peak`` after ``warmup_steps`` of linear warm-up from 0.

  * constant: ``peak``.
  * cosine: cosine decay from ``peak`` to ``end_factor * peak`` at ``total_steps``.
  * linear: linear decay from ``peak`` to ``end_factor * peak`` at ``total_steps``.
  * step: multiplied by ``step_factor`` at each fraction in ``step_boundaries`` of training.
  """
  checks.choice("schedule", name, SCHEDULES)
  checks.positive("learning_rate", peak)
  decay_steps = max(total_steps - warmup_steps, 1)
  if name == "constant":
    main = optax.constant_schedule(peak)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_factor)
  elif name == "linear":
    main = optax.linear_schedule(peak, peak * end_factor, decay_steps)
  else:
    boundaries = {int(f * total_steps) - warmup_steps: step_factor for f in step_boundaries}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def _on(value) -> bool:
  """Whether a setting switches its transformation on: > 0, or traced (a population whose
  members differ in it; they all have it on, ``population.shape_key``)."""
  return checks.traced(value) or value > 0


def base_optimizer(name: str, learning_rate, *, momentum: float = 0.0, nesterov: bool = False,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, weight_decay_mode: str = "coupled",
                   grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """SGD (momentum, Nesterov), Adam or AdamW with weight decay and optional clipping.

  Weight decay, on every parameter (as PyTorch's ``weight_decay``):

  * ``coupled``: L2 regularisation, ``wd·θ`` added to the gradient before the optimizer (so Adam
    rescales it and SGD's momentum accumulates it).
  * ``decoupled``: Loshchilov & Hutter (ICLR 2019), ``θ ← θ − lr·wd·θ`` applied beside the
    optimizer's step. ``adamw`` is Adam with decoupled decay by definition.

  ``grad_clip_norm > 0`` clips the incoming gradient's global norm first.
  """
  checks.choice("base optimizer", name, BASE_OPTIMIZERS)
  checks.choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
  checks.non_negative("weight_decay", weight_decay)
  decoupled = weight_decay_mode == "decoupled" or name == "adamw"
  parts = []
  if grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  if _on(weight_decay) and not decoupled:
    parts.append(optax.add_decayed_weights(weight_decay))
  if name == "sgd":
    if _on(momentum):
      parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  else:
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if _on(weight_decay) and decoupled:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
