"""SAM and ASAM as Optax gradient transformations.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021) and ASAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021). With g1 = ∇L_B(θ) the clean minibatch gradient::

    SAM:   ε = ρ · g1 / (‖g1‖ + eps)
    ASAM:  ε = ρ · T² ⊙ g1 / (‖T ⊙ g1‖ + eps),   T = |θ| + η on kernels, T = 1 elsewhere
    g* = ∇L_B(θ + ε)                                  (the returned update)

The base optimizer then steps from θ (not θ + ε) with g*, so SAM chains with any Optax optimizer.
‖·‖ is the global L2 norm over the whole pytree.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nonuniform_jax import checks
from nonuniform_jax.optim import diagnostics

GradFn = Callable[[Any], Any]


def global_norm(tree) -> jax.Array:
  """‖tree‖₂ over every leaf (float32 accumulation)."""
  return optax.tree.norm(tree)


def is_kernel(path) -> bool:
  """Whether a parameter is a weight matrix/tensor (ASAM scales it) rather than a bias or a
  normalisation scale/offset. Flax names weights 'kernel' (Dense, Conv) or 'embedding'."""
  name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
  return name in ("kernel", "embedding")


def asam_scale(params, eta: float):
  """ASAM's T: |θ| + η on kernels, 1 on biases and normalisation parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.abs(p) + eta if is_kernel(path) else jnp.ones_like(p), params)


def sam_perturbation(grads, params, rho: float, adaptive: bool = False, eta: float = 0.0,
                     eps: float = 1e-12):
  """The ascent step ε of SAM (``adaptive=False``) or ASAM (``adaptive=True``), see the module
  docstring. ``grads`` and ``params`` have the same structure; returns a pytree like them."""
  if not adaptive:
    scale = rho / (global_norm(grads) + eps)
    return jax.tree.map(lambda g: scale * g, grads)
  t = asam_scale(params, eta)
  tg = jax.tree.map(jnp.multiply, t, grads)
  scale = rho / (global_norm(tg) + eps)
  return jax.tree.map(lambda ti, tgi: scale * ti * tgi, t, tg)


def validate_rho(name: str, value: float) -> None:
  checks.non_negative(name, value)


def add_trees(a, b):
  return jax.tree.map(jnp.add, a, b)


def grouped_mean(tree):
  """Mean over the leading group axis of every leaf."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def broadcast_to_groups(params, groups: int):
  """Repeats every leaf of ``params`` along a new leading axis of size ``groups``."""
  return jax.tree.map(lambda p: jnp.broadcast_to(p, (groups,) + p.shape), params)


def group_count(grads) -> int:
  return jax.tree.leaves(grads)[0].shape[0]


DIAGNOSTICS = ("sam/grad_norm", "sam/eps_norm")


class SAMState(NamedTuple):
  """SAM keeps no state but its last step's diagnostics (``sam/grad_norm``, ``sam/eps_norm``:
  ``nonuniform_jax.optim.diagnostics``)."""
  diagnostics: dict


def sam(rho: float, *, adaptive: bool = False, eta: float = 0.0, eps: float = 1e-12,
        grouped: bool = False) -> optax.GradientTransformationExtraArgs:
  """SAM (or ASAM with ``adaptive=True``) as an Optax transformation.

  Call as ``tx.update(grads, state, params, grad_fn=grad_fn)`` where ``grads`` is the clean
  gradient of the minibatch loss at ``params`` and ``grad_fn(p)`` returns the gradient of the
  same minibatch loss at ``p``. The update is g* = ∇L_B(θ + ε) (see the module docstring): two
  gradient evaluations per step, the clean one supplied by the caller.

  m-sharpness (``grouped=True``): ``grads`` carries a leading axis of G groups (the clean
  gradient of each group of m examples), and ``grad_fn`` maps parameters with that leading axis
  to the per-group gradients at those parameters (typically a ``jax.vmap`` over groups). Each
  group is perturbed along its own gradient; the update is the mean of the groups' g*.

  Example::

    import jax, jax.numpy as jnp, optax
    from nonuniform_jax import optim

    loss = lambda p, x, y: jnp.mean((x @ p["w"] - y) ** 2)
    x, y = jnp.ones((8, 3)), jnp.zeros(8)
    params = {"w": jnp.ones(3)}
    tx = optax.chain(optim.sam(0.05), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params,
                               grad_fn=lambda p: jax.grad(loss)(p, x, y))
    params = optax.apply_updates(params, updates)

  Args:
    rho: radius ρ ≥ 0 of the ascent step.
    adaptive: ASAM's scale-invariant ascent, T = |θ| + η on kernels.
    eta: ASAM's η.
    eps: guards the normalisation.
    grouped: m-sharpness groups along a leading axis, as above.
  """
  validate_rho("rho", rho)
  validate_rho("eta", eta)

  def init_fn(params):
    del params
    return SAMState(diagnostics.zeros(DIAGNOSTICS))

  def update_fn(grads, state, params=None, *, grad_fn: GradFn, **extra):
    del extra, state
    if params is None:
      raise ValueError("sam needs params: call tx.update(grads, state, params, grad_fn=...)")
    if grouped:
      stacked = broadcast_to_groups(params, group_count(grads))
      eps_tree = jax.vmap(
          lambda g, p: sam_perturbation(g, p, rho, adaptive, eta, eps))(grads, stacked)
      norms = jax.vmap(lambda g, e: jnp.stack([global_norm(g), global_norm(e)]))(grads, eps_tree)
      grad_norm, eps_norm = jnp.mean(norms, axis=0)
      update = grouped_mean(grad_fn(add_trees(stacked, eps_tree)))
    else:
      eps_tree = sam_perturbation(grads, params, rho, adaptive, eta, eps)
      grad_norm, eps_norm = global_norm(grads), global_norm(eps_tree)
      update = grad_fn(add_trees(params, eps_tree))
    return update, SAMState(diagnostics.scalars(
        {"sam/grad_norm": grad_norm, "sam/eps_norm": eps_norm}))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
