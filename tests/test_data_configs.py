"""The dataset configs: they load from any directory, in every variant, and pass the trainer's checks."""

import pathlib
import runpy
import subprocess
import sys

import numpy as np
import pytest

from nonuniform_jax import plan

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# file -> (variants to load, dataset, model of the full config)
DATASET_CONFIGS = {
    "mnist_mlp": (("", "laptop"), "mnist", "paper_mlp"),
    "cifar10_resnet20": (("", "laptop"), "cifar10", "resnet20"),
    "cifar10_resnet56": (("", "laptop"), "cifar10", "resnet56"),
    "cifar10_wrn28_6": (("", "laptop"), "cifar10", "wrn28_6"),
    "cifar100_wrn28_6": (("", "laptop"), "cifar100", "wrn28_6"),
    "cifar100_wrn28_10": (("", "laptop"), "cifar100", "wrn28_10"),
    "imagenet_resnet50": (("", "laptop"), "imagenet2012", "resnet50"),
    "food101_resnet50": (("", "laptop"), "food101", "resnet50"),
    "food101_vit": (("", "laptop"), "food101", "vit_small"),
    "cifar10_label_noise": (("", "symmetric,0.8", "asymmetric,0.4,laptop"), "cifar10", "resnet32"),
    "cifar10_pyramidnet110": (("", "laptop"), "cifar10", "pyramidnet110"),
    "cifar10_densenet100": (("", "laptop"), "cifar10", "densenet100"),
}


def load(name, variant, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)                     # loading must not depend on the cwd
  path = CONFIGS / f"{name}.py"
  return runpy.run_path(str(path))["get_config"](*([variant] if variant else []))


@pytest.mark.parametrize("name", sorted(DATASET_CONFIGS))
def test_config_loads_and_passes_checks(name, monkeypatch, tmp_path):
  variants, dataset, model = DATASET_CONFIGS[name]
  for variant in variants:
    config = load(name, variant, monkeypatch, tmp_path)
    assert config.dataset == dataset
    if not variant:
      assert config.model.name == model
    if "laptop" in variant:
      assert 0 < config.num_steps <= 200
      # A seeded subset of ImageNet costs passes over its 140 GB: its laptop run streams.
      assert (config.num_train_examples > 0) == (dataset != "imagenet2012")
    plan.read(config)
    doc = (CONFIGS / f"{name}.py").read_text().split('"""')[1]
    assert f"--config configs/{name}.py" in doc and "laptop" in doc


def test_paper_cifar_setting(monkeypatch, tmp_path):
  c = load("cifar10_wrn28_6", "", monkeypatch, tmp_path)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum,
          c.optimizer.weight_decay, c.schedule.name, c.batch_size, c.num_epochs,
          c.label_smoothing, c.augment) == ("sgd", 0.1, 0.9, 5e-4, "cosine", 128, 200.0, 0.1, True)
  noisy = load("cifar10_label_noise", "asymmetric,0.4", monkeypatch, tmp_path)
  assert (noisy.label_noise.kind, noisy.label_noise.rate) == ("asymmetric", 0.4)
  noisy100 = load("cifar10_label_noise", "asymmetric,0.2,cifar100,laptop", monkeypatch, tmp_path)
  assert (noisy100.dataset, noisy100.label_noise.kind, noisy100.label_noise.rate) == (
      "cifar100", "asymmetric", 0.2)
  plan.read(noisy100)
  with pytest.raises(ValueError, match="unknown config variant"):
    load("cifar10_resnet20", "laptp", monkeypatch, tmp_path)
  with pytest.raises(ValueError, match="more than one"):
    load("cifar10_label_noise", "symmetric,0.2,0.4", monkeypatch, tmp_path)


def test_command_line_config_string(tmp_path):  # (the docstring commands themselves run in
  # tests/test_documented_commands.py)
  """The ``file.py:variant`` form of the docstrings, parsed by ml_collections' flag, from /."""
  code = ("from absl import flags; from ml_collections import config_flags; "
          "c = config_flags.DEFINE_config_file('config'); "
          f"flags.FLAGS(['x', '--config={CONFIGS}/cifar10_label_noise.py:symmetric,0.6,laptop']); "
          "print(c.value.label_noise.rate, c.value.num_steps)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd="/")
  assert out.stdout.split() == ["0.6", "200"]


@pytest.mark.parametrize("name,model,laptop_model", [
    ("cifar10_pyramidnet110", "pyramidnet110", {"name": "pyramidnet", "depth": 20, "alpha": 48}),
    ("cifar10_densenet100", "densenet100", {"name": "densenet", "depth": 40, "growth_rate": 12}),
])
def test_pyramidnet_and_densenet_configs(name, model, laptop_model, monkeypatch, tmp_path):
  """The paper's CIFAR setting on CIFAR-10 and, with ``cifar100``, CIFAR-100."""
  for variant in ("cifar100", "cifar100,laptop"):
    c = load(name, variant, monkeypatch, tmp_path)
    assert c.dataset == "cifar100"
    assert c.model.to_dict() == ({"name": model} if variant == "cifar100" else laptop_model)
    assert (c.optimizer.learning_rate, c.optimizer.momentum, c.optimizer.weight_decay,
            c.batch_size, c.label_smoothing) == (0.1, 0.9, 5e-4, 128, 0.1)
    plan.read(c)


TRANSFER_VARIANTS = ["cifar100,csam", "cifar100,sam", "cifar100,asam,laptop", "food101,csam",
                     "food101,sgd,laptop"]


@pytest.mark.parametrize("variant", TRANSFER_VARIANTS)
def test_transfer_configs(variant, monkeypatch, tmp_path):
  """The paper's ViT transfer: a pretrained ViT-S/16 at 224 px, learning rate 1e-3, batch 128,
  20 epochs, CSAM ρ1 = ρ2 = 0.1 and α = 0.4; the default weights' path must exist (the run
  stops before it writes otherwise) and without weights the config passes every check."""
  c = load("transfer_vit", variant, monkeypatch, tmp_path)
  dataset, method, *laptop = variant.split(",")
  assert c.dataset == dataset and c.optimizer.learning_rate == 1e-3
  side = c.model.get("resize") or c.image_size
  if laptop:
    assert (c.model.name, side, c.batch_size) == ("vit_tiny", 64, 32) and 0 < c.num_steps <= 200
    assert c.model.pretrained.startswith("weights/Ti_16-i21k-300ep")
  else:
    assert (c.model.name, side, c.batch_size, c.num_steps, c.num_epochs) == (
        "vit_small", 224, 128, 0, 20.0)
    assert c.model.pretrained.startswith("weights/S_16-i21k-300ep")
  assert c.optimizer.name == method
  if method == "csam":
    assert (c.csam.rho1, c.csam.rho2, c.csam.alpha, c.csam.metric) == (0.1, 0.1, 0.4, "identity")
  with pytest.raises(ValueError, match="no such file"):
    plan.read(c)
  c.model.pretrained = ""
  plan.read(c)
  with pytest.raises(ValueError, match="must be DATASET,METHOD"):
    load("transfer_vit", "cifar10,csam", monkeypatch, tmp_path)
