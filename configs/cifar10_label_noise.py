"""CIFAR-10 with noisy training labels, ResNet-32: the label-noise runs of experiments.md §4.

    python -m nonuniform_jax.main --config configs/cifar10_label_noise.py:symmetric,0.4 --workdir /tmp/nu/c10_sym04
    python -m nonuniform_jax.main --config configs/cifar10_label_noise.py:asymmetric,0.4 --workdir /tmp/nu/c10_asym04
    python -m nonuniform_jax.main --config configs/cifar10_label_noise.py:symmetric,0.8,laptop --workdir /tmp/nu/c10_sym08_laptop

The config string names the noise: ``symmetric`` (rates 0.2, 0.4, 0.6, 0.8: that fraction of
the training labels replaced by a uniformly drawn class, which may be the true one) or
``asymmetric`` (truck→automobile, bird→airplane, deer→horse, cat↔dog for that fraction of
each of those classes); without one, symmetric 0.4. Noisy labels are fixed by ``seed`` and saved as
``label_noise.npz`` in the workdir; train-side accuracy is logged on the noisy and clean parts.
Test labels are clean. Otherwise the paper's CIFAR setting (configs/cifar10_resnet20.py) with
ResNet-32 (the network of the SAM paper's label-noise study). Needs ``tfds build cifar10``.

``laptop`` (added to the string): ResNet-20, 200 steps on a fixed 5000-example subset.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))

RATES = ("0.2", "0.4", "0.6", "0.8")


def get_config(variant: str = "symmetric,0.4") -> ml_collections.ConfigDict:
  tokens = cifar["variants"](variant, ("symmetric", "asymmetric", "laptop") + RATES)
  kinds, rates = tokens & {"symmetric", "asymmetric"}, tokens & set(RATES)
  if len(kinds) > 1 or len(rates) > 1:
    raise ValueError(f"config string {variant!r} names more than one noise kind or rate")
  c = cifar["cifar"](cifar["default"]["get_config"](), "cifar10", {"name": "resnet32"})
  c.label_noise.kind = kinds.pop() if kinds else "symmetric"
  c.label_noise.rate = float(rates.pop() if rates else "0.4")
  if "laptop" in tokens:
    c = cifar["laptop"](c)
    c.model = ml_collections.ConfigDict({"name": "resnet20"})
  return c
