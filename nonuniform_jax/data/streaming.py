"""ImageNet and Food-101: tf.data streams with the guarantees of ``pipeline.ArraySource``.

Each process reads its own shard of every split (``tfds.even_splits(split, process_count)``,
what ``tfds.split_for_jax_process`` does), so a multi-host run reads each example once per epoch.

Training, epoch ``e`` of process ``p``: TFDS file order and a shuffle buffer seeded from
``(seed, e, p)``, the same number of steps on every process (the smallest shard decides), and
augmentation from stateless ops seeded by ``(seed, e, p, position in the epoch)``. The stream of
``train_batches(b, seed, start_step=k)`` is therefore a function of ``(seed, step)``: a resumed
run rebuilds epoch ``k // steps_per_epoch`` and skips its first ``k % steps_per_epoch`` batches
before decoding. Unlike the in-memory source, the batches depend on the number of processes.

Preprocessing (Szegedy et al. 2015 as in the Flax ImageNet example): training, Inception crop
(area 8-100 %, aspect 3/4-4/3) resized to ``image_size`` and a horizontal flip; evaluation (and
training without augmentation), a centre crop of ``image_size / (image_size + 32)`` of the
shorter side resized to ``image_size``; bicubic resizing; then per-channel normalisation.
"""

import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nonuniform_jax.data import datasets, pipeline, tfds_data
from nonuniform_jax.data.preprocessing import NORMALIZATION

CROP_PADDING = 32
SHUFFLE_BUFFER = 16_384


def _finish(image, size, mean, std):
  image = tf.image.resize(image, [size, size], method="bicubic")
  image = tf.clip_by_value(image, 0.0, 255.0) / 255.0   # bicubic overshoots
  return (image - mean) / std


