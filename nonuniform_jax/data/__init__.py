"""Input pipelines: offline datasets (MNIST-1D, digits), TFDS datasets, label noise, batching.

    ds = data.get_datasets('cifar10', seed=0, label_noise='symmetric', label_noise_rate=0.4)
    for batch in ds.train.train_batches(128, seed=0, start_step=0): ...   # infinite, resumable
    for batch in ds.test.eval_batches(1000): ...                          # padded, with 'mask'

Importing this package and loading the offline datasets does not import TensorFlow.
"""

from nonuniform_jax.data.datasets import (DATASETS, Datasets, check_args, describe,
                                          get_datasets, write_label_noise)
from nonuniform_jax.data.pipeline import ArraySource, prefetch_to_device
