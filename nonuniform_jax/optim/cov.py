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

Losses follow the measures' convention: ``per_example_loss_fn(params, batch) -> [b]`` losses,
``batch`` a pytree whose leaves have a leading example axis. Each example is evaluated as a batch
of one, so models whose output for one example depends on the others (BatchNorm in training
mode) are not supported.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nonuniform_jax.optim import diagnostics
from nonuniform_jax.optim.sam import add_trees, global_norm, validate_rho

PerExampleLossFn = Callable[[Any, Any], jax.Array]


def batch_size(batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def noise_factor(n: int, b: int) -> float:
  """a = (n − b) / (b (n − 1)): the variance of a mean of b draws without replacement from n,
  relative to the per-example variance."""
  if not 1 <= b <= n or n < 2:
    raise ValueError(f"COV needs a batch of 1 <= b <= n examples with n >= 2, got b={b}, n={n}")
  return (n - b) / (b * (n - 1))


def single_example_loss(per_example_loss_fn: PerExampleLossFn):
  """ℓ(params, example) from a batched ``per_example_loss_fn`` (the example as a batch of one)."""
  def loss(params, example):
    return per_example_loss_fn(params, jax.tree.map(lambda x: x[None], example))[0]
  return loss


def per_example_grads(per_example_loss_fn: PerExampleLossFn, params, batch):
  """g_i = ∇ℓ_i(θ): the pytree of ``params`` with a leading example axis b."""
  grad = jax.grad(single_example_loss(per_example_loss_fn))
  return jax.vmap(grad, in_axes=(None, 0))(params, batch)


def cov_penalty_grad(per_example_loss_fn: PerExampleLossFn, params, batch, n: int, lam: float,
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
  a = noise_factor(n, batch_size(batch))
  g_i = per_example_grads(per_example_loss_fn, params, batch)
  grad = jax.grad(single_example_loss(per_example_loss_fn))
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
  validate_rho("lam", lam)
  if not n >= 2:
    raise ValueError(f"n must be >= 2 (the training set size), got {n!r}")

  def init_fn(params):
    del params
    return COVState(diagnostics.zeros(DIAGNOSTICS))

  def update_fn(grads, state, params=None, *, per_example_loss_fn: PerExampleLossFn, batch,
                **extra):
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
