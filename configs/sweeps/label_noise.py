"""Label noise: symmetric noise at rates 0.2, 0.4, 0.6 and 0.8 on CIFAR-10, each trained with
SGD, SAM and CSAM: 12 members (docs/experiments.md, Label noise).

    python -m nonuniform_jax.sweep --config configs/sweeps/label_noise.py --workdir /shared/sweeps/label_noise --emit slurm
    python -m nonuniform_jax.sweep --config configs/sweeps/label_noise.py --workdir gs://my-bucket/sweeps/label_noise --emit tpu_vm

Base: configs/cifar10_label_noise.py (ResNet-32 in the paper's CIFAR setting; the noisy labels
fixed by the seed and saved in each member's workdir; accuracy on the clean part, on the noisy
part against the given labels and against the true ones logged apart). SAM ρ = 0.05 and CSAM
ρ1 = 0.1, ρ2 = 0.2, α = 0.9, as on clean CIFAR-10 (configs/sam_family.py); every measure at the
end; one seed. Training criterion 0: memorising the noisy labels is not asked of these runs,
whose result is their test accuracy.

``laptop`` (the config string): the base's laptop variant (ResNet-20, 200 steps on 5,000
examples) with configs/sweeps/common.py's laptop measures. ``tiny`` (the tests, under
tfds.testing.mock_data): a ResNet of depth 8 and width 4, two steps, one measure (tr Σ).
"""

import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("common.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  scale = common["scale"](common["tokens"](variant, ("laptop", "tiny")))
  s = ml_collections.ConfigDict()
  s.name = "label_noise"
  s.base = "configs/cifar10_label_noise.py:symmetric,0.4" + (",laptop" if scale == "laptop"
                                                             else "")
  overrides = dict(common["measures"](scale))
  if scale == "tiny":
    overrides.update(common["TINY"], model={"name": "cifar_resnet", "depth": 8, "width": 4})
  s.overrides = ml_collections.ConfigDict(overrides, allow_dotted_keys=True)
  s.include_base = False
  s.grids = ((
      {"label_noise.rate": (0.2, 0.4, 0.6, 0.8)},
      {"optimizer.name": ("sgd", "sam", "csam"), "sam.rho": (0.05,) * 3,
       "csam.rho1": (0.1,) * 3, "csam.rho2": (0.2,) * 3, "csam.alpha": (0.9,) * 3},
  ),)
  s.seeds = (0,)
  s.criterion = {"train_accuracy": 0.0}
  return s
