"""Pre-activation residual networks (He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual
Networks", ECCV 2016): each block computes x + F(x) with F = conv(relu(bn(conv(relu(bn(x)))))).

``PreActResNet`` with ``stage_sizes=(2, 2, 2, 2)`` is the CIFAR PreAct ResNet-18 used by the SAM
literature: a 3×3 stem with 64 channels, four stages of basic pre-activation blocks with
64, 128, 256, 512 channels (stride 2 from stage 2 on), a final BatchNorm and ReLU, global average
pooling, the classifier: 11,172,170 parameters at 10 classes. (The often-copied
kuangliu/pytorch-cifar version omits the final BatchNorm, 1,024 parameters fewer: 11,171,146.)

``PreActBlock`` also serves the wide residual networks (``wide_resnet.py``), which add dropout
between the two convolutions.
"""

from typing import Sequence

import flax.linen as nn

from nonuniform_jax.models.common import batch_norm, conv, global_avg_pool
from nonuniform_jax.models.layers import Dense


class PreActBlock(nn.Module):
  """x + conv3×3(dropout(relu(bn(conv3×3(relu(bn(x))), stride)))). Where the shape changes the
  shortcut is a 1×1 convolution of the pre-activated input relu(bn(x)) (no BatchNorm)."""
  features: int
  strides: int = 1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(batch_norm(train)(x))
    project = self.strides != 1 or x.shape[-1] != self.features
    residual = conv(self.features, 1, self.strides, name="shortcut_conv")(y) if project else x
    y = conv(self.features, 3, self.strides)(y)
    y = nn.relu(batch_norm(train)(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3)(y)
    return y + residual


class PreActResNet(nn.Module):
  """CIFAR pre-activation ResNet; ``stage_sizes=(2, 2, 2, 2)`` is PreAct ResNet-18."""
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv(self.width, 3)(x)
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        x = PreActBlock(self.width * 2**stage, strides=2 if stage and not block else 1,
                        name=f"stage{stage + 1}_block{block}")(x, train)
    x = nn.relu(batch_norm(train, name="final_bn")(x))
    return Dense(self.num_classes)(global_avg_pool(x))
