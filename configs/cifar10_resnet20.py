"""CIFAR-10, ResNet-20: the paper's CIFAR setting, and the base of every CIFAR config.

    python -m nonuniform_jax.main --config configs/cifar10_resnet20.py --workdir /tmp/nu/c10_r20
    python -m nonuniform_jax.main --config configs/cifar10_resnet20.py:laptop --workdir /tmp/nu/c10_r20_laptop

SGD with momentum 0.9, learning rate 0.1 with cosine decay, weight decay 5e-4 (coupled L2),
batch 128, 200 epochs, label smoothing 0.1; random crop 32 with 4-pixel padding and horizontal
flip. Other optimizers by override: ``--config.optimizer.name=sam --config.sam.rho=0.05`` or
``--config.optimizer.name=csam``. Needs prepared data: ``tfds build cifar10`` (or
$TFDS_DATA_DIR / ``--config.data_dir``).

``:laptop``: 200 steps on a fixed 5000-example subset, evaluation every 100 steps on the whole
test set and a 2000-example training subset; the same model and optimizer. Each ResNet-20 SGD
step at batch 128 took 0.8 s on this project's 2-core CPU (BENCHMARKS.md), so the 200 steps take
about 3 minutes plus the evaluations.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
default = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("default.py")))

def cifar(c: ml_collections.ConfigDict, dataset: str, model: dict) -> ml_collections.ConfigDict:
  """The paper's CIFAR training setting (docs/experiments.md, Deep networks) for ``dataset``
  and ``model``."""
  c.dataset = dataset
  c.augment = True
  c.train_eval_examples = 10_000
  c.model = ml_collections.ConfigDict(model)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_mode = "coupled"
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 0
  c.label_smoothing = 0.1
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_steps = 0
  c.num_epochs = 200.0
  c.eval_every = 2000                # about 5 epochs of 390 steps
  c.log_every = 100
  c.checkpoint_every = 2000
  return c


def laptop(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Laptop scale: 200 steps on a 5000-example subset, evaluated every 100 steps."""
  c.num_train_examples = 5000
  c.train_eval_examples = 2000
  c.num_steps = 200
  c.eval_every = 100
  c.log_every = 20
  c.checkpoint_every = 100
  return c


def variants(variant: str, known: tuple = ("laptop",)) -> set:
  """The comma-separated tokens of a config string such as 'laptop'; unknown ones are errors."""
  tokens = set(filter(None, variant.split(",")))
  if tokens - set(known):
    raise ValueError(f"unknown config variant {sorted(tokens - set(known))}; choose from "
                     f"{list(known)}")
  return tokens


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = cifar(default["get_config"](), "cifar10", {"name": "resnet20"})
  return laptop(c) if "laptop" in variants(variant) else c
