"""The correlation study on CIFAR-10 with Vision Transformers trained from scratch: 64 models,
each measured by every sharpness and nonuniformity measure (docs/experiments.md).

    python -m nonuniform_jax.sweep --config configs/sweeps/cifar10_vit_study.py --workdir /shared/sweeps/c10_vit --emit slurm
    python -m nonuniform_jax.sweep --config configs/sweeps/cifar10_vit_study.py --workdir gs://my-bucket/sweeps/c10_vit --workers 8 --emit tpu_vm

The paper trains no ViT on CIFAR-10 from scratch and states no recipe; ours: a ViT of 4×4
patches, width 192, depth 6, 3 heads, MLP 768 (2.7M parameters) on configs/cifar10_resnet20.py's
data and schedule (crop + flip, label smoothing 0.1, batch 128, 200 epochs, cosine) with AdamW
(learning rate 1e-3, β = 0.9, 0.999, decoupled weight decay 0.05, 5 warm-up epochs, clipping at
global norm 1); the SAM family perturbs before AdamW. Varied one at a time: learning rate
{3e-4, 5e-4, 2e-3}, batch {64, 256, 512}, weight decay {0, 0.01, 0.1}, no augmentation, label
smoothing {0, 0.2}, SAM ρ {0.02, 0.05, 0.1, 0.2}, CSAM (ρ1 = 0.1, ρ2 = 0.2, α = 0.9), depth
{4, 9} and width {96, 384} (heads 3 and 6, MLP 4× the width); and a grid of optimizer (AdamW,
SAM ρ = 0.05, CSAM) × learning rate {5e-4, 2e-3} × batch {128, 512}. 32 settings (two grid
points equal one-at-a-time ones), seeds 0 and 1. Training criterion: training accuracy ≥ 0.99.

``:laptop``: the base's laptop variant (200 steps on 5,000 examples) with a ViT of depth 2,
width 64 and 2 heads (depths 1 and 4, widths 32 and 128), and configs/sweeps/common.py's laptop
measures on 1,024 examples. ``:tiny`` (the tests, under tfds.testing.mock_data): the same
members with ViTs of width 4 to 16 and depth 1 to 3, batches of 4 to 16, two steps and one
measure (tr Σ).
"""

import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("common.py")))

STEPS_PER_EPOCH = 50_000 // 128
# The ViT at each scale (width, depth, heads) and the varied depths and (widths, heads).
NETWORKS = {"cluster": ((192, 6, 3), (4, 9), ((96, 3), (384, 6))),
            "laptop": ((64, 2, 2), (1, 4), ((32, 2), (128, 4))),
            "tiny": ((8, 2, 2), (1, 3), ((4, 2), (16, 4)))}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  scale = common["scale"](common["tokens"](variant, ("laptop", "tiny")))
  s = ml_collections.ConfigDict()
  s.name = "cifar10_vit_study"
  s.base = "configs/cifar10_resnet20.py" + (":laptop" if scale == "laptop" else "")
  (width, depth, num_heads), depths, varied = NETWORKS[scale]
  overrides = {
      "model": {"name": "vit", "patch_size": 4, "hidden_size": width, "depth": depth,
                "num_heads": num_heads, "mlp_dim": 4 * width},
      "optimizer.name": "adamw", "optimizer.base": "adamw", "optimizer.learning_rate": 1e-3,
      "optimizer.b1": 0.9, "optimizer.b2": 0.999, "optimizer.weight_decay": 0.05,
      "optimizer.weight_decay_mode": "decoupled", "optimizer.grad_clip_norm": 1.0,
      "schedule.warmup_steps": 0 if scale != "cluster" else 5 * STEPS_PER_EPOCH,
      **common["measures"](scale)}
  if scale == "laptop":   # batch_gradient_noise needs two batches of 512 among the measured
    overrides["measures.num_examples"] = 1024
  batch, batches, big = (8, (4, 12, 16), 16) if scale == "tiny" else (128, (64, 256, 512), 512)
  if scale == "tiny":
    overrides.update(common["TINY"], batch_size=batch)
  s.overrides = ml_collections.ConfigDict(overrides, allow_dotted_keys=True)
  s.one_at_a_time = (
      {"optimizer.learning_rate": (3e-4, 5e-4, 2e-3)},
      {"batch_size": batches},
      {"optimizer.weight_decay": (0.0, 0.01, 0.1)},
      {"augment": (False,)},
      {"label_smoothing": (0.0, 0.2)},
      {"optimizer.name": ("sam",) * 4, "sam.rho": (0.02, 0.05, 0.1, 0.2)},
      {"optimizer.name": ("csam",), "csam.rho1": (0.1,), "csam.rho2": (0.2,),
       "csam.alpha": (0.9,)},
      {"model.depth": depths},
      {"model.hidden_size": tuple(w for w, _ in varied),
       "model.num_heads": tuple(h for _, h in varied),
       "model.mlp_dim": tuple(4 * w for w, _ in varied)},
  )
  s.grids = ((
      {"optimizer.name": ("adamw", "sam", "csam"), "sam.rho": (0.05,) * 3},
      {"optimizer.learning_rate": (5e-4, 2e-3)},
      {"batch_size": (batch, big)},
  ),)
  s.seeds = (0, 1)
  return s
