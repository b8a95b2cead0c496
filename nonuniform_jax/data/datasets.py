"""Datasets by name: validation of the settings, assembly of the three splits, the run summary.

Every dataset exposes three sources with the methods of ``pipeline.ArraySource``:
``train`` (``train_batches``), ``train_eval`` (a fixed training subset without augmentation,
``eval_batches``) and ``test`` (``eval_batches``). The offline datasets and MNIST,
Fashion-MNIST and CIFAR are held in memory and share ``ArraySource``; ImageNet and Food-101
stream through tf.data (``streaming.StreamSource``) with the same guarantees. TensorFlow is
imported only when a TFDS dataset is loaded.
"""


import numpy as np

from nonuniform_jax import checks
from nonuniform_jax.data import label_noise as label_noise_lib
from nonuniform_jax.data import offline, pipeline, preprocessing
from nonuniform_jax.data.sources import Datasets

OFFLINE = ("mnist1d", "digits")
TFDS_IN_MEMORY = ("mnist", "fashion_mnist", "cifar10", "cifar100")
TFDS_STREAMING = ("imagenet2012", "food101")
DATASETS = OFFLINE + TFDS_IN_MEMORY + TFDS_STREAMING
AUGMENTED = ("cifar10", "cifar100") + TFDS_STREAMING   # datasets with a standard augmentation
# What is known of a dataset before it is loaded: name -> (number of classes, one example's shape
# after preprocessing), None standing for (image_size, image_size, 3). Checked against the
# loaded datasets by the tests.
SHAPES = {"mnist1d": (10, (40,)), "digits": (10, (8, 8, 1)), "mnist": (10, (28, 28, 1)),
          "fashion_mnist": (10, (28, 28, 1)), "cifar10": (10, (32, 32, 3)),
          "cifar100": (100, (32, 32, 3)), "imagenet2012": (1000, None), "food101": (101, None)}


def describe(name: str, image_size: int) -> tuple[int, tuple]:
  """(number of classes, one example's shape after preprocessing) of a dataset, without loading
  it or importing TensorFlow: what a model can be built from before the data are read."""
  checks.choice("dataset", name, DATASETS)
  num_classes, shape = SHAPES[name]
  if shape is None:
    checks.integer("image_size", image_size, 1)
  return num_classes, (image_size, image_size, 3) if shape is None else shape


def check_args(name: str, *, batch_size: int, eval_batch_size: int, num_train_examples: int,
               label_noise: str, label_noise_rate: float, process_count: int) -> None:
  """Raises a one-line ValueError for a bad dataset setting; loads nothing, imports no TF."""
  checks.choice("dataset", name, DATASETS)
  checks.integer("process_count", process_count, 1)
  for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if value <= 0 or value % process_count:
      raise ValueError(f"{key}={value} must be a positive multiple of the process count "
                       f"{process_count}")
  if num_train_examples < 0:
    raise ValueError(f"num_train_examples={num_train_examples} must be >= 0 (0: all)")
  checks.choice("label_noise", label_noise, label_noise_lib.NOISE_KINDS)
  checks.in_range("label_noise_rate", label_noise_rate, 0, 1)
  if label_noise == "none" and label_noise_rate:
    raise ValueError(f"label_noise_rate={label_noise_rate} needs label_noise 'symmetric' or "
                     "'asymmetric', not 'none'")
  if label_noise == "asymmetric" and name not in ("cifar10", "cifar100"):
    raise ValueError(f"asymmetric label noise is defined for ['cifar10', 'cifar100'], not {name!r}")
  if label_noise != "none" and name in TFDS_STREAMING:
    raise ValueError(f"label noise needs an in-memory dataset, one of "
                     f"{list(OFFLINE + TFDS_IN_MEMORY)}, not {name!r}")


def get_datasets(name: str, *, seed: int, batch_size: int | None = None, data_dir: str = "",
                 augment: bool = True, image_size: int = 224, num_train_examples: int = 0,
                 train_eval_examples: int = 4096, label_noise: str = "none",
                 label_noise_rate: float = 0.0, process_index: int = 0,
                 process_count: int = 1) -> Datasets:
  """Loads dataset ``name`` (one of ``DATASETS``) for this process.

  Args:
    seed: the data seed (the trainer's ``data_seed``, else its ``seed``); fixes the training
      subset, the label noise, the train_eval subset, and (through ``train_batches``) the order
      and augmentation of the training batches.
    batch_size: the global training batch, if given checked against the training-set size.
    data_dir: TFDS data directory ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets).
    augment: the dataset's standard training augmentation (CIFAR crop + flip, ImageNet and
      Food-101 Inception crop + flip); no effect on datasets without one.
    image_size: side of the ImageNet / Food-101 crops.
    num_train_examples: > 0 trains on a fixed subset of this many examples of the training
      split, drawn by the seed (the same on every process); its class counts are reported.
    train_eval_examples: size of the training subset evaluated without augmentation, drawn by
      the seed from the training set (0 or >= the training set: all of it; streaming datasets
      without ``num_train_examples``: the first examples of the split, which TFDS stores
      shuffled).
    label_noise, label_noise_rate: see ``label_noise.py``.
    process_index, process_count: this process among the data-parallel processes.
  """
  # Batch sizes are checked where given (the evaluation batch is an argument of eval_batches).
  check_args(name, batch_size=batch_size or process_count, eval_batch_size=process_count,
             num_train_examples=num_train_examples, label_noise=label_noise,
             label_noise_rate=label_noise_rate, process_count=process_count)
  checks.in_range("process_index", process_index, 0, process_count, high_open=True)
  if train_eval_examples < 0:
    raise ValueError(f"train_eval_examples={train_eval_examples} must be >= 0 (0: all)")
  if name in TFDS_STREAMING:
    from nonuniform_jax.data import streaming  # pylint: disable=import-outside-toplevel
    ds = streaming.get_datasets(
        name, seed=seed, data_dir=data_dir, augment=augment, image_size=image_size,
        num_train_examples=num_train_examples, train_eval_examples=train_eval_examples,
        process_index=process_index, process_count=process_count)
  else:
    ds = _in_memory(name, seed=seed, data_dir=data_dir, augment=augment,
                    num_train_examples=num_train_examples,
                    train_eval_examples=train_eval_examples, label_noise=label_noise,
                    label_noise_rate=label_noise_rate, process_index=process_index,
                    process_count=process_count)
  if batch_size and batch_size > ds.num_train:
    raise ValueError(f"batch_size={batch_size} exceeds the {ds.num_train} training examples of "
                     f"{name!r}")
  return ds


