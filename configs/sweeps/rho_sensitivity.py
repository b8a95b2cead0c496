"""ρ sensitivity (WRN-28-6): SAM with radius ρ against CSAM with ρ1 = 0.1, ρ2 = ρ, α = 0.9, on
CIFAR-10 (ρ ∈ {0.05, 0.10, 0.15, 0.20, 0.25}) or CIFAR-100 (ρ ∈ {0.1, 0.2, 0.3, 0.4, 0.5}):
10 members each (docs/experiments.md, ρ sensitivity).

    python -m nonuniform_jax.sweep --config configs/sweeps/rho_sensitivity.py:cifar10 --workdir /shared/sweeps/rho_c10 --emit slurm
    python -m nonuniform_jax.sweep --config configs/sweeps/rho_sensitivity.py:cifar100 --workdir gs://my-bucket/sweeps/rho_c100 --emit tpu_vm

Base: configs/cifar10_wrn28_6.py or configs/cifar100_wrn28_6.py (the paper's CIFAR setting: SGD
momentum 0.9, cosine learning rate 0.1, weight decay 5e-4, batch 128, 200 epochs, label
smoothing 0.1, crop + flip), every measure at the end; one seed, as the paper's single runs.
The paper reads off the best test epoch; the members log the test accuracy every
``eval_every`` steps (2,000, about 5 epochs). The base itself (SGD) is no member.

``laptop`` (added to the string): the base's laptop variant (WRN-16-2, 200 steps on 5,000
examples) with configs/sweeps/common.py's laptop measures. ``tiny`` (the tests, under
tfds.testing.mock_data): WRN-10-1, two steps, one measure (tr Σ).
"""

import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("common.py")))

RHOS = {"cifar10": (0.05, 0.10, 0.15, 0.20, 0.25), "cifar100": (0.1, 0.2, 0.3, 0.4, 0.5)}


def get_config(variant: str = "cifar10") -> ml_collections.ConfigDict:
  found = common["tokens"](variant, ("cifar10", "cifar100", "laptop", "tiny"))
  datasets = found & set(RHOS)
  if len(datasets) != 1:
    raise ValueError(f"config string {variant!r} must name one of 'cifar10' and 'cifar100'")
  dataset, scale = datasets.pop(), common["scale"](found)
  s = ml_collections.ConfigDict()
  s.name = f"rho_sensitivity_{dataset}"
  s.base = f"configs/{dataset}_wrn28_6.py" + (":laptop" if scale == "laptop" else "")
  overrides = dict(common["measures"](scale))
  if scale == "tiny":
    overrides.update(common["TINY"], model={"name": "wide_resnet", "depth": 10,
                                            "widen_factor": 1})
  s.overrides = ml_collections.ConfigDict(overrides, allow_dotted_keys=True)
  s.include_base = False
  rhos = RHOS[dataset]
  s.grids = (
      ({"optimizer.name": ("sam",)}, {"sam.rho": rhos}),
      ({"optimizer.name": ("csam",), "csam.rho1": (0.1,), "csam.alpha": (0.9,)},
       {"csam.rho2": rhos}),
  )
  s.seeds = (0,)
  return s
