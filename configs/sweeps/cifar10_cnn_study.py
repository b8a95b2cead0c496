"""The correlation study on CIFAR-10 with CNNs: 64 ResNets around the paper's ResNet-20 setting,
each measured by every sharpness and nonuniformity measure (docs/experiments.md).

    python -m nonuniform_jax.sweep --config configs/sweeps/cifar10_cnn_study.py --workdir /shared/sweeps/c10_cnn --emit slurm
    python -m nonuniform_jax.sweep --config configs/sweeps/cifar10_cnn_study.py --workdir gs://my-bucket/sweeps/c10_cnn --workers 8 --emit tpu_vm

Base: configs/cifar10_resnet20.py (ResNet-20; SGD momentum 0.9, cosine learning rate 0.1, weight
decay 5e-4, batch 128, 200 epochs, label smoothing 0.1, crop + flip), every measure at
configs/default.py's settings. Varied one at a time: learning rate {0.02, 0.05, 0.2}, batch
{64, 256, 512}, weight decay {0, 1e-4, 1e-3}, no augmentation, label smoothing {0, 0.2}, SAM ρ
{0.02, 0.05, 0.1, 0.2}, CSAM (ρ1 = 0.1, ρ2 = 0.2, α = 0.6: the authors' ResNet-20 setting),
depth (ResNet-32, ResNet-56) and width (ResNet-20 of widths 32 and 64); and a grid of optimizer
(SGD, SAM ρ = 0.05, CSAM) × learning rate {0.05, 0.2} × batch {128, 512}. 32 settings (two grid
points equal one-at-a-time ones), seeds 0 and 1. Training criterion: training accuracy ≥ 0.99.

``:laptop``: the base's laptop variant (200 steps on 5,000 examples) with
configs/sweeps/common.py's laptop measures on 1,024 examples. ``:tiny`` (the tests, under
tfds.testing.mock_data): the same 64 members with
ResNets of depth 8 and widths 2 to 8, batches of 4 to 16, two steps and one measure (tr Σ).
"""

import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("common.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  scale = common["scale"](common["tokens"](variant, ("laptop", "tiny")))
  tiny = scale == "tiny"
  s = ml_collections.ConfigDict()
  s.name = "cifar10_cnn_study"
  s.base = "configs/cifar10_resnet20.py" + (":laptop" if scale == "laptop" else "")
  overrides = dict(common["measures"](scale))
  if scale == "laptop":   # batch_gradient_noise needs two batches of 512 among the measured
    overrides["measures.num_examples"] = 1024
  # Batch sizes (base, then the varied ones) and networks, at full or test scale.
  batch, batches, big = (8, (4, 12, 16), 16) if tiny else (128, (64, 256, 512), 512)
  if tiny:
    resnet = lambda depth, width: {"name": "cifar_resnet", "depth": depth, "width": width}
    overrides.update(common["TINY"], batch_size=batch, model=resnet(8, 4))
    networks = (resnet(8, 2), resnet(8, 3), resnet(8, 6), resnet(8, 8))
  else:
    networks = ({"name": "resnet32"}, {"name": "resnet56"},
                {"name": "cifar_resnet", "depth": 20, "width": 32},
                {"name": "cifar_resnet", "depth": 20, "width": 64})
  s.overrides = ml_collections.ConfigDict(overrides, allow_dotted_keys=True)
  s.one_at_a_time = (
      {"optimizer.learning_rate": (0.02, 0.05, 0.2)},
      {"batch_size": batches},
      {"optimizer.weight_decay": (0.0, 1e-4, 1e-3)},
      {"augment": (False,)},
      {"label_smoothing": (0.0, 0.2)},
      {"optimizer.name": ("sam",) * 4, "sam.rho": (0.02, 0.05, 0.1, 0.2)},
      {"optimizer.name": ("csam",), "csam.rho1": (0.1,), "csam.rho2": (0.2,),
       "csam.alpha": (0.6,)},
      {"model": networks},
  )
  s.grids = ((
      {"optimizer.name": ("sgd", "sam", "csam"), "sam.rho": (0.05,) * 3,
       "csam.alpha": (0.9, 0.9, 0.6)},
      {"optimizer.learning_rate": (0.05, 0.2)},
      {"batch_size": (batch, big)},
  ),)
  s.seeds = (0, 1)
  return s
