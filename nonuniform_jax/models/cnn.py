"""A small convolutional network for quick studies (MNIST-sized or CIFAR-sized images, or
one-dimensional signals such as MNIST-1D, which are treated as width-1 images)."""

from typing import Sequence

import flax.linen as nn

from nonuniform_jax.models.layers import Conv, Dense
from nonuniform_jax.models.mlp import get_activation


class CNN(nn.Module):
  """``len(channels)`` blocks of 3×3 convolution, activation and 2×2 average pooling, then a
  Dense hidden layer and the classifier. Inputs of rank 2 ([batch, length]) get a channel axis
  and are convolved along their length."""
  num_classes: int
  channels: Sequence[int] = (32, 64)
  hidden: int = 128
  activation: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    act = get_activation(self.activation)
    if x.ndim == 2:  # [batch, length] signals
      x = x[:, :, None]
    one_d = x.ndim == 3
    kernel, window = ((3,), (2,)) if one_d else ((3, 3), (2, 2))
    for c in self.channels:
      x = act(Conv(c, kernel, padding="SAME")(x))
      x = nn.avg_pool(x, window, strides=window)
    x = x.reshape((x.shape[0], -1))
    x = act(Dense(self.hidden)(x))
    return Dense(self.num_classes)(x)
