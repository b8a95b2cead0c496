"""ImageNet and Food-101: tf.data streams with the guarantees of ``pipeline.ArraySource``.

Each process reads its own shard of every split (``tfds.even_splits(split, process_count)``,
what ``tfds.split_for_jax_process`` does; for a training subset, a range holding its share of
the subset), so a multi-host run reads each example once per epoch.

Training subsets (``num_train_examples``): ``N`` examples of the training split drawn by the seed,
as for the in-memory datasets (the same indices on every process). Process ``p`` reads a contiguous
range of the split that holds ``N // process_count`` (or one more) of them, in file order, and drops
the other records before decoding their images. When the process's share is estimated (from the
split's bytes per example) to fit in ``cache_bytes`` (4 GiB) and holds at most ``shuffle_buffer``
examples (so that the shuffle buffer reads it to the end in the first epoch, which completes
tf.data's cache; an epoch that stops early would discard it), its undecoded records stay in memory
after the first complete pass over the range (ImageNet's records average about 115 kB, 156 GiB for
1.43 M images in the TFDS catalogue, so 10 000 examples take about 1.2 GB over all processes; the
train-eval subset keeps a cache of its own); otherwise every epoch, and every train-eval pass, reads
the process's whole range again. Counting the subset's classes costs one label-only pass over the
whole training split on every process at start-up.

Training, epoch ``e`` of process ``p``: TFDS file order (files shuffled by ``(seed, e, p)`` on
the full split; unshuffled for a subset) and a shuffle buffer seeded from ``(seed, e, p)`` (a
uniform permutation of the process's subset when it fits in the buffer), the same number of
steps on every process (the smallest shard decides), and augmentation from stateless ops seeded
by ``(seed, e, p, position in the epoch)``. The stream of ``train_batches(b, seed,
start_step=k)`` is therefore a function of ``(seed, step)``: a resumed run rebuilds epoch
``k // steps_per_epoch`` and skips its first ``k % steps_per_epoch`` batches before decoding.
Unlike the in-memory source, the batches depend on the number of processes.

Preprocessing (Szegedy et al. 2015 as in the Flax ImageNet example): training, Inception crop
(area 8-100 %, aspect 3/4-4/3) resized to ``image_size`` and a horizontal flip; evaluation (and
training without augmentation), a centre crop of ``image_size / (image_size + 32)`` of the
shorter side resized to ``image_size``; bicubic resizing; then per-channel normalisation.
"""

import functools
import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nonuniform_jax import checks
from nonuniform_jax.data import pipeline, tfds_data
from nonuniform_jax.data.sources import Datasets
from nonuniform_jax.data.preprocessing import NORMALIZATION

CROP_PADDING = 32
SHUFFLE_BUFFER = 16_384
CACHE_BYTES = 4 * 2**30   # a process keeps its subset's undecoded records in memory up to this
UNDECODED = {"image": tfds.decode.SkipDecoding()}


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


def subset_bounds(subset: np.ndarray, total: int, process_count: int) -> np.ndarray:
  """[process_count + 1] boundaries cutting ``range(total)`` into contiguous ranges that hold
  ``len(subset) // process_count`` or one more of the sorted indices ``subset`` each (the first
  ranges the larger, as in ``tfds.even_splits``)."""
  n = len(subset)
  positions = [p * (n // process_count) + min(p, n % process_count)
               for p in range(process_count + 1)]
  bounds = np.append(subset, total)[positions]
  bounds[0] = 0
  return bounds


def read_subset(builder, split: str, subset: np.ndarray, start: int,
                stop: int) -> tf.data.Dataset:
  """The undecoded examples of ``split`` whose indices are in ``subset`` (sorted) and in
  ``[start, stop)``, in file order.

  ``split[start:stop]`` is read without file shuffling or interleaving, so the ``i``-th record
  read is example ``start + i`` of the split; unwanted records are dropped before decoding.
  """
  keep = np.zeros(stop - start, bool)
  keep[subset[np.searchsorted(subset, start):np.searchsorted(subset, stop)] - start] = True
  keep = tf.constant(keep)
  ds = tfds_data.as_dataset(builder, f"{split}[{start}:{stop}]", decoders=UNDECODED,
                            shuffle_files=False,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1))
  return ds.enumerate().filter(lambda i, _: keep[i]).map(lambda _, example: example)


