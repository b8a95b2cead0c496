"""Residual networks (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016), post-activation: each block computes relu(F(x) + shortcut(x)).

* ``CifarResNet``: the paper's CIFAR networks (Section 4.2): a 3×3 convolution with ``width``
  channels, three stages of n = (depth-2)/6 basic blocks with width, 2·width, 4·width channels
  (stride 2 at the start of stages 2 and 3), global average pooling, the classifier. With the
  default option-A shortcut (identity; where the shape changes, a stride-2 subsample padded with
  zero channels, no parameters) ResNet-20/32/56 have 269,722 / 464,154 / 853,018 parameters
  at 10 classes (the paper's 0.27M / 0.46M / 0.85M). ``shortcut="B"`` uses a 1×1 projection
  convolution and BatchNorm where the shape changes.
* ``ResNet``: the ImageNet networks (Table 1): a 7×7 stride-2 stem and 3×3 stride-2 max-pool,
  four stages of basic or bottleneck blocks with 64·2^i (·4 for bottleneck outputs) channels,
  projection (option B) shortcuts where the shape changes, and the stride on the 3×3
  convolution ("ResNet v1.5", as torchvision). ResNet-18 has 11,689,512 and ResNet-50
  25,557,032 parameters at 1000 classes.

Both accept any image size (global average pooling before the classifier).
"""

from typing import Sequence

import flax.linen as nn

from nonuniform_jax import checks
from nonuniform_jax.models.common import batch_norm, conv, global_avg_pool, pad_channels
from nonuniform_jax.models.layers import Dense

SHORTCUTS = ("A", "B")


def shortcut(x, features: int, strides: int, kind: str, train: bool):
  """Identity when the shape is kept; otherwise option A (subsample, zero channels) or option B
  (1×1 projection convolution and BatchNorm)."""
  if strides == 1 and x.shape[-1] == features:
    return x
  if kind == "A":
    return pad_channels(x[:, ::strides, ::strides, :], features)
  return batch_norm(train, name="shortcut_bn")(conv(features, 1, strides, name="shortcut_conv")(x))


class BasicBlock(nn.Module):
  """relu(bn(conv3×3(relu(bn(conv3×3(x))))) + shortcut(x)); the first convolution carries the
  stride."""
  features: int
  strides: int = 1
  shortcut: str = "B"

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(batch_norm(train)(conv(self.features, 3, self.strides)(x)))
    y = batch_norm(train)(conv(self.features, 3)(y))
    return nn.relu(y + shortcut(x, self.features, self.strides, self.shortcut, train))


class Bottleneck(nn.Module):
  """1×1 (features) → 3×3 (features, stride) → 1×1 (4·features), BatchNorm after each, ReLU
  after the first two and after the sum with the shortcut."""
  features: int
  strides: int = 1
  shortcut: str = "B"

  @nn.compact
  def __call__(self, x, train: bool):
    out = 4 * self.features
    y = nn.relu(batch_norm(train)(conv(self.features, 1)(x)))
    y = nn.relu(batch_norm(train)(conv(self.features, 3, self.strides)(y)))
    y = batch_norm(train)(conv(out, 1)(y))
    return nn.relu(y + shortcut(x, out, self.strides, self.shortcut, train))


class CifarResNet(nn.Module):
  """ResNet-``depth`` for 32×32 images (depth = 6n+2: 20, 32, 44, 56, 110, ...)."""
  num_classes: int
  depth: int = 20
  width: int = 16
  shortcut: str = "A"

  def __post_init__(self):
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth {self.depth} is not 6n+2 (20, 32, 44, 56, 110, ...)")
    checks.choice("shortcut", self.shortcut, SHORTCUTS)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    blocks = (self.depth - 2) // 6
    x = nn.relu(batch_norm(train)(conv(self.width, 3)(x)))
    for stage in range(3):
      for block in range(blocks):
        x = BasicBlock(self.width * 2**stage, strides=2 if stage and not block else 1,
                       shortcut=self.shortcut, name=f"stage{stage + 1}_block{block}")(x, train)
    return Dense(self.num_classes)(global_avg_pool(x))


class ResNet(nn.Module):
  """ImageNet ResNet: ``stage_sizes`` blocks per stage, bottleneck or basic blocks."""
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = Bottleneck if self.bottleneck else BasicBlock
    x = nn.relu(batch_norm(train)(conv(self.width, 7, 2)(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        x = block_cls(self.width * 2**stage, strides=2 if stage and not block else 1,
                      name=f"stage{stage + 1}_block{block}")(x, train)
    return Dense(self.num_classes)(global_avg_pool(x))