def _decode_crop(image_bytes, window_fn):
  """Decodes only the window ``window_fn(shape) = [y, x, h, w]`` of a JPEG (fast path), or
  decodes a PNG/other image whole and slices it (the TFDS mock encodes PNG)."""
  def jpeg():
    window = window_fn(tf.io.extract_jpeg_shape(image_bytes))
    return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    y, x, h, w = tf.unstack(window_fn(tf.shape(image)))
    return image[y:y + h, x:x + w]
  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def inception_crop(image_bytes, seed, size, mean, std):
  """Image bytes -> float32 [size, size, 3]: random-resized crop and flip, seeded by seed [2]."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def window(shape):
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=crop_seed,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], extent[0], extent[1]])
  image = tf.image.stateless_random_flip_left_right(_decode_crop(image_bytes, window), flip_seed)
  return _finish(image, size, mean, std)


def center_crop(image_bytes, size, mean, std):
  """Image bytes -> float32 [size, size, 3]: centre crop of the shorter side, resized."""
  def window(shape):
    side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * size /
                   (size + CROP_PADDING), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
  return _finish(_decode_crop(image_bytes, window), size, mean, std)


def num_examples(builder, split) -> int:
  """Examples in ``split`` (a name, slice or even split) from the dataset info.

  Under ``tfds.testing.mock_data`` the info has no splits: count the mock stream instead.
  """
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    return int(tfds_data.as_dataset(builder, split).cardinality())


class StreamSource:
  """One split of a TFDS dataset streamed through tf.data for this process.

  Args:
    builder: the TFDS builder. split: its split (or a slice such as 'train[:10000]').
    train_fn: (image bytes, seed [2] int64) -> float32 example; eval_fn: image bytes -> example.
    input_shape: shape of one preprocessed example.
  """

  def __init__(self, builder, split, *, train_fn, eval_fn, input_shape, process_index=0,
               process_count=1, shuffle_buffer=SHUFFLE_BUFFER):
    self.builder, self.split = builder, split
    self.shards = tfds.even_splits(split, process_count)
    self.shard = self.shards[process_index]
    self.shard_sizes = [num_examples(builder, s) for s in self.shards]
    self.num_examples = num_examples(builder, split)
    self.train_fn, self.eval_fn = train_fn, eval_fn
    self.input_shape = tuple(input_shape)
    self.process_index, self.process_count = process_index, process_count
    self.shuffle_buffer = shuffle_buffer

  def steps_per_epoch(self, batch_size: int) -> int:
    return min(self.shard_sizes) // pipeline.local_batch_size(batch_size, self.process_count)

  def _read(self, **kwargs) -> tf.data.Dataset:
    return tfds_data.as_dataset(self.builder, self.shard,
                                decoders={"image": tfds.decode.SkipDecoding()}, **kwargs)

  def _epoch(self, seed: int, epoch: int, local: int, steps: int, skip: int) -> tf.data.Dataset:
    file_seed, buffer_seed = pipeline.rng(seed, pipeline.STREAM_ORDER, epoch,
                                          self.process_index).integers(2**31, size=2)
    augment_seed = int(pipeline.rng(seed, pipeline.STREAM_AUGMENT, epoch,
                                    self.process_index).integers(2**31))
    ds = self._read(shuffle_files=True,
                    read_config=tfds.ReadConfig(shuffle_seed=int(file_seed)))
    ds = ds.shuffle(self.shuffle_buffer, seed=int(buffer_seed))
    ds = ds.take(steps * local).enumerate().skip(skip * local)   # skip before decoding

    def prepare(i, ex):
      seed_pair = tf.stack([tf.constant(augment_seed, tf.int64), i])
      return {"inputs": self.train_fn(ex["image"], seed_pair),
              "labels": tf.cast(ex["label"], tf.int32)}
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0):
    """Infinite training batches of this process from ``start_step`` (see the module doc)."""
    local = pipeline.local_batch_size(batch_size, self.process_count)
    steps = self.steps_per_epoch(batch_size)
    if steps == 0:
      raise ValueError(f"batch_size={batch_size} exceeds the {min(self.shard_sizes)} training "
                       f"examples of a process")
    step = start_step
    while True:
      epoch, skip = divmod(step, steps)
      for batch in tfds.as_numpy(self._epoch(seed, epoch, local, steps, skip)):
        yield batch
        step += 1

  def eval_batches(self, batch_size: int):
    """One pass over this process's shard, padded with ``mask``; equal batch counts everywhere."""
    local = pipeline.local_batch_size(batch_size, self.process_count)
    ds = self._read(shuffle_files=False).map(
        lambda ex: {"inputs": self.eval_fn(ex["image"]), "labels": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE)
    count = 0
    for batch in tfds.as_numpy(ds.batch(local).prefetch(tf.data.AUTOTUNE)):
      yield pipeline.pad_batch(batch, local)
      count += 1
    empty = {"inputs": np.zeros((0,) + self.input_shape, np.float32),
             "labels": np.zeros((0,), np.int32)}
    for _ in range(count, math.ceil(max(self.shard_sizes) / local)):
      yield pipeline.pad_batch(empty, local)


def get_datasets(name: str, *, data_dir: str, augment: bool, image_size: int,
                 num_train_examples: int, train_eval_examples: int, process_index: int,
                 process_count: int) -> datasets.Datasets:
  """ImageNet or Food-101 as three ``StreamSource``s (training subsets: the first examples)."""
  if image_size <= 0:
    raise ValueError(f"image_size={image_size} must be positive")
  b = tfds_data.builder(name, data_dir)
  test_split, num_classes = tfds_data.SPLITS[name]
  mean, std = NORMALIZATION[name]
  eval_fn = lambda image: center_crop(image, image_size, mean, std)
  train_fn = ((lambda image, seed: inception_crop(image, seed, image_size, mean, std))
              if augment else (lambda image, seed: eval_fn(image)))
  shape = (image_size, image_size, 3)
  where = dict(train_fn=train_fn, eval_fn=eval_fn, input_shape=shape,
               process_index=process_index, process_count=process_count)
  train_split = f"train[:{num_train_examples}]" if num_train_examples else "train"
  train = StreamSource(b, train_split, **where)
  if 0 < train_eval_examples < train.num_examples:
    train_eval = StreamSource(b, f"train[:{train_eval_examples}]", **where)
  else:
    train_eval = StreamSource(b, train_split, **where)
  test = StreamSource(b, test_split, **where)
  info = {
      "dataset": name,
      "source": "tfds (streaming)",
      "data_dir": b.data_dir,
      "num_classes": num_classes,
      "input_shape": list(shape),
      "num_train": train.num_examples,
      "train_subset": f"the first {num_train_examples}" if num_train_examples else "all",
      "num_train_eval": train_eval.num_examples,
      "num_test": test.num_examples,
      "class_counts_train": _class_counts(train, num_classes) if num_train_examples else None,
      "normalization": {"kind": "(pixel / 255 - mean) / std per channel", "mean": list(mean),
                        "std": list(std)},
      "augmentation": ("Inception random-resized crop, horizontal flip" if augment else "none"),
      "image_size": image_size,
      "label_noise": {"kind": "none"},
      "process_index": process_index,
      "process_count": process_count,
  }
  return datasets.Datasets(name=name, num_classes=num_classes, input_shape=shape,
                           num_train=train.num_examples, info=info, train=train,
                           train_eval=train_eval, test=test)


def _class_counts(source: StreamSource, num_classes: int) -> list[int]:
  """Class balance of a training subset (all processes: it reads every shard's labels)."""
  labels = tfds_data.as_dataset(source.builder, source.split,
                                decoders={"image": tfds.decode.SkipDecoding()})
  counts = np.zeros(num_classes, np.int64)
  for batch in tfds.as_numpy(labels.map(lambda ex: ex["label"]).batch(4096)):
    counts += np.bincount(batch, minlength=num_classes)
  return counts.tolist()