def _fits(builder, split: str, count: int, budget: int) -> bool:
  """Whether ``count`` undecoded examples of ``split`` take at most ``budget`` bytes, at the
  split's mean size (from the dataset info; a mock dataset has none and tiny examples)."""
  try:
    info = builder.info.splits[split]
  except KeyError:
    return True
  return count * info.num_bytes <= budget * info.num_examples


class StreamSource:
  """One split of a TFDS dataset, or a subset of it, streamed through tf.data for this process.

  Args:
    builder: the TFDS builder. split: its split (or a slice such as 'train[:10000]'; a split
      name when ``subset`` is given).
    train_fn: (image bytes, seed [2] int64) -> float32 example; eval_fn: image bytes -> example.
    input_shape: shape of one preprocessed example.
    subset: sorted distinct indices of the examples of ``split`` to use (all processes), or
      None for the whole split. A subset is read in file order, and cached in memory when
      this process's share fits in ``cache_bytes`` (module doc; ``cached`` says which).
  """

  def __init__(self, builder, split, *, train_fn, eval_fn, input_shape, subset=None,
               process_index=0, process_count=1, shuffle_buffer=SHUFFLE_BUFFER,
               cache_bytes=CACHE_BYTES):
    self.builder, self.split = builder, split
    if subset is None:
      self.shards = tfds.even_splits(split, process_count)
      self.shard_sizes = [num_examples(builder, s) for s in self.shards]
      self.num_examples = num_examples(builder, split)
    else:
      subset, total = np.asarray(subset, np.int64), num_examples(builder, split)
      if not (len(subset) and subset[0] >= 0 and subset[-1] < total and
              np.all(np.diff(subset) > 0)):
        raise ValueError(f"subset of {len(subset)} indices must be sorted, distinct and in "
                         f"[0, {total}) for split {split!r}")
      bounds = subset_bounds(subset, total, process_count)
      self.shard_sizes = np.diff(np.searchsorted(subset, bounds)).tolist()
      self.num_examples = len(subset)
      self._range = bounds[process_index], bounds[process_index + 1]
      share = self.shard_sizes[process_index]
      self.cached = share <= shuffle_buffer and _fits(builder, split, share, cache_bytes)
    self.subset = subset
    self.train_fn, self.eval_fn = train_fn, eval_fn
    self.input_shape = tuple(input_shape)
    self.process_index, self.process_count = process_index, process_count
    self.shuffle_buffer = shuffle_buffer

  def steps_per_epoch(self, batch_size: int) -> int:
    return min(self.shard_sizes) // pipeline.local_batch_size(batch_size, self.process_count)

  @functools.cached_property
  def _subset_records(self) -> tf.data.Dataset:
    ds = read_subset(self.builder, self.split, self.subset, *self._range)
    return ds.cache() if self.cached else ds   # one dataset object: its cache outlives epochs

  def _records(self, file_seed: int | None = None) -> tf.data.Dataset:
    """This process's undecoded examples: its subset in file order, or its shard of the split
    with the files shuffled by ``file_seed`` (in file order when None)."""
    if self.subset is not None:
      return self._subset_records
    return tfds_data.as_dataset(self.builder, self.shards[self.process_index],
                                decoders=UNDECODED, shuffle_files=file_seed is not None,
                                read_config=tfds.ReadConfig(shuffle_seed=file_seed))

  def _epoch(self, seed: int, epoch: int, local: int, steps: int, skip: int) -> tf.data.Dataset:
    file_seed, buffer_seed = pipeline.rng(seed, pipeline.STREAM_ORDER, epoch,
                                          self.process_index).integers(2**31, size=2)
    augment_seed = int(pipeline.rng(seed, pipeline.STREAM_AUGMENT, epoch,
                                    self.process_index).integers(2**31))
    ds = self._records(int(file_seed)).shuffle(self.shuffle_buffer, seed=int(buffer_seed))
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
    count = 0
    if self.shard_sizes[self.process_index]:   # an empty shard (fewer examples than processes)
      ds = self._records().map(                # has nothing to read, only padding to send
          lambda ex: {"inputs": self.eval_fn(ex["image"]),
                      "labels": tf.cast(ex["label"], tf.int32)},
          num_parallel_calls=tf.data.AUTOTUNE)
      for batch in tfds.as_numpy(ds.batch(local).prefetch(tf.data.AUTOTUNE)):
        yield pipeline.pad_batch(batch, local)
        count += 1
    empty = {"inputs": np.zeros((0,) + self.input_shape, np.float32),
             "labels": np.zeros((0,), np.int32)}
    for _ in range(count, math.ceil(max(self.shard_sizes) / local)):
      yield pipeline.pad_batch(empty, local)


