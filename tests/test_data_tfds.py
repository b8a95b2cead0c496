"""TFDS datasets under tfds.testing.mock_data, and the streaming source on real TFDS files.

The mock ignores split slicing (every process would read the whole split), so the per-process
sharding of the streaming source, and which examples a training subset reads, are checked on
small datasets written to disk as real TFDS files (JPEG images of random sizes, label = index).
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nonuniform_jax import data
from nonuniform_jax.data import label_noise, pipeline, preprocessing, streaming, tfds_data

NUM_MOCK = 16


@pytest.fixture
def mock():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    yield


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.usefixtures("mock")
@pytest.mark.parametrize("name, shape, classes", [
    ("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)])
def test_in_memory_tfds(name, shape, classes):
  ds = data.get_datasets(name, seed=0, train_eval_examples=5)
  assert (ds.input_shape, ds.num_classes, ds.num_train) == (shape, classes, NUM_MOCK)
  assert data.describe(name, 0) == (ds.num_classes, ds.input_shape)   # known before loading
  assert ds.train.inputs.dtype == np.uint8                       # stored raw, normalised per batch
  batches = take(ds.train.train_batches(4, seed=1), 6)
  assert batches[0]["inputs"].shape == (4,) + shape and batches[0]["inputs"].dtype == np.float32
  assert_batches_equal(batches[3:], take(ds.train.train_batches(4, seed=1, start_step=3), 3))
  evals = list(ds.train_eval.eval_batches(4))
  assert len(evals) == 2 and evals[1]["mask"].sum() == 1         # 5 examples: 4 + 1 padded
  mean, std = preprocessing.NORMALIZATION[name]
  expected = (ds.test.inputs[:4] / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(next(ds.test.eval_batches(4))["inputs"], expected, atol=1e-5)
  augmented = name.startswith("cifar")
  plain = data.get_datasets(name, seed=0, augment=False)
  same = np.array_equal(next(plain.train.train_batches(4, seed=1))["inputs"], batches[0]["inputs"])
  assert same != augmented


@pytest.mark.usefixtures("mock")
def test_in_memory_tfds_two_processes():
  one = data.get_datasets("cifar10", seed=3)
  two = [data.get_datasets("cifar10", seed=3, process_index=p, process_count=2) for p in (0, 1)]
  full = take(one.train.train_batches(8, seed=3), 3)
  halves = [take(d.train.train_batches(8, seed=3), 3) for d in two]
  for f, h0, h1 in zip(full, *halves):
    for k in f:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), f[k])
  evals = [list(d.test.eval_batches(6)) for d in two]
  assert len(evals[0]) == len(evals[1]) == 3
  masks = np.concatenate([b["mask"] for e in evals for b in e])
  assert masks.sum() == NUM_MOCK


@pytest.mark.usefixtures("mock")
@pytest.mark.parametrize("name, kind", [("cifar10", "asymmetric"), ("cifar100", "asymmetric"),
                                        ("cifar100", "symmetric")])
def test_label_noise_under_mock(name, kind, tmp_path):
  kwargs = dict(seed=4, label_noise=kind, label_noise_rate=0.5)
  ds = data.get_datasets(name, **kwargs)
  np.testing.assert_array_equal(ds.train.labels, data.get_datasets(name, **kwargs).train.labels)
  clean = ds.clean_train_labels
  changed = ds.train.labels != clean
  np.testing.assert_array_equal(changed, ds.noise.noisy)
  if kind == "asymmetric":
    targets = label_noise.asymmetric_targets(name)
    np.testing.assert_array_equal(ds.train.labels[changed], targets[clean[changed]])
  evals = list(ds.train_eval.eval_batches(8))
  np.testing.assert_array_equal(np.concatenate([b["noisy"] for b in evals])[:NUM_MOCK], changed)
  assert data.write_label_noise(ds, str(tmp_path)).endswith("label_noise.npz")


@pytest.mark.usefixtures("mock")
@pytest.mark.parametrize("name", ["imagenet2012", "food101"])
def test_streaming_under_mock(name):
  # Mock images have random sizes (e.g. 13x9); the crops resize them to image_size.
  ds = data.get_datasets(name, seed=0, image_size=24, train_eval_examples=4)
  assert ds.input_shape == (24, 24, 3) and ds.num_train == NUM_MOCK
  assert data.describe(name, 24) == (ds.num_classes, ds.input_shape)
  evals = list(ds.test.eval_batches(6))
  assert [b["mask"].sum() for b in evals] == [6, 6, 4]
  assert evals[0]["inputs"].shape == (6, 24, 24, 3) and np.isfinite(evals[0]["inputs"]).all()
  batches = take(ds.train.train_batches(4, seed=2), 6)            # 4 steps per epoch: 2 epochs
  assert batches[0]["inputs"].shape == (4, 24, 24, 3) and batches[0]["labels"].dtype == np.int32
  if name == "food101":
    return  # the same code path as imagenet2012 from here on
  # Resuming inside epoch 0 and inside epoch 1 gives the uninterrupted run's batches.
  assert_batches_equal(batches[2:], take(ds.train.train_batches(4, seed=2, start_step=2), 4))
  assert_batches_equal(batches[5:], take(ds.train.train_batches(4, seed=2, start_step=5), 1))
  assert not np.array_equal(batches[0]["inputs"], next(ds.train.train_batches(4, seed=3))["inputs"])
  plain = data.get_datasets(name, seed=0, image_size=24, augment=False)
  np.testing.assert_array_equal(  # no augmentation: training crops are the evaluation crops
      np.sort(next(plain.train.train_batches(16, seed=2))["inputs"].reshape(16, -1), axis=0),
      np.sort(np.concatenate([b["inputs"] for b in plain.train_eval.eval_batches(16)])
              .reshape(16, -1), axis=0))


def test_center_and_inception_crops():
  image = tf.io.encode_jpeg(tf.fill([30, 50, 3], tf.constant(128, tf.uint8)))
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  out = streaming.center_crop(image, 16, mean, std).numpy()
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out, (128 / 255 - 0.5) / 0.25, atol=0.05)
  seed = tf.constant([1, 2], tf.int64)
  a = streaming.inception_crop(image, seed, 16, mean, std).numpy()
  np.testing.assert_array_equal(a, streaming.inception_crop(image, seed, 16, mean, std).numpy())


def test_missing_data_is_one_helpful_line(tmp_path):
  with pytest.raises(ValueError) as e:
    tfds_data.as_dataset(tfds_data.builder("cifar10", str(tmp_path)), "train")
  message = str(e.value)
  assert "\n" not in message and "tfds build cifar10" in message and str(tmp_path) in message
  assert e.value.__suppress_context__
  assert "ILSVRC2012_img_train.tar" in tfds_data.not_prepared_message(
      "imagenet2012", f"{tmp_path}/imagenet2012/5.1.0")


def write_tiny(root, splits):
  """A prepared TFDS dataset in ``root``: split -> (examples, tfrecord files); JPEGs of random
  sizes; label = index in the split."""
  root.mkdir(parents=True)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=max(n for n, _ in splits.values()))})
  gen = np.random.default_rng(0)
  for split, (n, shards) in splits.items():
    for s, ids in enumerate(np.array_split(np.arange(n), shards)):
      with tf.io.TFRecordWriter(str(root / f"tiny-{split}.tfrecord-{s:05d}-of-{shards:05d}")) as w:
        for i in ids:
          size = tuple(gen.integers(6, 20, 2)) + (3,)
          w.write(features.serialize_example({"image": gen.integers(0, 256, size, np.uint8),
                                              "label": int(i)}))
  tfds.folder_dataset.write_metadata(data_dir=str(root), features=features, split_infos=None)
  return tfds.builder_from_directory(str(root))


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
  """23 training JPEGs in 3 files, 7 validation JPEGs in 1."""
  return write_tiny(tmp_path_factory.mktemp("tfds") / "tiny" / "1.0.0",
                    {"train": (23, 3), "validation": (7, 1)})


@pytest.fixture(scope="module")
def long_files(tmp_path_factory):
  """40 training JPEGs in 2 files of 20: longer than TFDS's interleave block (16), so reading
  them in any order but the files' shows in the labels."""
  return write_tiny(tmp_path_factory.mktemp("tfds") / "tiny" / "1.0.0",
                    {"train": (40, 2), "validation": (4, 1)})


