"""Parameter pytrees: their size, their layers, and results read back from them.

A layer is a module of a Flax parameter tree: the leaves sharing a parent path, named by that
path joined with '/' (``'Dense_0'``, ``'Block_1/Conv_0'``), as ``optim.kfac`` names the layers
it captures; a leaf at the top of the tree is its own layer. Other pytree arithmetic comes from
``optax.tree_utils``.
"""

import math

import jax
import jax.numpy as jnp
import optax.tree_utils as otu


def parameter_count(params) -> int:
  """Number of scalars in a pytree (from shapes only: no computation, no host sync)."""
  return sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))


def layer_name(path) -> str:
  """A parameter's layer: its parent module path joined by '/', or the parameter's own name
  when it sits at the top of the tree."""
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return "/".join(keys[:-1] or keys)


def layer_params(tree, name: str):
  """The subtree of layer ``name`` ('' is the whole tree: a model that is itself the layer)."""
  sub = tree
  for key in name.split("/") if name else ():
    if key not in sub:
      raise ValueError(f"layer {name!r} has no parameters in this tree (missing {key!r})")
    sub = sub[key]
  return sub


def per_layer_sum(tree) -> dict:
  """``{layer: Σ of the layer's entries}`` over the leaves of a parameter-shaped tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = layer_name(path)
    out[name] = out.get(name, 0.0) + jnp.sum(leaf)
  return out


# One compiled call: a host loop that accumulates device results dispatches once per step, not
# once per leaf.
tree_add = jax.jit(otu.tree_add)


def to_floats(tree):
  """Every leaf read back as a Python float."""
  return jax.tree.map(float, jax.device_get(tree))
