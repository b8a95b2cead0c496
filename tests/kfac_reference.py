"""Hand-written references shared by test_csam.py and test_gam.py: a small network with a
parameter group that has no Kronecker factor (LayerNorm), and the dense (F + λI)⁻¹ over the
flattened parameters, built with np.kron and np.linalg.inv (no kfac.py linear algebra)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from nonuniform_jax.models.layers import Dense, zero_perturbations
from nonuniform_jax.optim import kfac


class Net(nn.Module):
  """Dense → LayerNorm → tanh → Dense: the LayerNorm scale/offset have no factors."""

  @nn.compact
  def __call__(self, x):
    return Dense(3)(jnp.tanh(nn.LayerNorm()(Dense(5)(x))))


class Problem:
  """A fixed batch of 8 examples of 4 features and 3 classes, numpy-generated; ``grad`` and
  ``batch_factors`` are jitted once."""

  def __init__(self, seed=0):
    rng = np.random.default_rng(seed)
    self.model = Net()
    self.x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    self.y = jnp.asarray(rng.integers(0, 3, size=8))
    params = jax.eval_shape(self.model.init, jax.random.key(0), self.x)["params"]
    leaves, treedef = jax.tree.flatten(params)
    self.params = jax.tree.unflatten(treedef, [
        jnp.asarray(rng.normal(size=l.shape) * 0.7 + (1.0 if len(l.shape) == 1 else 0.0),
                    jnp.float32) for l in leaves])
    self.perts = zero_perturbations(self.model, {"params": self.params}, self.x)
    self.layers = kfac.layer_names(self.perts)
    self.grad = jax.jit(jax.grad(self.loss))
    self.batch_factors = jax.jit(self.batch_factors)

  def per_example_loss(self, p, q, x, y):
    logits, state = self.model.apply({"params": p, "perturbations": q}, x, mutable=["kfac"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y), state["kfac"]

  def loss(self, p):
    logits = self.model.apply({"params": p}, self.x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, self.y).mean()

  def batch_factors(self, p):
    """Batch factors at p (their capture is checked against brute force in test_kfac.py)."""
    caps = kfac.loss_grad_and_captures(self.per_example_loss, p, self.perts, self.x,
                                       self.y).captures
    return kfac.batch_factors(caps)


def damped_kronecker(a, g, damping, form="exact"):
  """G ⊗ A + λI ('exact') or (G + γ_G I) ⊗ (A + γ_A I) ('factored': γ_A = π√λ, γ_G = √λ/π,
  π = sqrt((tr A / dim A) / (tr G / dim G))), float64."""
  a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
  if form == "exact":
    return np.kron(g, a) + damping * np.eye(a.shape[0] * g.shape[0])
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  return np.kron(g + np.sqrt(damping) / pi * np.eye(g.shape[0]),
                 a + pi * np.sqrt(damping) * np.eye(a.shape[0]))


def dense_inverse(params, factors, damping, unfactored, form="exact"):
  """The n × n matrix (F + λI)⁻¹ on the flattened parameters (ravel_pytree order): on each
  factored layer the inverse of ``damped_kronecker`` acting on the column-major vec of
  [kernel.reshape(K, F); bias]; on the other parameters 0 ('zero') or I ('identity')."""
  flat, unravel = ravel_pytree(params)
  n = flat.size
  index = unravel(jnp.arange(n, dtype=jnp.float32))
  inv = np.eye(n) if unfactored == "identity" else np.zeros((n, n))
  for name, f in factors.items():
    sub = index
    for key in name.split("/"):
      sub = sub[key]
    kernel = np.asarray(sub["kernel"]).reshape(-1, sub["kernel"].shape[-1])
    rows = np.concatenate([kernel, np.asarray(sub["bias"])[None]]) if "bias" in sub else kernel
    idx = rows.ravel(order="F").astype(int)
    inv[np.ix_(idx, idx)] = np.linalg.inv(damped_kronecker(f.a, f.g, damping, form))
  return inv
