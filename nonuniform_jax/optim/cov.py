"""COV: SGD on the loss plus an explicit penalty on the trace of the gradient noise.

The two-parameter study of "Beyond Sharpness: The Role of Nonuniformity in Generalization"
(AAAI 2025; docs/methods.md, COV; docs/experiments.md §2). With per-example losses ℓ_i,
gradients g_i and Hessians H_i on a minibatch B of b examples drawn without replacement from n,
g_B = (1/b) Σ g_i, H_B = (1/b) Σ H_i::

    tr Σ_B = (1/b) Σ_i ‖g_i‖² − ‖g_B‖²
    ∇[(aλ/2) tr Σ_B] = aλ · ((1/b) Σ_i H_i g_i − H_B g_B) = aλ · (1/b) Σ_i H_i (g_i − g_B)
    a = (n − b) / (b (n − 1))                   (the minibatch-mean variance factor)
    θ ← θ − η [g_B + ∇((aλ/2) tr Σ_B)]

The per-example Hessian-vector products H_i (g_i − g_B) are forward-over-reverse
(``jax.jvp`` of ``jax.grad``), vmapped over the examples: one vmapped gradient pass and one
vmapped HVP pass, no b × d Jacobian of second derivatives.

Losses follow ``nonuniform_jax.per_example``: ``per_example_loss_fn(params, batch) -> [b]``
losses, ``batch`` a pytree whose leaves have a leading example axis. Each example is evaluated as
a batch of one, so models whose output for one example depends on the others (BatchNorm in
training mode) are not supported.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nonuniform_jax import checks
from nonuniform_jax.optim import diagnostics
from nonuniform_jax.optim.sam import add_trees, global_norm
from nonuniform_jax.per_example import LossFn, example_loss, num_examples, per_example_grads


def noise_factor(n: int, b: int) -> float:
  """a = (n − b) / (b (n − 1)): the variance of a mean of b draws without replacement from n,
  relative to the per-example variance."""
  if not 1 <= b <= n or n < 2:
    raise ValueError(f"COV needs a batch of 1 <= b <= n examples with n >= 2, got b={b}, n={n}")
  return (n - b) / (b * (n - 1))


def cov_penalty_grad(per_example_loss_fn: LossFn, params, batch, n: int, lam: float,
                     batch_grad=None):
  """∇[(aλ/2) tr Σ_B](θ) = aλ · (1/b) Σ_i H_i (g_i − g_B), a = (n−b)/(b(n−1)) (module docstring).

  Args:
    per_example_loss_fn: ``(params, batch) -> [b]`` losses.
    params: θ, any pytree.
    batch: the minibatch B, leaves with leading axis b.
    n: the number of training examples B is drawn from.
    lam: λ, the penalty's weight.
    batch_grad: g_B when the caller has it (the mean of the per-example gradients); None
      averages them here. On data-parallel devices that average is one more all-reduce of a
      gradient, which passing g_B saves.
  Returns:
    A pytree like ``params``.
  """
  a = noise_factor(n, num_examples(batch))
  g_i = per_example_grads(None, params, batch, per_example_loss_fn)
  grad = jax.grad(example_loss(None, per_example_loss_fn))
  if batch_grad is None:
    batch_grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), g_i)
  centred = jax.tree.map(lambda g, m: g - m, g_i, batch_grad)

  def hvp(example, tangent):  # H_i (g_i − g_B)
    return jax.jvp(lambda p: grad(p, example), (params,), (tangent,))[1]

  h = jax.vmap(hvp)(batch, centred)
  return jax.tree.map(lambda x: a * lam * jnp.mean(x, axis=0), h)


DIAGNOSTICS = ("cov/grad_norm", "cov/penalty_grad_norm")


class COVState(NamedTuple):
  """COV keeps no state but its last step's diagnostics (``cov/grad_norm``,
  ``cov/penalty_grad_norm``: ``nonuniform_jax.optim.diagnostics``)."""
  diagnostics: dict


def cov(lam: float, n: int) -> optax.GradientTransformationExtraArgs:
  """COV as an Optax transformation (docs/methods.md, COV): adds ∇[(aλ/2) tr Σ_B] to the
  gradient.

  Call as ``tx.update(grads, state, params, per_example_loss_fn=f, batch=batch)`` with ``grads``
  the minibatch gradient g_B at ``params``, ``f(params, batch) -> [b]`` the per-example losses
  and ``batch`` the same minibatch; returns g_B + :func:`cov_penalty_grad`, whose per-example
  gradients it centres at ``grads`` (so ``grads`` must be the mean of the per-example gradients
  of ``f``: the same losses, regulariser and dropout draws). Chained with SGD it is SGD on
  L + (aλ/2) tr Σ::

    tx = optax.chain(cov(0.3, n=5000), optax.sgd(0.01))

  Args:
    lam: λ ≥ 0, the penalty's weight (the paper's toy: 0.3).
    n: the number of training examples the minibatches are drawn from (sets a).
  """
  checks.non_negative("lam", lam)
  checks.integer("n", n, 2)

  def init_fn(params):
    del params
    return COVState(diagnostics.zeros(DIAGNOSTICS))

  def update_fn(grads, state, params=None, *, per_example_loss_fn: LossFn, batch, **extra):
    del extra
    if params is None:
      raise ValueError("cov needs params: call tx.update(grads, state, params, "
                       "per_example_loss_fn=..., batch=...)")
    del state
    penalty = cov_penalty_grad(per_example_loss_fn, params, batch, n, lam, batch_grad=grads)
    diag = diagnostics.scalars({"cov/grad_norm": global_norm(grads),
                                "cov/penalty_grad_norm": global_norm(penalty)})
    return add_trees(grads, penalty), COVState(diag)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
