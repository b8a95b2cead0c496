"""ImageNet, ResNet-50: the standard recipe (Goyal et al. 2017), the base of the Food-101 configs.

    python -m nonuniform_jax.main --config configs/imagenet_resnet50.py --workdir /tmp/nu/in_r50
    python -m nonuniform_jax.main --config configs/imagenet_resnet50.py:laptop --workdir /tmp/nu/in_r50_laptop

SGD momentum 0.9, batch 1024, learning rate 0.4 (0.1 per 256 examples) with 5 warm-up epochs
then cosine decay, weight decay 1e-4 (coupled L2), label smoothing 0.1, 90 epochs; Inception
crop + flip at 224 px, centre crop for evaluation. The paper does not state its ImageNet
hyperparameters; these are the field's standard ones. Meant for a GPU/TPU host (batch 1024 is
split over all devices). SAM family by override, e.g. ``--config.optimizer.name=sam``.
Needs prepared data: download ILSVRC2012_img_{train,val}.tar into
``$TFDS_DATA_DIR/downloads/manual/``, then ``tfds build imagenet2012``.

``:laptop``: ResNet-18 at 64 px, batch 32, 100 steps streamed from the whole training split
(no subset; 3200 images decoded, about 19 600 records read, as the 16 384-record shuffle buffer
fills before the first batch), evaluated at the end on its first 1000 images and the whole
50 000-image validation split (the slow part on a CPU). A seeded subset
(``--config.num_train_examples=N``, the small-sample studies) costs full passes over the
training split (about 140 GB) to pick it and count its classes, which a laptop run should not
pay; the Food-101 variants (5 GB) do use one.
"""

import pathlib
import runpy

import ml_collections

# Config files are loaded by path, not as a package: load the sibling file the same way.
default = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("default.py")))
cifar = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("cifar10_resnet20.py")))


def large_images(c: ml_collections.ConfigDict, dataset: str, num_train: int, batch_size: int,
                 model: dict) -> ml_collections.ConfigDict:
  """The ImageNet-style recipe for ``dataset`` of ``num_train`` training images; the model
  starts from ``model['pretrained']`` when that names a published checkpoint (README)."""
  steps_per_epoch = num_train // batch_size
  c.dataset = dataset
  c.augment = True
  c.image_size = 224
  c.train_eval_examples = 10_000
  c.model = ml_collections.ConfigDict({"pretrained": "", **model})
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1 * batch_size / 256
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.weight_decay_mode = "coupled"
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 5 * steps_per_epoch
  c.label_smoothing = 0.1
  c.batch_size = batch_size
  c.eval_batch_size = 1000
  c.num_steps = 0
  c.num_epochs = 90.0
  c.log_every = 100
  c.checkpoint_every = max(100, round(steps_per_epoch, -2))   # about an epoch
  c.eval_every = 5 * c.checkpoint_every
  return c


def laptop(c: ml_collections.ConfigDict, model: dict,
           subset: bool = True) -> ml_collections.ConfigDict:
  """Laptop scale: ``model`` at 64 px, batch 32, 100 steps on 3200 images drawn by the seed
  (``subset=False``: streamed from the whole training split)."""
  c.image_size = 64
  c.model = ml_collections.ConfigDict({"pretrained": "", **model})
  c.batch_size = 32
  c.eval_batch_size = 250
  c.optimizer.learning_rate = 0.1 * 32 / 256
  c.schedule.warmup_steps = 0
  c.num_train_examples = 3200 if subset else 0
  c.train_eval_examples = 1000
  c.num_steps = 100
  c.eval_every = 100
  c.log_every = 10
  c.checkpoint_every = 100
  return c


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = large_images(default["get_config"](), "imagenet2012", 1_281_167, 1024, {"name": "resnet50"})
  if "laptop" in cifar["variants"](variant):
    c = laptop(c, {"name": "resnet18"}, subset=False)
  return c
