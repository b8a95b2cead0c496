"""CIFAR-10, WRN-28-6 (Zagoruyko & Komodakis 2016): the network of the ρ-sensitivity runs.

    python -m nonuniform_jax.main --config configs/cifar10_wrn28_6.py --workdir /tmp/nu/c10_wrn28_6
    python -m nonuniform_jax.main --config configs/cifar10_wrn28_6.py:laptop --workdir /tmp/nu/c10_wrn28_6_laptop

The paper's CIFAR setting (configs/cifar10_resnet20.py): SGD momentum 0.9, learning rate 0.1
cosine, weight decay 5e-4, batch 128, 200 epochs, label smoothing 0.1, crop + flip.
No dropout (the model's default). SAM ρ sweep:
``--config.optimizer.name=sam --config.sam.rho=0.1``.
Needs prepared data: ``tfds build cifar10``.

``:laptop``: WRN-16-2 instead of WRN-28-6, 200 steps on a fixed 5000-example subset, evaluated
every 100 steps.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = cifar["cifar"](cifar["default"]["get_config"](), "cifar10", {"name": "wrn28_6"})
  if "laptop" in cifar["variants"](variant):
    c = cifar["laptop"](c)
    c.model = ml_collections.ConfigDict({"name": "wide_resnet", "depth": 16, "widen_factor": 2})
  return c
