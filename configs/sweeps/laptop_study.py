"""The correlation study at laptop scale: 1,088 models on MNIST-1D and scikit-learn's digits,
each measured by every sharpness and nonuniformity measure (docs/experiments.md).

    python -m nonuniform_jax.sweep --config configs/sweeps/laptop_study.py --workdir workdirs/laptop_study --workers 2
    python -m nonuniform_jax.sweep --config configs/sweeps/laptop_study.py:tiny --workdir /tmp/nu/laptop_study_tiny

Base: configs/default.py (MNIST-1D, SGD with momentum 0.9, cosine learning rate 0.1, batch 128)
with an MLP 40-64-64-10, 1,500 steps, and configs/sweeps/common.py's laptop measures (every
measure on 512 training examples, fewer iterations). Varied:

* a grid over eight networks — MNIST-1D MLPs of depth 2 and 3 and width 64 and 128, a 1-D CNN
  (channels 8, 16, hidden 32; 5,914 parameters), and on the digits an MLP 64-64, an MLP
  128-128-128 and the same CNN in 2-D — × optimizer (SGD; SAM ρ = 0.05 and 0.1; CSAM ρ1 = 0.1,
  ρ2 = 0.2, α = 0.9) × learning rate {0.05, 0.2} × batch {32, 128} × weight decay {0, 5e-4} ×
  symmetric label noise {0, 0.2}: 512 settings;
* one at a time around the base: learning rate {0.01, 0.02, 0.3, 0.5}, batch {16, 64, 256},
  weight decay {1e-4, 1e-3, 5e-3}, momentum {0, 0.5, 0.95}, SAM ρ {0.01, 0.02, 0.2, 0.5}, CSAM
  ρ2 {0.05, 0.1, 0.4} and α {0.5, 0.99}, label noise {0.1, 0.3, 0.4}, label smoothing
  {0.05, 0.1}, width {32, 256} and depth {1, 4}: 31 settings, and the base;

each with seeds 0 and 1. Training criterion: training accuracy ≥ 0.99.

``:tiny`` (the tests): 5 members — the base, a 1-D CNN with SAM and a digits MLP with CSAM on a
grid, and label noise and a learning rate one at a time — of two steps, narrow networks, and
the three measures the figures need; criterion 0, so every finished member counts.
"""

import pathlib
import runpy

import ml_collections

common = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("common.py")))

MLP_64 = {"name": "mlp", "widths": (64, 64)}
CNN = {"name": "cnn", "channels": (8, 16), "hidden": 32}
NETWORKS = (("mnist1d", MLP_64), ("mnist1d", {"name": "mlp", "widths": (128, 128)}),
            ("mnist1d", {"name": "mlp", "widths": (64, 64, 64)}),
            ("mnist1d", {"name": "mlp", "widths": (128, 128, 128)}), ("mnist1d", CNN),
            ("digits", MLP_64), ("digits", {"name": "mlp", "widths": (128, 128, 128)}),
            ("digits", CNN))


def _networks(networks) -> dict:
  return {"dataset": tuple(d for d, _ in networks), "model": tuple(m for _, m in networks)}


def _label_noise(*rates) -> dict:
  return {"label_noise.kind": tuple("symmetric" if r else "none" for r in rates),
          "label_noise.rate": rates}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  tiny = "tiny" in common["tokens"](variant, ("tiny",))
  s = ml_collections.ConfigDict()
  s.name = "laptop_study_tiny" if tiny else "laptop_study"
  s.base = "configs/default.py"
  overrides = {"model": MLP_64, "num_steps": 1500, "log_every": 100, "eval_every": 500,
               "checkpoint_every": 500, **common["measures"]("laptop")}
  s.seeds = (0, 1)
  if tiny:
    overrides = {**overrides, **common["TINY"], "model": {"name": "mlp", "widths": (8,)},
                 **common["measures"]("tiny"),
                 "measures.names": ("lambda_max", "gradient_noise", "wu_nonuniformity"),
                 "measures.settings.lambda_max.num_iters": 3,
                 "measures.settings.wu_nonuniformity.num_iters": 3}
    s.grids = ((_networks((("mnist1d", {"name": "mlp", "widths": (8,)}),
                           ("mnist1d", {"name": "cnn", "channels": (4,), "hidden": 8}),
                           ("digits", {"name": "mlp", "widths": (8,)}))) | {
                               "optimizer.name": ("sgd", "sam", "csam")},),)
    s.one_at_a_time = (_label_noise(0.2), {"optimizer.learning_rate": (0.05,)})
    s.seeds = (0,)
    s.criterion = {"train_accuracy": 0.0}
  else:
    s.grids = ((_networks(NETWORKS),
                {"optimizer.name": ("sgd", "sam", "sam", "csam"),
                 "sam.rho": (0.05, 0.05, 0.1, 0.05)},
                {"optimizer.learning_rate": (0.05, 0.2)},
                {"batch_size": (32, 128)},
                {"optimizer.weight_decay": (0.0, 5e-4)},
                _label_noise(0.0, 0.2)),)
    s.one_at_a_time = (
        {"optimizer.learning_rate": (0.01, 0.02, 0.3, 0.5)},
        {"batch_size": (16, 64, 256)},
        {"optimizer.weight_decay": (1e-4, 1e-3, 5e-3)},
        {"optimizer.momentum": (0.0, 0.5, 0.95)},
        {"optimizer.name": ("sam",) * 4, "sam.rho": (0.01, 0.02, 0.2, 0.5)},
        {"optimizer.name": ("csam",) * 3, "csam.rho2": (0.05, 0.1, 0.4)},
        {"optimizer.name": ("csam",) * 2, "csam.alpha": (0.5, 0.99)},
        _label_noise(0.1, 0.3, 0.4),
        {"label_smoothing": (0.05, 0.1)},
        {"model.widths": ((32, 32), (256, 256))},
        {"model.widths": ((64,), (64, 64, 64, 64))},
    )
    s.criterion = {"train_accuracy": 0.99}
  s.overrides = ml_collections.ConfigDict(overrides, allow_dotted_keys=True)
  return s
