"""CIFAR-10, ResNet-56 (He et al. 2016, 0.85M parameters).

    python -m nonuniform_jax.main --config configs/cifar10_resnet56.py --workdir /tmp/nu/c10_resnet56
    python -m nonuniform_jax.main --config configs/cifar10_resnet56.py:laptop --workdir /tmp/nu/c10_resnet56_laptop

The paper's CIFAR setting (configs/cifar10_resnet20.py): SGD momentum 0.9, learning rate 0.1
cosine, weight decay 5e-4, batch 128, 200 epochs, label smoothing 0.1, crop + flip.
Needs prepared data: ``tfds build cifar10``.

``:laptop``: ResNet-20 instead of ResNet-56, 200 steps on a fixed 5000-example subset, evaluated
every 100 steps.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = cifar["cifar"](cifar["default"]["get_config"](), "cifar10", {"name": "resnet56"})
  if "laptop" in cifar["variants"](variant):
    c = cifar["laptop"](c)
    c.model = ml_collections.ConfigDict({"name": "resnet20"})
  return c
