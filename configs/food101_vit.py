"""Food-101, ViT-S/16 trained from scratch (AdamW, DeiT-style schedule).

    python -m nonuniform_jax.main --config configs/food101_vit.py --workdir /tmp/nu/food_vit
    python -m nonuniform_jax.main --config configs/food101_vit.py:laptop --workdir /tmp/nu/food_vit_laptop

ViT-S/16 at 224 px (dropout 0.1), AdamW (β = 0.9, 0.999) with decoupled weight decay 0.05,
batch 256, learning rate 5e-4 with 10 warm-up epochs then cosine, gradient clipping at global
norm 1, label smoothing 0.1, 90 epochs; Inception crop + flip. The paper does not state its
Food-101 ViT hyperparameters; these are our choice (Touvron et al. 2021 without their heavy
augmentation). Needs prepared data: ``tfds build food101``.

``:laptop``: ViT-Ti with 8-pixel patches at 64 px, batch 32, 100 steps on 3200 training images
drawn by the seed (picking them reads the whole training split).
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
imagenet = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("imagenet_resnet50.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = imagenet["large_images"](imagenet["default"]["get_config"](), "food101", 75_750, 256,
                               {"name": "vit_small", "dropout_rate": 0.1})
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 5e-4
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
  c.optimizer.weight_decay = 0.05
  c.optimizer.weight_decay_mode = "decoupled"
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.warmup_steps = 10 * (75_750 // 256)
  if "laptop" in imagenet["cifar"]["variants"](variant):
    c = imagenet["laptop"](c, {"name": "vit_tiny", "patch_size": 8, "dropout_rate": 0.1})
    c.optimizer.learning_rate = 5e-4
  return c
