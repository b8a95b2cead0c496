"""CIFAR-10 (or CIFAR-100) with noisy training labels, ResNet-32: the label-noise runs of
docs/experiments.md, Label noise.

    python -m nonuniform_jax.main --config configs/cifar10_label_noise.py:symmetric,0.4 --workdir /tmp/nu/c10_sym04
    python -m nonuniform_jax.main --config configs/cifar10_label_noise.py:asymmetric,0.4 --workdir /tmp/nu/c10_asym04
    python -m nonuniform_jax.main --config configs/cifar10_label_noise.py:symmetric,0.8,laptop --workdir /tmp/nu/c10_sym08_laptop
    python -m nonuniform_jax.main --config configs/cifar10_label_noise.py:asymmetric,0.4,cifar100 --workdir /tmp/nu/c100_asym04

The config string names the noise: ``symmetric`` (rates 0.2, 0.4, 0.6, 0.8: that fraction of
the training labels replaced by a uniformly drawn class, which may be the true one) or
``asymmetric`` (truck→automobile, bird→airplane, deer→horse, cat↔dog for that fraction of
each of those classes; with ``cifar100``, each class to the next within its superclass);
without one, symmetric 0.4. ``cifar100`` in the string trains on CIFAR-100 instead. Noisy labels are fixed by ``seed`` and saved as
``label_noise.npz`` in the workdir; train-side accuracy is logged on the noisy and clean parts.
Test labels are clean. Otherwise the paper's CIFAR setting (configs/cifar10_resnet20.py) with
ResNet-32 (the network of the SAM paper's label-noise study). Needs ``tfds build cifar10``
(or ``cifar100``).

``laptop`` (added to the string): ResNet-20, 200 steps on a fixed 5000-example subset.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))

RATES = ("0.2", "0.4", "0.6", "0.8")


def get_config(variant: str = "symmetric,0.4") -> ml_collections.ConfigDict:
  tokens = cifar["variants"](variant, ("symmetric", "asymmetric", "laptop", "cifar100") + RATES)
  kinds, rates = tokens & {"symmetric", "asymmetric"}, tokens & set(RATES)
  if len(kinds) > 1 or len(rates) > 1:
    raise ValueError(f"config string {variant!r} names more than one noise kind or rate")
  dataset = "cifar100" if "cifar100" in tokens else "cifar10"
  c = cifar["cifar"](cifar["default"]["get_config"](), dataset, {"name": "resnet32"})
  c.label_noise.kind = kinds.pop() if kinds else "symmetric"
  c.label_noise.rate = float(rates.pop() if rates else "0.4")
  if "laptop" in tokens:
    c = cifar["laptop"](c)
    c.model = ml_collections.ConfigDict({"name": "resnet20"})
  return c
