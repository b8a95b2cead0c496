"""Multi-layer perceptrons.

* ``MLP``: hidden ``widths``, one activation after every hidden layer.
* ``PaperMLP``: the paper's MNIST network 784-128-64-10 with a ReLU after the first layer only
  (the second hidden layer is linear), as in the authors' code.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from nonuniform_jax import checks
from nonuniform_jax.models.layers import Dense

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh, "elu": nn.elu,
               "sigmoid": nn.sigmoid, "swish": nn.swish}


def get_activation(name: str):
  checks.choice("activation", name, sorted(ACTIVATIONS))
  return ACTIVATIONS[name]


class MLP(nn.Module):
  """Flatten, then ``len(widths)`` hidden Dense layers with ``activation``, then the classifier."""
  num_classes: int
  widths: Sequence[int] = (256, 256)
  activation: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    act = get_activation(self.activation)
    x = x.reshape((x.shape[0], -1))
    for width in self.widths:
      x = act(Dense(width)(x))
    return Dense(self.num_classes)(x)


class PaperMLP(nn.Module):
  """784-128-64-10 with a ReLU after the first layer only (the paper's MNIST model)."""
  num_classes: int
  widths: Sequence[int] = (128, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(Dense(self.widths[0])(x))
    for width in self.widths[1:]:
      x = Dense(width)(x)
    return Dense(self.num_classes)(x)
