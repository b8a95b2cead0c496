"""DenseNet-BC for CIFAR (Huang, Liu, van der Maaten, Weinberger, "Densely Connected
Convolutional Networks", CVPR 2017).

A 3×3 convolution with 2k channels (k = ``growth_rate``), three dense blocks of n = (depth-4)/6
bottleneck layers, each BN-ReLU-conv1×1(4k)-BN-ReLU-conv3×3(k) whose k output channels are
concatenated to its input; between blocks a transition BN-ReLU-conv1×1(⌊θ·c⌋)-2×2 average pool
(θ = ``compression``); then BatchNorm, ReLU, global average pooling and the classifier.
DenseNet-BC-100 with k = 12 is the paper's 0.8M-parameter network.
"""

import flax.linen as nn
import jax.numpy as jnp

from nonuniform_jax.models.common import batch_norm, conv, global_avg_pool
from nonuniform_jax.models.layers import Dense


class DenseLayer(nn.Module):
  """x ↦ concat(x, conv3×3(relu(bn(conv1×1(relu(bn(x))))))) with 4k then k channels."""
  growth_rate: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv(4 * self.growth_rate, 1)(nn.relu(batch_norm(train)(x)))
    y = conv(self.growth_rate, 3)(nn.relu(batch_norm(train)(y)))
    return jnp.concatenate([x, y], axis=-1)


class DenseNet(nn.Module):
  """DenseNet-BC-``depth`` (depth = 6n+4: 40, 100, 190, 250, ...)."""
  num_classes: int
  depth: int = 100
  growth_rate: int = 12
  compression: float = 0.5

  def __post_init__(self):
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f"DenseNet-BC depth {self.depth} is not 6n+4 (40, 100, 190, 250, ...)")
    if not 0.0 < self.compression <= 1.0:
      raise ValueError(f"DenseNet compression {self.compression} must lie in (0, 1]")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    layers_per_block = (self.depth - 4) // 6
    x = conv(2 * self.growth_rate, 3)(x)
    for block in range(3):
      for layer in range(layers_per_block):
        x = DenseLayer(self.growth_rate, name=f"block{block + 1}_layer{layer}")(x, train)
      if block < 2:  # transition
        x = nn.relu(batch_norm(train, name=f"transition{block + 1}_bn")(x))
        x = conv(int(self.compression * x.shape[-1]), 1, name=f"transition{block + 1}_conv")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(batch_norm(train, name="final_bn")(x))
    return Dense(self.num_classes)(global_avg_pool(x))