def stream(builder, split, p, count, **kwargs):
  mean, std = (0.5,) * 3, (0.25,) * 3
  return streaming.StreamSource(
      builder, split, train_fn=lambda im, s: streaming.inception_crop(im, s, 8, mean, std),
      eval_fn=lambda im: streaming.center_crop(im, 8, mean, std), input_shape=(8, 8, 3),
      process_index=p, process_count=count, **{"shuffle_buffer": 8, **kwargs})


def test_streaming_shards_over_two_processes(on_disk):
  sources = [stream(on_disk, "train", p, 2) for p in (0, 1)]
  assert sources[0].shard_sizes == [12, 11] and sources[0].num_examples == 23
  # One epoch: every process takes steps_per_epoch = 11 // 2 batches of its own shard.
  epochs = [np.concatenate([b["labels"] for b in take(s.train_batches(4, seed=0), 5)])
            for s in sources]
  assert all(len(set(e)) == 10 for e in epochs) and not set(epochs[0]) & set(epochs[1])
  resumed = take(sources[1].train_batches(4, seed=0, start_step=3), 4)
  assert_batches_equal(resumed, take(sources[1].train_batches(4, seed=0), 7)[3:])
  # Evaluation: each example once over both processes, the same number of batches on each.
  evals = [list(s.eval_batches(10)) for s in sources]
  assert len(evals[0]) == len(evals[1]) == 3
  seen = np.concatenate([b["labels"][b["mask"] == 1] for e in evals for b in e])
  assert sorted(seen) == list(range(23))
  single = list(stream(on_disk, "validation", 0, 1).eval_batches(4))
  assert [b["mask"].sum() for b in single] == [4, 3]


