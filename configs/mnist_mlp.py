"""MNIST, the paper's MLP 784-128-64-10 (ReLU after the first layer only, as in the authors' code).

    python -m nonuniform_jax.main --config configs/mnist_mlp.py --workdir /tmp/nu/mnist_mlp
    python -m nonuniform_jax.main --config configs/mnist_mlp.py:laptop --workdir /tmp/nu/mnist_mlp_laptop

Learning rate 0.1, batch 128, no label smoothing (docs/experiments.md, Deep networks). The paper
gives nothing else, so: plain SGD (momentum 0), a constant rate, no weight decay, 20 epochs. The
ReLU-everywhere MLP of the same widths: ``--config.model.name=mlp``. Needs prepared data:
``tfds build mnist``.

``:laptop``: 150 steps (about 2 epochs) on a fixed 10 000-example subset; a step of this MLP
takes well under a millisecond on a CPU, so loading and evaluation dominate.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
default = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("default.py")))
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default["get_config"]()
  c.dataset = "mnist"
  c.augment = False
  c.train_eval_examples = 10_000
  c.model = ml_collections.ConfigDict({"name": "paper_mlp", "widths": (128, 64)})
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.0
  c.optimizer.weight_decay = 0.0
  c.schedule.name = "constant"
  c.label_smoothing = 0.0
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_steps = 0
  c.num_epochs = 20.0
  c.eval_every = 500                 # about an epoch of 468 steps
  c.log_every = 100
  c.checkpoint_every = 500
  if "laptop" in cifar["variants"](variant):
    c.num_train_examples = 10_000
    c.train_eval_examples = 2000
    c.num_steps = 150                # about 2 epochs of the subset
    c.eval_every = 50
    c.log_every = 10
    c.checkpoint_every = 50
  return c
