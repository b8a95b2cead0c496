"""Normalisation constants and the numpy augmentation of the in-memory image datasets.

Images are stored as uint8 and normalised per batch: ``x = (pixel / 255 - mean_c) / std_c``
per channel ``c``. The constants are the training-set statistics of each dataset (CIFAR's std
is the true per-pixel standard deviation, 0.247/0.243/0.261 for CIFAR-10, not the often copied
0.2023/0.1994/0.2010); Food-101 uses ImageNet's.
"""

import numpy as np

# name -> (per-channel mean, per-channel std) on the [0, 1] scale.
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "food101": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Normalize:
  """uint8 (or [0, 255]) images [..., C] -> float32 ``(x / 255 - mean) / std`` per channel."""

  def __init__(self, mean, std):
    self._scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    self._offset = (np.asarray(mean) / np.asarray(std)).astype(np.float32)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    # Broadcasting over a length-3 channel axis is ~8x slower than over whole flattened
    # examples, so the per-channel constants are tiled to the example size.
    flat = images.reshape(len(images), int(np.prod(images.shape[1:]))).astype(np.float32)
    reps = flat.shape[1] // len(self._scale)
    flat *= np.tile(self._scale, reps)
    flat -= np.tile(self._offset, reps)
    return flat.reshape(images.shape)


def as_float32(x: np.ndarray) -> np.ndarray:
  """The preprocessing of inputs stored already normalised."""
  return np.asarray(x, np.float32)


def random_crop_flip(images: np.ndarray, generator: np.random.Generator, positions: slice,
                     total: int, padding: int = 4) -> np.ndarray:
  """CIFAR augmentation: zero-pad by ``padding``, random crop back to H×W, random horizontal flip.

  output[n, i, j] = padded[n, oy_n + i, ox_n + (W-1-j if flip_n else j)] with offsets
  ``oy, ox ~ U{0..2·padding}`` and ``flip ~ Bernoulli(1/2)`` drawn for all ``total`` examples of
  the global batch and taken at ``positions`` (this process's slice). Zero (black) padding is
  the torchvision convention. A loop of slice copies beats one fancy-index gather here.

  Args:
    images: [n, H, W, C] raw images of this process.
  """
  n, h, w, c = images.shape
  oy = generator.integers(0, 2 * padding + 1, total)[positions]
  ox = generator.integers(0, 2 * padding + 1, total)[positions]
  flip = generator.random(total)[positions] < 0.5
  padded = np.zeros((n, h + 2 * padding, w + 2 * padding, c), images.dtype)
  padded[:, padding:padding + h, padding:padding + w] = images
  out = np.empty_like(images)
  for k in range(n):
    crop = padded[k, oy[k]:oy[k] + h, ox[k]:ox[k] + w]
    out[k] = crop[:, ::-1] if flip[k] else crop
  return out
