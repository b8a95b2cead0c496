"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015; BatchNorm after every convolution, Ioffe & Szegedy
2015).

Five stages of 3×3 convolution-BatchNorm-ReLU layers, each stage followed by a 2×2 stride-2
max-pool, then global average pooling and one Dense classifier, as the CIFAR variant of the SAM
literature (kuangliu/pytorch-cifar). The convolutions carry no bias (BatchNorm follows), so
VGG-16-BN has 14,724,042 parameters at 10 classes (kuangliu's count, 14,728,266, includes the
4,224 redundant convolution biases). A 32×32 image reaches the classifier as 1×1; other sizes
are averaged over what is left (max-pools pad odd sizes up).
"""

from typing import Sequence

import flax.linen as nn

from nonuniform_jax.models.common import batch_norm, conv, global_avg_pool
from nonuniform_jax.models.layers import Dense

VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
  """``stages``: the channels of each convolution, one tuple per stage (a max-pool after each)."""
  num_classes: int
  stages: Sequence[Sequence[int]] = VGG16

  @nn.compact
  def __call__(self, x, train: bool = False):
    for stage in self.stages:
      for features in stage:
        x = nn.relu(batch_norm(train)(conv(features, 3)(x)))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return Dense(self.num_classes)(global_avg_pool(x))
