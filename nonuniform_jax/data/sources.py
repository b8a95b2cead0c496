"""What a loaded dataset is: the three sources a run reads and the facts its summary records.

Shared by the in-memory datasets (``datasets``) and the streaming ones (``streaming``).
"""

import dataclasses

import numpy as np

from nonuniform_jax.data import label_noise as label_noise_lib


@dataclasses.dataclass
class Datasets:
  """A dataset ready for training: three sources plus what the run summary records.

  ``input_shape`` is one example's shape after preprocessing; ``num_train`` the number of
  training examples used (all processes). ``noise`` holds the noisy training labels (None
  without label noise); ``clean_train_labels`` and ``train_indices`` (positions in the full
  training split) go with it into ``write_label_noise``.
  """
  name: str
  num_classes: int
  input_shape: tuple
  num_train: int
  info: dict
  train: object
  train_eval: object
  test: object
  noise: label_noise_lib.LabelNoise | None = None
  clean_train_labels: np.ndarray | None = None
  train_indices: np.ndarray | None = None
