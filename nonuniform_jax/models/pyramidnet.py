"""Pyramidal residual networks (Han, Kim, Kim, "Deep Pyramidal Residual Networks", CVPR 2017),
the CIFAR networks of the reference code (dyhan0920/PyramidNet-PyTorch).

A 3×3 convolution with 16 channels and BatchNorm, then 3n residual units in three stages (stride
2 at the start of stages 2 and 3) whose width grows linearly, additively by α/(3n) per unit:
unit k has round(16 + kα/(3n)) channels (×4 at its output with bottleneck units), so the last
has 16 + α. Units have no ReLU after their sum:
basic BN-conv3×3-BN-ReLU-conv3×3-BN, bottleneck BN-conv1×1-BN-ReLU-conv3×3-BN-ReLU-conv1×1-BN
(the stride on the 3×3). The shortcut is parameter-free: 2×2 average pooling where the unit
strides (the last window of an odd side covers what is left), then zero channels appended. A
final BatchNorm, ReLU, global average pooling and the classifier follow.
depth = 9n+2 with bottleneck units (110: n = 12), 6n+2 with basic ones.
"""

import flax.linen as nn

from nonuniform_jax.models.common import batch_norm, conv, global_avg_pool, pad_channels
from nonuniform_jax.models.layers import Dense


class PyramidUnit(nn.Module):
  """One pyramidal residual unit of width ``features`` (4·features out when ``bottleneck``)."""
  features: int
  strides: int = 1
  bottleneck: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    y = batch_norm(train)(x)
    if self.bottleneck:
      y = nn.relu(batch_norm(train)(conv(self.features, 1)(y)))
      y = nn.relu(batch_norm(train)(conv(self.features, 3, self.strides)(y)))
      y = conv(4 * self.features, 1)(y)
    else:
      y = nn.relu(batch_norm(train)(conv(self.features, 3, self.strides)(y)))
      y = conv(self.features, 3)(y)
    y = batch_norm(train)(y)
    if self.strides != 1:
      odd = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))  # as PyTorch's ceil_mode=True
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding=odd, count_include_pad=False)
    return y + pad_channels(x, y.shape[-1])


class PyramidNet(nn.Module):
  """PyramidNet-``depth`` with widening factor ``alpha``."""
  num_classes: int
  depth: int = 110
  alpha: float = 48
  bottleneck: bool = True

  def __post_init__(self):
    per_unit = 9 if self.bottleneck else 6
    if self.depth < per_unit + 2 or (self.depth - 2) % per_unit:
      raise ValueError(f"PyramidNet depth {self.depth} is not {per_unit}n+2 with "
                       f"bottleneck={self.bottleneck}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    units = (self.depth - 2) // (9 if self.bottleneck else 6)
    add_rate = self.alpha / (3 * units)
    width = 16.0  # accumulated as in the reference code, then rounded per unit
    x = batch_norm(train)(conv(16, 3)(x))
    for stage in range(3):
      for unit in range(units):
        width += add_rate
        x = PyramidUnit(int(round(width)), strides=2 if stage and not unit else 1,
                        bottleneck=self.bottleneck, name=f"stage{stage + 1}_unit{unit}")(x, train)
    x = nn.relu(batch_norm(train, name="final_bn")(x))
    return Dense(self.num_classes)(global_avg_pool(x))
