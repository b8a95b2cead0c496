"""TFDS datasets under tfds.testing.mock_data, and the streaming source on real TFDS files.

The mock ignores split slicing (every process would read the whole split), so the per-process
sharding of the streaming source is checked on a small dataset written to disk as real TFDS
files (JPEG images of random sizes in 3 tfrecord shards).
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nonuniform_jax import data
from nonuniform_jax.data import label_noise, preprocessing, streaming, tfds_data

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


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
  """A prepared TFDS dataset: 23 training / 7 test JPEGs of random sizes; label = index."""
  root = tmp_path_factory.mktemp("tfds") / "tiny" / "1.0.0"
  root.mkdir(parents=True)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=23)})
  gen = np.random.default_rng(0)
  for split, n, shards in (("train", 23, 3), ("validation", 7, 1)):
    for s, ids in enumerate(np.array_split(np.arange(n), shards)):
      with tf.io.TFRecordWriter(str(root / f"tiny-{split}.tfrecord-{s:05d}-of-{shards:05d}")) as w:
        for i in ids:
          size = tuple(gen.integers(6, 20, 2)) + (3,)
          w.write(features.serialize_example({"image": gen.integers(0, 256, size, np.uint8),
                                              "label": int(i)}))
  tfds.folder_dataset.write_metadata(data_dir=str(root), features=features, split_infos=None)
  return tfds.builder_from_directory(str(root))


def stream(builder, split, p, count):
  mean, std = (0.5,) * 3, (0.25,) * 3
  return streaming.StreamSource(
      builder, split, train_fn=lambda im, s: streaming.inception_crop(im, s, 8, mean, std),
      eval_fn=lambda im: streaming.center_crop(im, 8, mean, std), input_shape=(8, 8, 3),
      process_index=p, process_count=count, shuffle_buffer=8)


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