def masked_labels(batches):
  return np.concatenate([b["labels"][b["mask"] == 1] for b in batches])


def test_streaming_subset_over_two_processes(long_files):
  subset = pipeline.seeded_subset(7, pipeline.STREAM_SUBSET, 40, 15)
  sources = [stream(long_files, "train", p, 2, subset=subset) for p in (0, 1)]
  assert sources[0].shard_sizes == [8, 7] and sources[0].num_examples == 15
  # Each process reads its share of the subset, in file order (label = index in the split).
  evals = [list(s.eval_batches(8)) for s in sources]
  assert len(evals[0]) == len(evals[1]) == 2
  seen = [masked_labels(e) for e in evals]
  np.testing.assert_array_equal(np.concatenate(seen), subset)
  # One epoch: steps_per_epoch = 7 // 2 batches of 2 distinct examples of the process's share.
  for source, own in zip(sources, seen):
    epoch = np.concatenate([b["labels"] for b in take(source.train_batches(4, seed=1), 3)])
    assert len(set(epoch)) == 6 and set(epoch) <= set(own)
  # The cache changes nothing: an uncached reader resumed in epoch 1 gives the cached run's batches.
  uncached = stream(long_files, "train", 1, 2, subset=subset, cache_bytes=0)
  assert sources[1].cached and not uncached.cached
  # A share larger than the shuffle buffer: an epoch stops before the end, so no cache.
  assert not stream(long_files, "train", 1, 2, subset=subset, shuffle_buffer=2).cached
  assert_batches_equal(take(sources[1].train_batches(4, seed=1), 8)[4:],
                       take(uncached.train_batches(4, seed=1, start_step=4), 4))
  counts = streaming.class_counts(long_files, "train", subset, 40)
  assert counts == np.isin(np.arange(40), subset).astype(int).tolist()
  with pytest.raises(ValueError, match="sorted, distinct"):
    stream(long_files, "train", 0, 1, subset=[3, 3, 5])


