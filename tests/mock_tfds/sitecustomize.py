"""Put on PYTHONPATH by the tests that run a documented command in a subprocess (a launch
script) on a TFDS config: every TFDS dataset is then ``tfds.testing.mock_data`` (no download,
no prepared data), for the whole process."""

import os

if os.environ.get("NONUNIFORM_JAX_MOCK_TFDS") == "1":
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _MOCK = tfds.testing.mock_data(num_examples=64)   # kept: collecting it would end the mock
  _MOCK.__enter__()
