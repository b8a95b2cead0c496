"""CIFAR-10 or CIFAR-100, DenseNet-BC-100 (k = 12; Huang, Liu, van der Maaten, Weinberger 2017),
a network of the paper's CIFAR figures.

    python -m nonuniform_jax.main --config configs/cifar10_densenet100.py --workdir /tmp/nu/c10_densenet
    python -m nonuniform_jax.main --config configs/cifar10_densenet100.py:cifar100 --workdir /tmp/nu/c100_densenet
    python -m nonuniform_jax.main --config configs/cifar10_densenet100.py:laptop --workdir /tmp/nu/c10_densenet_laptop
    python -m nonuniform_jax.main --config configs/sam_family.py:cifar10_densenet100,csam --workdir /tmp/nu/c10_densenet_csam

The paper's CIFAR setting (configs/cifar10_resnet20.py): SGD momentum 0.9, learning rate 0.1
cosine, weight decay 5e-4, batch 128, 200 epochs, label smoothing 0.1, crop + flip; the authors'
CSAM settings on it through configs/sam_family.py (the last command; 300 epochs). 0.77M
parameters at 10 classes; a training step at batch 128 costs 272 GFLOP (XLA's count), 9 times
ResNet-20's. Needs prepared data: ``tfds build cifar10`` (or ``cifar100``).

``:laptop`` (also ``cifar100,laptop``): DenseNet-BC-40 (k = 12, Huang et al.'s smallest: 0.18M
parameters, 2 times ResNet-20's FLOPs), 200 steps on a fixed 5000-example subset, evaluated
every 100 steps. Its steps took 4 times as long as those of ``cifar10_resnet20.py:laptop`` run
beside it on this project's shared 2-core CPU (the concatenations cost more than their FLOPs).
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  tokens = cifar["variants"](variant, ("cifar100", "laptop"))
  dataset = "cifar100" if "cifar100" in tokens else "cifar10"
  c = cifar["cifar"](cifar["default"]["get_config"](), dataset, {"name": "densenet100"})
  if "laptop" in tokens:
    c = cifar["laptop"](c)
    c.model = ml_collections.ConfigDict({"name": "densenet", "depth": 40, "growth_rate": 12})
  return c
