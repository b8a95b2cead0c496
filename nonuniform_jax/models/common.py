"""Pieces shared by the convolutional families: convolutions without bias (BatchNorm follows),
He initialisation, the project's BatchNorm, and channel zero-padding for identity shortcuts."""

import flax.linen as nn
import jax.numpy as jnp

from nonuniform_jax.models.layers import BatchNorm, Conv

# He et al. (2015) normal initialisation with fan_out = k·k·out_channels, as torchvision's
# kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / fan_out).
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, strides: int = 1, name: str | None = None) -> Conv:
  """k×k convolution without bias, padded symmetrically by k//2 on each side (as PyTorch's
  ``padding=k//2``, so a stride-2 layer maps H to ceil(H/2) and sees the same pixels as the
  reference implementations)."""
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=(strides, strides),
              padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=he_normal, name=name)


def batch_norm(train: bool, name: str | None = None) -> BatchNorm:
  """The project's BatchNorm: running averages with momentum 0.9 (PyTorch's 0.1), ε = 1e-5;
  ``layers.BatchNorm``, so that exact per-example gradient norms cover its scale and offset."""
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def pad_channels(x, features: int):
  """Appends zero channels to x [b, h, w, c] up to ``features`` (parameter-free shortcut)."""
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


def global_avg_pool(x):
  """[b, h, w, c] -> [b, c]."""
  return jnp.mean(x, axis=(1, 2))
