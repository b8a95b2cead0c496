"""Behaviour does not change unnoticed: three tiny runs write exactly the metrics.jsonl kept in
tests/golden/ (SGD on the default MLP; CSAM with the Kronecker-factored metric and two measures
on their schedule; SAM with BatchNorm statistics from every pass, label smoothing and a CIFAR
ResNet under mock data). A change that is meant to change numbers regenerates them with
``UPDATE_GOLDEN=1 python -m pytest tests/test_golden_metrics.py`` and says why in its commit.

The files were first written by the trainer before its restructuring into plan / objective /
family and checked byte-identical after it."""

import os
import pathlib

import ml_collections
import pytest

from configs import default
from nonuniform_jax import train

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"


def _small(**overrides):
  c = default.get_config()
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 12, 4, 4, 4
  c.train_eval_examples = 256
  c.progress = False
  c.model.widths = (32,)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _config(name):
  if name == "default":
    return _small()
  if name == "csam_kfac":
    return _small(**{"optimizer.name": "csam", "csam.metric": "kfac", "kfac.stats_every": 3,
                     "kfac.inverse_every": 3, "measures.names": ("lambda_max", "gradient_noise"),
                     "measures.every_steps": 8, "measures.num_examples": 64,
                     "measures.batch_size": 32, "measures.settings.lambda_max.num_iters": 5})
  c = _small(**{"optimizer.name": "sam", "sam.bn_policy": "every_pass", "dataset": "cifar10",
                "batch_size": 16, "train_eval_examples": 32, "eval_batch_size": 32,
                "label_smoothing": 0.1})
  c.model = ml_collections.ConfigDict({"name": "resnet20", "depth": 8, "width": 4})
  return c


@pytest.mark.parametrize("name", ["default", "csam_kfac", "sam_bn_every_pass"])
def test_metrics_are_the_golden_ones(name, tmp_path):
  config = _config(name)
  if config.dataset == "cifar10":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=64):
      train.train_and_evaluate(config, str(tmp_path))
  else:
    train.train_and_evaluate(config, str(tmp_path))
  got = (tmp_path / "metrics.jsonl").read_text()
  if os.environ.get("UPDATE_GOLDEN") == "1":
    (GOLDEN / f"{name}.jsonl").write_text(got)
  assert got == (GOLDEN / f"{name}.jsonl").read_text()
