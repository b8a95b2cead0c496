"""CIFAR-10 or CIFAR-100, PyramidNet-110 (α = 48, bottleneck units; Han, Kim, Kim 2017), a
network of the paper's CIFAR figures.

    python -m nonuniform_jax.main --config configs/cifar10_pyramidnet110.py --workdir /tmp/nu/c10_pyramidnet
    python -m nonuniform_jax.main --config configs/cifar10_pyramidnet110.py:cifar100 --workdir /tmp/nu/c100_pyramidnet
    python -m nonuniform_jax.main --config configs/cifar10_pyramidnet110.py:laptop --workdir /tmp/nu/c10_pyramidnet_laptop
    python -m nonuniform_jax.main --config configs/sam_family.py:cifar100_pyramidnet110,csam --workdir /tmp/nu/c100_pyramidnet_csam

The paper's CIFAR setting (configs/cifar10_resnet20.py): SGD momentum 0.9, learning rate 0.1
cosine, weight decay 5e-4, batch 128, 200 epochs, label smoothing 0.1, crop + flip. The
authors' CSAM on this network takes α = 0.4 (the last command; configs/sam_family.py, 300
epochs). 1.15M parameters at 10 classes; a training step at batch 128 costs 207 GFLOP (XLA's
count), 7 times ResNet-20's. Needs prepared data: ``tfds build cifar10`` (or ``cifar100``).

``:laptop`` (also ``cifar100,laptop``): PyramidNet-20 (the same bottleneck units and α = 48, two
per stage: 0.22M parameters, 1.5 times ResNet-20's FLOPs), 200 steps on a fixed 5000-example
subset, evaluated every 100 steps. Its steps took 2.3 times as long as those of
``cifar10_resnet20.py:laptop`` run beside it on this project's shared 2-core CPU.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  tokens = cifar["variants"](variant, ("cifar100", "laptop"))
  dataset = "cifar100" if "cifar100" in tokens else "cifar10"
  c = cifar["cifar"](cifar["default"]["get_config"](), dataset, {"name": "pyramidnet110"})
  if "laptop" in tokens:
    c = cifar["laptop"](c)
    c.model = ml_collections.ConfigDict({"name": "pyramidnet", "depth": 20, "alpha": 48})
  return c
