"""Flax (linen) models, one family per file, found by name.

``get_model(name, num_classes, **kwargs)`` builds one; ``MODELS`` lists the names. Every model
is called as ``model.apply(variables, x, train=...)`` and builds its Dense and Conv layers from
``nonuniform_jax.models.layers`` so the Kronecker factors can be captured.
"""

import dataclasses

from nonuniform_jax import checks
from nonuniform_jax.models import (cnn, densenet, mlp, preact_resnet, pyramidnet, resnet, vgg, vit,
                                   wide_resnet)

# name -> (module class, preset keyword arguments); the generic names ("cifar_resnet",
# "wide_resnet", "vit") take the class defaults, and any preset can be overridden by keyword.
MODELS = {
    "mlp": (mlp.MLP, {}),
    "paper_mlp": (mlp.PaperMLP, {}),
    "cnn": (cnn.CNN, {}),
    # CIFAR ResNets, option-A shortcuts (resnet.py)
    "cifar_resnet": (resnet.CifarResNet, {}),
    "resnet20": (resnet.CifarResNet, {"depth": 20}),
    "resnet32": (resnet.CifarResNet, {"depth": 32}),
    "resnet56": (resnet.CifarResNet, {"depth": 56}),
    # ImageNet ResNets (resnet.py)
    "resnet18": (resnet.ResNet, {"stage_sizes": (2, 2, 2, 2), "bottleneck": False}),
    "resnet50": (resnet.ResNet, {"stage_sizes": (3, 4, 6, 3), "bottleneck": True}),
    "preact_resnet18": (preact_resnet.PreActResNet, {"stage_sizes": (2, 2, 2, 2)}),
    "wide_resnet": (wide_resnet.WideResNet, {}),
    "wrn16_8": (wide_resnet.WideResNet, {"depth": 16, "widen_factor": 8}),
    "wrn28_6": (wide_resnet.WideResNet, {"depth": 28, "widen_factor": 6}),
    "wrn28_10": (wide_resnet.WideResNet, {"depth": 28, "widen_factor": 10}),
    "wrn58_6": (wide_resnet.WideResNet, {"depth": 58, "widen_factor": 6}),
    "vgg16_bn": (vgg.VGG, {"stages": vgg.VGG16}),
    "pyramidnet110": (pyramidnet.PyramidNet, {"depth": 110, "alpha": 48, "bottleneck": True}),
    "densenet100": (densenet.DenseNet, {"depth": 100, "growth_rate": 12}),
    "vit": (vit.VisionTransformer, {}),
    # ViT-Ti/16 and ViT-S/16 (for 224×224 images; pass patch_size=4 for 32×32 ones)
    "vit_tiny": (vit.VisionTransformer, {"patch_size": 16, "hidden_size": 192, "depth": 12,
                                         "num_heads": 3, "mlp_dim": 768}),
    "vit_small": (vit.VisionTransformer, {"patch_size": 16, "hidden_size": 384, "depth": 12,
                                          "num_heads": 6, "mlp_dim": 1536}),
}


def model_kwargs(name: str) -> list[str]:
  """The keyword arguments a model accepts (besides ``num_classes``)."""
  cls, _ = _lookup(name)
  return sorted(f.name for f in dataclasses.fields(cls)
                if f.init and f.name not in ("parent", "name", "num_classes"))


def _lookup(name):
  checks.choice("model", name, sorted(MODELS))
  return MODELS[name]


def _integers(value) -> list:
  if isinstance(value, (list, tuple)):
    return [v for item in value for v in _integers(item)]
  return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def check_model(name: str, **kwargs) -> None:
  """Raises ValueError naming the bad model name or argument, without building anything: an
  unknown argument, a size (every integer argument, alone or in a tuple: widths, depths,
  channels, patch sizes) below 1, or a rate outside [0, 1)."""
  known = model_kwargs(name)
  for key, value in kwargs.items():
    if key not in known:
      raise ValueError(f"model {name!r} has no argument {key!r}; its arguments are {known}")
    if any(v < 1 for v in _integers(value)):
      raise ValueError(f"model {name!r}: {key}={value!r} must hold sizes >= 1")
    if "dropout" in key:
      checks.in_range(f"model {name!r}: {key}", value, 0, 1, high_open=True)


def get_model(name: str, num_classes: int, **kwargs):
  """Builds model ``name`` (see ``MODELS``) with ``num_classes`` outputs."""
  check_model(name, **kwargs)
  cls, preset = _lookup(name)
  return cls(num_classes=num_classes, **{**preset, **kwargs})
