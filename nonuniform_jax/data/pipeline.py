"""The one batching path every dataset goes through: seeded order, resume, padded evaluation.

Conventions shared by the in-memory source here and the streaming TFDS source
(``nonuniform_jax.data.streaming``):

* Training batches are an infinite sequence that is a pure function of ``(seed, step)``: epoch
  ``e = step // steps_per_epoch`` visits the examples in the order of a permutation drawn from
  ``(seed, e)``; the partial batch at the end of an epoch is dropped; augmentation randomness
  comes from ``(seed, step)``. So ``train_batches(b, seed, start_step=k)`` yields exactly what an
  uninterrupted run yields from step ``k``.
* ``batch_size`` is always the global batch; a process yields ``batch_size // process_count``
  examples of it. In memory, the process's slice of the one-process batch (so the batches do
  not depend on the number of processes); streaming, a batch from the process's own shard.
* Evaluation visits every example exactly once. The last batch is padded to full size and
  carries ``mask`` (float32, 1 real / 0 padding); all processes yield the same number of batches
  (a multi-host evaluation step is collective).
"""

import queue
import threading
from typing import Callable, Iterator, NamedTuple

import jax
import numpy as np

from nonuniform_jax import checks

Batch = dict[str, np.ndarray]


class Splits(NamedTuple):
  """A dataset's training and test arrays as stored in memory (raw, before preprocessing)."""
  train_inputs: np.ndarray
  train_labels: np.ndarray
  test_inputs: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  normalization: dict     # how inputs were (or will be) normalised, for the run summary


# Independent random streams derived from the run seed (numpy SeedSequence entropy tags).
STREAM_ORDER, STREAM_AUGMENT, STREAM_SUBSET, STREAM_TRAIN_EVAL, STREAM_LABEL_NOISE = range(5)


def rng(seed: int, stream: int, *counters: int) -> np.random.Generator:
  """A numpy generator that is a pure function of ``(seed, stream, *counters)``."""
  return np.random.default_rng([int(seed) % 2**63, stream, *counters])


