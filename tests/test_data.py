"""The input pipeline without TensorFlow: offline datasets, batching, resume, sharding, label noise."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from nonuniform_jax import data
from nonuniform_jax.data import label_noise, pipeline, preprocessing


@pytest.fixture(scope="module")
def mnist1d():
  return data.get_datasets("mnist1d", seed=0)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_offline_datasets_shapes(mnist1d):
  assert (mnist1d.num_classes, mnist1d.input_shape, mnist1d.num_train) == (10, (40,), 4000)
  batch = next(mnist1d.train.train_batches(128, seed=0))
  assert batch["inputs"].shape == (128, 40) and batch["inputs"].dtype == np.float32
  assert batch["labels"].shape == (128,) and batch["labels"].dtype == np.int32
  digits = data.get_datasets("digits", seed=0)
  assert (digits.input_shape, digits.num_train, digits.test.num_examples) == ((8, 8, 1), 1437, 360)
  for ds in (mnist1d, digits):   # what a model is built from before the data are read
    assert data.describe(ds.name, 0) == (ds.num_classes, ds.input_shape)
  with pytest.raises(ValueError, match="image_size must be an integer >= 1, got 0"):
    data.describe("imagenet2012", 0)
  x = next(digits.test.eval_batches(360))["inputs"]
  assert x.dtype == np.float32 and abs(float(x.mean())) < 0.1      # normalised
  # The train/test split of digits does not depend on the run seed; subsets do.
  other = data.get_datasets("digits", seed=5)
  np.testing.assert_array_equal(other.test.inputs, digits.test.inputs)
  assert sum(digits.info["class_counts_train"]) == 1437


def test_train_order_is_a_function_of_seed_and_step(mnist1d):
  a = take(mnist1d.train.train_batches(128, seed=3), 70)    # 31 steps per epoch: crosses 2 epochs
  assert_batches_equal(a, take(mnist1d.train.train_batches(128, seed=3), 70))
  assert not np.array_equal(a[0]["labels"], next(mnist1d.train.train_batches(128, seed=4))["labels"])
  # Resume at step 40 (inside epoch 1) sees exactly the batches of the uninterrupted run.
  assert_batches_equal(a[40:], take(mnist1d.train.train_batches(128, seed=3, start_step=40), 30))
  # One epoch visits 31 * 128 distinct examples; the next epoch uses another order.
  ids = lambda b: {x.tobytes() for x in b["inputs"]}
  epoch0 = set().union(*(ids(b) for b in a[:31]))
  assert len(epoch0) == 31 * 128
  assert not np.array_equal(a[0]["inputs"], a[31]["inputs"])


def test_eval_counts_every_example_once(mnist1d):
  batches = list(mnist1d.test.eval_batches(300))           # 1000 = 3 * 300 + 100
  assert len(batches) == 4
  assert all(b["inputs"].shape == (300, 40) for b in batches)
  np.testing.assert_array_equal(batches[-1]["mask"], np.arange(300) < 100)
  real = np.concatenate([b["inputs"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(real, mnist1d.test.inputs)
  labels = np.concatenate([b["labels"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(labels, mnist1d.test.labels)


def cifar_like_source(process_index=0, process_count=1, n=103):
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  return pipeline.ArraySource(images, np.arange(n) % 10,
                              preprocess=preprocessing.Normalize(
                                  *preprocessing.NORMALIZATION["cifar10"]),
                              augment=preprocessing.random_crop_flip,
                              extras={"noisy": np.ones(n, np.float32)},
                              process_index=process_index, process_count=process_count)


def test_two_processes_split_the_global_batch():
  one = cifar_like_source()
  two = [cifar_like_source(p, 2) for p in range(2)]
  # Training (with augmentation): the two local halves are the one-process batch.
  full = take(one.train_batches(16, seed=1, start_step=5), 9)
  halves = [take(s.train_batches(16, seed=1, start_step=5), 9) for s in two]
  for f, h0, h1 in zip(full, *halves):
    for k in f:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), f[k])
  # Evaluation: same number of batches on both, each example exactly once over the union.
  evals = [list(s.eval_batches(20)) for s in two]
  assert len(evals[0]) == len(evals[1]) == 6                   # ceil(103 / 20)
  seen = np.concatenate([b["labels"][b["mask"] == 1] for e in evals for b in e])
  inputs = np.concatenate([b["inputs"][b["mask"] == 1] for e in evals for b in e])
  assert len(seen) == 103 and np.all(np.array([b["inputs"].shape[0] for e in evals for b in e]) == 10)
  expected = one.preprocess(one.inputs)
  order = np.lexsort(inputs.reshape(103, -1).T)
  np.testing.assert_array_equal(inputs[order], expected[np.lexsort(expected.reshape(103, -1).T)])


def test_random_crop_flip_matches_a_loop():
  images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  out = preprocessing.random_crop_flip(images[2:5], np.random.default_rng(7), slice(2, 5), 6)
  gen = np.random.default_rng(7)
  oy, ox, flip = gen.integers(0, 9, 6), gen.integers(0, 9, 6), gen.random(6) < 0.5
  for n in range(2, 5):
    ref = np.pad(images[n], ((4, 4), (4, 4), (0, 0)))[oy[n]:oy[n] + 32, ox[n]:ox[n] + 32]
    np.testing.assert_array_equal(out[n - 2], ref[:, ::-1] if flip[n] else ref)
  assert out.dtype == np.uint8


def test_symmetric_noise():
  labels = np.random.default_rng(0).integers(0, 10, 5000)
  a = label_noise.apply(labels, kind="symmetric", rate=0.4, num_classes=10, seed=1, dataset="x")
  b = label_noise.apply(labels, kind="symmetric", rate=0.4, num_classes=10, seed=1, dataset="x")
  c = label_noise.apply(labels, kind="symmetric", rate=0.4, num_classes=10, seed=2, dataset="x")
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.labels, c.labels)
  np.testing.assert_array_equal(a.noisy, a.labels != labels)
  assert a.summary["num_selected"] == 2000
  # The draw may equal the true label: about 0.4 * 9/10 of the labels change.
  assert 0.33 < a.noisy.mean() < 0.39 and a.summary["num_flipped"] == a.noisy.sum()


def test_asymmetric_noise_cifar10():
  labels = np.repeat(np.arange(10), 100)
  n = label_noise.apply(labels, kind="asymmetric", rate=0.3, num_classes=10, seed=0,
                        dataset="cifar10")
  pairs = {(int(t), int(f)) for t, f in zip(labels[n.noisy], n.labels[n.noisy])}
  assert pairs == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}     # truck→automobile, bird→airplane...
  for c in (9, 2, 4, 3, 5):
    assert n.noisy[labels == c].sum() == 30
  assert not n.noisy[np.isin(labels, (0, 1, 6, 7, 8))].any()


def test_cifar100_superclasses():
  # The widely used fine -> coarse table, written independently of the name table in the module.
  reference = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10,
               7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14,
               17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
               2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15,
               6, 0, 17, 8, 14, 13]
  np.testing.assert_array_equal(label_noise.CIFAR100_COARSE, reference)
  targets = label_noise.asymmetric_targets("cifar100")
  assert np.all(targets != np.arange(100))
  np.testing.assert_array_equal(label_noise.CIFAR100_COARSE[targets], label_noise.CIFAR100_COARSE)
  # Five steps around a superclass come back: each superclass is one 5-cycle.
  cycled = np.arange(100)
  for _ in range(5):
    cycled = targets[cycled]
  np.testing.assert_array_equal(cycled, np.arange(100))
  assert targets[label_noise.CIFAR100_FINE_NAMES.index("beaver")] == \
      label_noise.CIFAR100_FINE_NAMES.index("dolphin")


def test_label_noise_dataset_and_file(tmp_path):
  ds = data.get_datasets("digits", seed=2, num_train_examples=1000, train_eval_examples=300,
                         label_noise="symmetric", label_noise_rate=0.5)
  again = data.get_datasets("digits", seed=2, num_train_examples=1000, train_eval_examples=300,
                            label_noise="symmetric", label_noise_rate=0.5)
  np.testing.assert_array_equal(ds.train.labels, again.train.labels)
  assert ds.num_train == 1000 and sum(ds.info["class_counts_train"]) == 1000
  batches = list(ds.train_eval.eval_batches(128))
  noisy = np.concatenate([b["noisy"][b["mask"] == 1] for b in batches])
  assert len(noisy) == 300 and 0 < noisy.sum() < 300
  # Test labels stay clean and carry no 'noisy'.
  clean = data.get_datasets("digits", seed=2)
  np.testing.assert_array_equal(ds.test.labels, clean.test.labels)
  assert "noisy" not in next(ds.test.eval_batches(100))
  saved = np.load(data.write_label_noise(ds, str(tmp_path)))
  np.testing.assert_array_equal(saved["noisy_labels"], ds.train.labels)
  flipped = saved["flipped_indices"]
  np.testing.assert_array_equal(np.flatnonzero(saved["noisy_labels"] != saved["clean_labels"]),
                                flipped)
  full = data.get_datasets("digits", seed=0)
  np.testing.assert_array_equal(full.train.labels[saved["train_indices"]], saved["clean_labels"])
  assert data.write_label_noise(full, str(tmp_path / "none")) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "cifar11"}, "unknown dataset 'cifar11'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": 129, "process_count": 2}, "batch_size=129"),
    ({"eval_batch_size": -1}, "eval_batch_size=-1"),
    ({"num_train_examples": -5}, "num_train_examples=-5"),
    ({"label_noise": "pairflip"}, "unknown label_noise 'pairflip'"),
    ({"label_noise": "symmetric", "label_noise_rate": 1.5},
     "label_noise_rate must be in \\[0, 1\\], got 1.5"),
    ({"label_noise_rate": 0.2}, "label_noise_rate=0.2"),
    ({"label_noise": "asymmetric", "label_noise_rate": 0.2}, "asymmetric label noise"),
    ({"name": "imagenet2012", "label_noise": "symmetric", "label_noise_rate": 0.2},
     "in-memory dataset"),
])
def test_bad_arguments(kwargs, message):
  args = dict(name="mnist1d", batch_size=128, eval_batch_size=1000, num_train_examples=0,
              label_noise="none", label_noise_rate=0.0, process_count=1)
  args.update(kwargs)
  name = args.pop("name")
  with pytest.raises(ValueError, match=message):
    data.check_args(name, **args)


def test_bad_sizes_against_the_data():
  with pytest.raises(ValueError, match="num_train_examples=5000 exceeds the 1437"):
    data.get_datasets("digits", seed=0, num_train_examples=5000)
  with pytest.raises(ValueError, match="batch_size=2000 exceeds the 1437"):
    data.get_datasets("digits", seed=0, batch_size=2000)


def test_prefetch_to_device(mnist1d):
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  host = list(mnist1d.test.eval_batches(200))
  on_device = list(data.prefetch_to_device(mnist1d.test.eval_batches(200), 2, sharding))
  assert len(on_device) == len(host)
  for h, d in zip(host, on_device):
    assert isinstance(d["inputs"], jax.Array) and d["inputs"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(d["inputs"]), h["inputs"])

  def failing():
    yield host[0]
    raise RuntimeError("reader failed")
  with pytest.raises(RuntimeError, match="reader failed"):
    list(data.prefetch_to_device(failing(), 2, sharding))
  # Closing an infinite prefetcher early stops its thread.
  it = data.prefetch_to_device(mnist1d.train.train_batches(128, seed=0), 3, sharding)
  next(it)
  it.close()


def test_offline_loading_does_not_import_tensorflow():
  code = ("import sys; from nonuniform_jax import data; data.get_datasets('mnist1d', seed=0); "
          "data.get_datasets('digits', seed=0); print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_normalization_constants_are_the_fields():
  """The per-channel constants, written out from their sources (torchvision and the common
  CIFAR/MNIST statistics of the training sets), so a typo in the table cannot pass."""
  from nonuniform_jax.data.preprocessing import NORMALIZATION  # pylint: disable=g-import-not-at-top
  imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert NORMALIZATION == {
      "mnist": ((0.1307,), (0.3081,)),
      "fashion_mnist": ((0.2860,), (0.3530,)),
      "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
      "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
      "imagenet2012": imagenet,
      "food101": imagenet,
  }
