"""Food-101, ResNet-50 trained from scratch with the ImageNet recipe (configs/imagenet_resnet50.py).

    python -m nonuniform_jax.main --config configs/food101_resnet50.py --workdir /tmp/nu/food_r50
    python -m nonuniform_jax.main --config configs/food101_resnet50.py:laptop --workdir /tmp/nu/food_r50_laptop

75 750 training and 25 250 validation images, 101 classes. SGD momentum 0.9, batch 256,
learning rate 0.1 with 5 warm-up epochs then cosine, weight decay 1e-4, label smoothing 0.1,
90 epochs, Inception crop + flip at 224 px (ImageNet's normalisation constants). The paper does
not state its Food-101 hyperparameters; these are our choice. Needs prepared data:
``tfds build food101`` (downloads 5 GB).

``:laptop``: ResNet-18 at 64 px, batch 32, 100 steps on 3200 training images drawn by the seed
(picking them reads the whole training split); evaluation covers the whole 25 250-image
validation split.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
imagenet = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("imagenet_resnet50.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = imagenet["large_images"](imagenet["default"]["get_config"](), "food101", 75_750, 256,
                               {"name": "resnet50"})
  if "laptop" in imagenet["cifar"]["variants"](variant):
    c = imagenet["laptop"](c, {"name": "resnet18"})
  return c
