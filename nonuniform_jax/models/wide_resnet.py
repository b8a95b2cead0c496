"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

A 3×3 convolution with 16 channels, three stages of n = (d-4)/6 pre-activation blocks with
16k, 32k, 64k channels (stride 2 at the start of stages 2 and 3), each block
BN-ReLU-conv3×3-BN-ReLU-dropout-conv3×3 with a 1×1 projection shortcut where the shape changes,
then BatchNorm, ReLU, global average pooling and the classifier. WRN-28-10 has 36,479,194
parameters at 10 classes (the paper's 36.5M). Dropout (rate ``dropout_rate``, the paper's 0.3 on
CIFAR; 0 by default) draws from the ``'dropout'`` rng collection in training mode only.
"""

import flax.linen as nn

from nonuniform_jax import checks
from nonuniform_jax.models.common import batch_norm, conv, global_avg_pool
from nonuniform_jax.models.layers import Dense
from nonuniform_jax.models.preact_resnet import PreActBlock


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` (depth = 6n+4: 10, 16, 22, 28, 40, 58, ...)."""
  num_classes: int
  depth: int = 28
  widen_factor: int = 10
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth {self.depth} is not 6n+4 (10, 16, 22, 28, 40, ...)")
    checks.integer("WideResNet widen_factor", self.widen_factor, 1)
    checks.in_range("WideResNet dropout_rate", self.dropout_rate, 0, 1, high_open=True)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    blocks = (self.depth - 4) // 6
    x = conv(16, 3)(x)
    for stage in range(3):
      for block in range(blocks):
        x = PreActBlock(16 * self.widen_factor * 2**stage,
                        strides=2 if stage and not block else 1, dropout_rate=self.dropout_rate,
                        name=f"stage{stage + 1}_block{block}")(x, train)
    x = nn.relu(batch_norm(train, name="final_bn")(x))
    return Dense(self.num_classes)(global_avg_pool(x))