def _in_memory(name, *, seed, data_dir, augment, num_train_examples, train_eval_examples,
               label_noise, label_noise_rate, process_index, process_count) -> Datasets:
  if name in OFFLINE:
    splits = offline.LOADERS[name]()
    preprocess = preprocessing.as_float32
  else:
    from nonuniform_jax.data import tfds_data  # pylint: disable=import-outside-toplevel
    splits = tfds_data.load_arrays(name, data_dir)
    preprocess = preprocessing.Normalize(*preprocessing.NORMALIZATION[name])
  augment_fn = preprocessing.random_crop_flip if augment and name in AUGMENTED else None

  full = len(splits.train_labels)
  if num_train_examples > full:
    raise ValueError(f"num_train_examples={num_train_examples} exceeds the {full} training "
                     f"examples of {name!r}")
  indices = pipeline.seeded_subset(seed, pipeline.STREAM_SUBSET, full, num_train_examples)
  train_inputs = splits.train_inputs[indices] if num_train_examples else splits.train_inputs
  clean = splits.train_labels[indices]
  noise = label_noise_lib.apply(clean, kind=label_noise, rate=label_noise_rate,
                                num_classes=splits.num_classes, seed=seed, dataset=name)
  n = len(clean)
  subset = pipeline.seeded_subset(seed, pipeline.STREAM_TRAIN_EVAL, n, train_eval_examples)
  # With label noise, evaluation on the training side also knows which labels were flipped and
  # what they were: accuracy on the noisy part against the given and against the true labels.
  extras = ({"noisy": noise.noisy[subset].astype(np.float32), "clean_labels": clean[subset]}
            if label_noise != "none" else {})
  where = dict(process_index=process_index, process_count=process_count)
  train = pipeline.ArraySource(train_inputs, noise.labels, preprocess=preprocess,
                               augment=augment_fn, **where)
  train_eval = pipeline.ArraySource(train_inputs[subset], noise.labels[subset],
                                    preprocess=preprocess, extras=extras, **where)
  test = pipeline.ArraySource(splits.test_inputs, splits.test_labels, preprocess=preprocess,
                              **where)
  input_shape = tuple(int(d) for d in splits.train_inputs.shape[1:])
  info = {
      "dataset": name,
      "source": "offline" if name in OFFLINE else "tfds (in memory)",
      "num_classes": splits.num_classes,
      "input_shape": list(input_shape),
      "num_train": n,
      "num_train_full": full,
      "train_subset": f"{n} examples drawn by the seed" if num_train_examples else "all",
      "num_train_eval": len(subset),
      "num_test": len(splits.test_labels),
      "class_counts_train": np.bincount(clean, minlength=splits.num_classes).tolist(),
      "normalization": splits.normalization,
      "augmentation": _describe_augmentation(name, augment_fn is not None),
      "label_noise": noise.summary,
      "process_index": process_index,
      "process_count": process_count,
  }
  if label_noise != "none":
    info["class_counts_train_noisy"] = np.bincount(noise.labels,
                                                   minlength=splits.num_classes).tolist()
  return Datasets(name=name, num_classes=splits.num_classes, input_shape=input_shape,
                  num_train=n, info=info, train=train, train_eval=train_eval, test=test,
                  noise=noise if label_noise != "none" else None, clean_train_labels=clean,
                  train_indices=indices)


def _describe_augmentation(name: str, on: bool) -> str:
  if not on:
    return "none"
  if name in ("cifar10", "cifar100"):
    return "random crop 32 with 4-pixel zero padding, horizontal flip"
  return "Inception random-resized crop, horizontal flip"


def write_label_noise(ds: Datasets, workdir: str) -> str | None:
  """Saves the noisy labels and flipped indices as ``workdir/label_noise.npz``; None without noise."""
  if ds.noise is None:
    return None
  return label_noise_lib.write(ds.noise, ds.clean_train_labels, ds.train_indices, workdir)