@pytest.mark.parametrize("subset", [False, True], ids=["split", "subset"])
def test_streaming_batches_depend_on_shards_not_processes(long_files, subset):
  """4 shards (the trainer: one per device) read by 1 process, or by 2 processes reading 2
  each: the same global batches across epochs and after a resumption, every example evaluated
  once, the same first examples."""
  kwargs = {"subset": pipeline.seeded_subset(7, pipeline.STREAM_SUBSET, 40, 24)} if subset else {}
  one = stream(long_files, "train", 0, 1, num_shards=4, **kwargs)
  two = [stream(long_files, "train", p, 2, num_shards=4, **kwargs) for p in (0, 1)]
  assert one.steps_per_epoch(8) == two[0].steps_per_epoch(8) == (3 if subset else 5)
  for start, count in ((0, 6), (4, 2)):
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a}
              for a, b in zip(*[take(s.train_batches(8, seed=3, start_step=start), count)
                                for s in two])]
    assert_batches_equal(take(one.train_batches(8, seed=3, start_step=start), count), joined)
  seen = np.concatenate([masked_labels(s.eval_batches(6)) for s in two])
  np.testing.assert_array_equal(np.sort(seen), np.sort(masked_labels(one.eval_batches(6))))
  assert len(seen) == (24 if subset else 40) == len(set(seen))
  np.testing.assert_array_equal(one.first_examples(30)["labels"], masked_labels(
      one.eval_batches(6))[:30])
  with pytest.raises(ValueError, match="multiple of the process count"):
    stream(long_files, "train", 0, 2, num_shards=3)


def mock_examples(source):
  """(label, centre-crop bytes) of the source's examples, in reading order."""
  return [(int(label), x.tobytes()) for b in source.eval_batches(8)
          for label, x, m in zip(b["labels"], b["inputs"], b["mask"]) if m]


@pytest.mark.usefixtures("mock")
def test_streaming_subset_is_drawn_by_the_seed():
  full = mock_examples(data.get_datasets("imagenet2012", seed=0, image_size=8).train)
  kwargs = dict(image_size=8, num_train_examples=6, train_eval_examples=4)
  ds, again, other = (data.get_datasets("imagenet2012", seed=s, **kwargs) for s in (0, 0, 1))
  subset = mock_examples(ds.train)
  assert len(set(subset)) == 6 and set(subset) <= set(full) and subset != full[:6]
  assert mock_examples(again.train) == subset and mock_examples(other.train) != subset
  train_eval = mock_examples(ds.train_eval)
  assert len(set(train_eval)) == 4 and set(train_eval) <= set(subset)
  assert (ds.num_train, ds.info["num_train_full"]) == (6, NUM_MOCK)
  assert ds.info["train_subset"] == "6 examples drawn by the seed"
  with pytest.raises(ValueError, match="num_train_examples=17 exceeds the 16"):
    data.get_datasets("food101", seed=0, num_train_examples=17)


@pytest.mark.usefixtures("mock")
def test_streaming_subset_class_counts_and_resume():
  ds = data.get_datasets("imagenet2012", seed=3, image_size=16, num_train_examples=12)
  assert ds.train.steps_per_epoch(4) == 3
  run = take(ds.train.train_batches(4, seed=2), 7)           # epochs 0, 1 and a step of 2
  assert_batches_equal(run[2:], take(ds.train.train_batches(4, seed=2, start_step=2), 5))
  assert_batches_equal(run[4:], take(ds.train.train_batches(4, seed=2, start_step=4), 3))
  counts = ds.info["class_counts_train"]
  epoch = np.concatenate([b["labels"] for b in run[:3]])
  assert sum(counts) == 12 and counts == np.bincount(epoch, minlength=1000).tolist()


def test_streaming_eval_with_an_empty_shard(tmp_path):
  """Fewer examples than processes: the process with nothing to read sends only padding (it
  used to fail to read its empty split while the others waited), and every example counts
  once."""
  b = write_tiny(tmp_path / "tiny" / "1.0.0", {"train": (12, 2), "validation": (3, 1)})
  masks = [sum(float(x["mask"].sum()) for x in stream(b, "validation", p, 4).eval_batches(4))
           for p in range(4)]
  assert masks == [1.0, 1.0, 1.0, 0.0]
  one = [list(stream(b, "train", p, 2, subset=np.array([5])).eval_batches(2)) for p in (0, 1)]
  assert [len(x) for x in one] == [1, 1] and one[0][0]["labels"].tolist() == [5]
  assert float(one[1][0]["mask"].sum()) == 0.0
