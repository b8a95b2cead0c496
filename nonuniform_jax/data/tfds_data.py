"""TensorFlow Datasets access: builders, a helpful error for unprepared data, in-memory loading.

Imported lazily (by ``datasets.get_datasets``) because importing TensorFlow costs seconds.
MNIST, Fashion-MNIST and CIFAR-10/100 are read once into uint8 numpy arrays and then served by
``pipeline.ArraySource`` like the offline datasets; ImageNet and Food-101 stream
(``streaming.py``). Data is never downloaded here: prepare it with ``tfds build``.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nonuniform_jax.data.pipeline import Splits
from nonuniform_jax.data.preprocessing import NORMALIZATION

# name -> (evaluation split, number of classes)
SPLITS = {
    "mnist": ("test", 10), "fashion_mnist": ("test", 10), "cifar10": ("test", 10),
    "cifar100": ("test", 100), "imagenet2012": ("validation", 1000),
    "food101": ("validation", 101),
}


class DataNotPreparedError(ValueError):
  """A TFDS dataset has no prepared data where we looked; the message says how to prepare it."""


def setup_tensorflow() -> None:
  """Keeps TensorFlow (tf.data) off the accelerators, which belong to JAX."""
  tf.config.set_visible_devices([], "GPU")


def builder(name: str, data_dir: str):
  """The TFDS builder of ``name`` reading from ``data_dir`` ('' = $TFDS_DATA_DIR or default)."""
  setup_tensorflow()
  return tfds.builder(name, data_dir=data_dir or None)


def as_dataset(b, split, **kwargs) -> tf.data.Dataset:
  """``b.as_dataset(split, ...)``, turning tfds's "could not find data" into one clear line."""
  try:
    return b.as_dataset(split=split, **kwargs)
  except AssertionError as e:
    if "could not find data" not in str(e):
      raise
    raise DataNotPreparedError(not_prepared_message(b.name, b.data_dir)) from None


def not_prepared_message(name: str, where: str) -> str:
  root = where.split(f"/{name}/")[0]
  how = f"prepare it with `tfds build {name} --data_dir={root}`"
  if name == "imagenet2012":
    how = (f"ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
           f"ILSVRC2012_img_val.tar in {root}/downloads/manual/, then {how}")
  return (f"dataset {name!r} is not prepared: no data in {where}; {how}, or point "
          f"$TFDS_DATA_DIR or config.data_dir at a directory that holds it")


def _to_numpy(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
  # batch_size=-1 in tfds.load batches by the split size, which crashes TF when that size is
  # unknown (under tfds.testing.mock_data): read in large batches instead.
  images, labels = [], []
  for image, label in tfds.as_numpy(ds.map(lambda ex: (ex["image"], ex["label"])).batch(10_000)):
    images.append(image)
    labels.append(label)
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def load_arrays(name: str, data_dir: str) -> Splits:
  """Training and evaluation splits of a small TFDS dataset as uint8 images [N, H, W, C]."""
  b = builder(name, data_dir)
  test_split, num_classes = SPLITS[name]
  train_x, train_y = _to_numpy(as_dataset(b, "train"))
  test_x, test_y = _to_numpy(as_dataset(b, test_split))
  mean, std = NORMALIZATION[name]
  return Splits(train_x, train_y, test_x, test_y, num_classes=num_classes,
                normalization={"kind": "(pixel / 255 - mean) / std per channel",
                               "mean": list(mean), "std": list(std)})