def get_datasets(name: str, *, seed: int, data_dir: str, augment: bool, image_size: int,
                 num_train_examples: int, train_eval_examples: int, process_index: int,
                 process_count: int) -> Datasets:
  """ImageNet or Food-101 as three ``StreamSource``s (arguments: ``data.get_datasets``).

  A training subset and the train-eval subset within it are drawn by the seed like those of
  the in-memory datasets (``pipeline.seeded_subset``); without a training subset, train-eval
  takes the first examples of the split (TFDS stores them shuffled), which costs no full pass.
  """
  checks.integer("image_size", image_size, 1)
  b = tfds_data.builder(name, data_dir)
  test_split, num_classes = tfds_data.SPLITS[name]
  mean, std = NORMALIZATION[name]
  eval_fn = lambda image: center_crop(image, image_size, mean, std)
  train_fn = ((lambda image, pair: inception_crop(image, pair, image_size, mean, std))
              if augment else (lambda image, pair: eval_fn(image)))
  shape = (image_size, image_size, 3)
  where = dict(train_fn=train_fn, eval_fn=eval_fn, input_shape=shape,
               process_index=process_index, process_count=process_count)
  full = num_examples(b, "train")
  if num_train_examples > full:
    raise ValueError(f"num_train_examples={num_train_examples} exceeds the {full} training "
                     f"examples of {name!r}")
  subset = (pipeline.seeded_subset(seed, pipeline.STREAM_SUBSET, full, num_train_examples)
            if 0 < num_train_examples < full else None)
  train = StreamSource(b, "train", subset=subset, **where)
  if subset is not None:
    chosen = pipeline.seeded_subset(seed, pipeline.STREAM_TRAIN_EVAL, len(subset),
                                    train_eval_examples)
    train_eval = StreamSource(b, "train", subset=subset[chosen], **where)
  elif 0 < train_eval_examples < full:
    train_eval = StreamSource(b, f"train[:{train_eval_examples}]", **where)
  else:
    train_eval = train
  test = StreamSource(b, test_split, **where)
  info = {
      "dataset": name,
      "source": "tfds (streaming)",
      "data_dir": b.data_dir,
      "num_classes": num_classes,
      "input_shape": list(shape),
      "num_train": train.num_examples,
      "num_train_full": full,
      "train_subset": f"{len(subset)} examples drawn by the seed" if subset is not None else "all",
      "num_train_eval": train_eval.num_examples,
      "num_test": test.num_examples,
      "class_counts_train": (class_counts(b, "train", subset, num_classes)
                             if subset is not None else None),
      "normalization": {"kind": "(pixel / 255 - mean) / std per channel", "mean": list(mean),
                        "std": list(std)},
      "augmentation": ("Inception random-resized crop, horizontal flip" if augment else "none"),
      "image_size": image_size,
      "label_noise": {"kind": "none"},
      "process_index": process_index,
      "process_count": process_count,
  }
  return Datasets(name=name, num_classes=num_classes, input_shape=shape,
                           num_train=train.num_examples, info=info, train=train,
                           train_eval=train_eval, test=test)


def class_counts(builder, split: str, subset: np.ndarray, num_classes: int) -> list[int]:
  """[num_classes] label counts of the examples ``subset`` of ``split`` (all processes': one
  pass over the whole split's records, images left undecoded)."""
  labels = read_subset(builder, split, subset, 0, num_examples(builder, split))
  counts = np.zeros(num_classes, np.int64)
  for batch in tfds.as_numpy(labels.map(lambda ex: ex["label"]).batch(4096)):
    counts += np.bincount(batch, minlength=num_classes)
  return counts.tolist()