def seeded_subset(seed: int, stream: int, num_examples: int, size: int) -> np.ndarray:
  """Sorted indices of ``size`` of ``num_examples`` examples drawn from ``(seed, stream)``; all
  of them (``arange``) when ``size`` is 0 or at least ``num_examples``."""
  if not 0 < size < num_examples:
    return np.arange(num_examples)
  return np.sort(rng(seed, stream).permutation(num_examples)[:size])


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the training examples in ``epoch``: a permutation drawn from (seed, epoch)."""
  return rng(seed, STREAM_ORDER, epoch).permutation(num_examples)


def local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of the process count "
                     f"{process_count}")
  return batch_size // process_count


def pad_batch(batch: Batch, size: int) -> Batch:
  """Pads every array of ``batch`` along axis 0 to ``size`` with zeros and adds ``mask``."""
  n = len(batch["labels"])
  out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) if n < size else v
         for k, v in batch.items()}
  out["mask"] = (np.arange(size) < n).astype(np.float32)
  return out


# augment(raw_images, generator, positions, global_batch_size) -> raw_images: the random draws
# are made for the whole global batch and indexed by the process's ``positions`` in it, so the
# augmentation does not depend on the number of processes.
Augment = Callable[[np.ndarray, np.random.Generator, slice, int], np.ndarray]


class ArraySource:
  """One split held in memory as numpy arrays (offline datasets and the small TFDS datasets).

  Args:
    inputs: [N, ...] raw examples (uint8 images or float32 features), global (every process
      holds the whole split; a process reads only its part of every batch).
    labels: [N] int labels (already noisy where label noise applies).
    preprocess: raw batch -> float32 normalised batch.
    augment: training augmentation of the raw batch (``Augment``), or None.
    extras: more [N] arrays passed through into evaluation batches (e.g. ``noisy``).
    process_index, process_count: this process's place among the data-parallel processes.
  """

  def __init__(self, inputs: np.ndarray, labels: np.ndarray, *,
               preprocess: Callable[[np.ndarray], np.ndarray], augment: Augment | None = None,
               extras: dict[str, np.ndarray] | None = None, process_index: int = 0,
               process_count: int = 1):
    if len(inputs) != len(labels):
      raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    self.inputs = inputs
    self.labels = np.asarray(labels, np.int32)
    self.preprocess = preprocess
    self.augment = augment
    self.extras = extras or {}
    self.process_index = process_index
    self.process_count = process_count

  @property
  def num_examples(self) -> int:
    """Examples in the whole split (all processes together)."""
    return len(self.labels)

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.num_examples // batch_size

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
    """Infinite training batches ``{'inputs', 'labels'}`` of this process, from ``start_step``."""
    local = local_batch_size(batch_size, self.process_count)
    positions = slice(self.process_index * local, (self.process_index + 1) * local)
    for step, idx in enumerate(self.train_indices(batch_size, seed, start_step), start_step):
      x = self.inputs[idx]
      if self.augment is not None:
        x = self.augment(x, rng(seed, STREAM_AUGMENT, step), positions, batch_size)
      yield {"inputs": self.preprocess(x), "labels": self.labels[idx]}

  def train_indices(self, batch_size: int, seed: int,
                    start_step: int = 0) -> Iterator[np.ndarray]:
    """The positions in this split of the examples of each training batch of this process, from
    ``start_step``: ``train_batches`` without reading the examples (a population gathers them
    on its device, ``population.py``)."""
    local = local_batch_size(batch_size, self.process_count)
    steps = self.steps_per_epoch(batch_size)
    if steps == 0:
      raise ValueError(f"batch_size={batch_size} exceeds the {self.num_examples} training examples")
    positions = slice(self.process_index * local, (self.process_index + 1) * local)
    epoch, order = -1, None
    step = start_step
    while True:
      e, i = divmod(step, steps)
      if e != epoch:
        epoch, order = e, epoch_permutation(seed, e, self.num_examples)
      yield order[i * batch_size:(i + 1) * batch_size][positions]
      step += 1

  def first_examples(self, num_examples: int) -> Batch:
    """The split's first ``num_examples`` examples ``{'inputs', 'labels'}``, preprocessed as in
    evaluation: the same on every process (each holds the whole split)."""
    return {"inputs": self.preprocess(self.inputs[:num_examples]),
            "labels": self.labels[:num_examples]}

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """One pass over the split: ``{'inputs', 'labels', 'mask', *extras}`` padded batches.

    Global batch ``j`` holds examples ``[j*batch_size, (j+1)*batch_size)``; a process takes its
    slice of it, so every process yields ``ceil(N / batch_size)`` batches.
    """
    local = local_batch_size(batch_size, self.process_count)
    for start in range(0, self.num_examples, batch_size):
      lo = min(start + self.process_index * local, self.num_examples)
      hi = min(lo + local, self.num_examples)
      batch = {"inputs": self.preprocess(self.inputs[lo:hi]), "labels": self.labels[lo:hi],
               **{k: v[lo:hi] for k, v in self.extras.items()}}
      yield pad_batch(batch, local)


def prefetch_to_device(iterator: Iterator[Batch], size: int,
                       sharding: jax.sharding.NamedSharding) -> Iterator[Batch]:
  """Yields the batches of ``iterator`` as global ``jax.Array``s, ``size`` batches ahead.

  A background thread pulls host batches (this process's slice) and places them with
  ``jax.make_array_from_process_local_data(sharding, ...)``, which shards the batch axis over
  the mesh (and assembles the global array across processes). Exceptions in the producer are
  re-raised in the consumer; closing the returned generator stops the thread.
  """
  checks.integer("prefetch size", size, 1)
  buffer: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for batch in iterator:
        arrays = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
        if not put(arrays):
          return
      put(done)
    except BaseException as e:  # pylint: disable=broad-except
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()
